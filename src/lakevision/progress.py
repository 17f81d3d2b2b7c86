"""Progress lines a person reads: a task marks them in its log, and the job runner shows the latest
one instead of whatever the task's libraries printed last (warnings, Ray's banners, bars).

A line carries :data:`MARK` anywhere in it, so it survives the prefixes Ray puts before a
worker's output (``(RayTrainWorker pid=...)``).
"""

from __future__ import annotations

import sys

MARK = "lakevision-progress: "


def report(message: str) -> None:
    """Mark ``message`` as this task's progress (stderr, which the task's log holds)."""
    print(f"{MARK}{message}", file=sys.stderr, flush=True)


def latest(text: str) -> str | None:
    """The newest progress message in a log's text; None when it has none."""
    for line in reversed(text.replace("\r", "\n").splitlines()):
        at = line.find(MARK)
        if at >= 0:
            return line[at + len(MARK):].strip()
    return None


def minutes(seconds: float) -> str:
    """``seconds`` as m:ss, the way a person reads elapsed and remaining time."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
