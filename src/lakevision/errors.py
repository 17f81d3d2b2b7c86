"""The errors a user can fix: bad input files, configuration, data or models.

The CLI prints these without a traceback and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class LakevisionError(Exception):
    """Base class for problems with the user's input or environment."""


class DataError(LakevisionError, ValueError):
    """The data a job needs is missing or unusable (an empty split, a task mismatch)."""
