"""Read a file that untrusted input names, only if it is a regular file inside a given folder.

A COCO ``file_name`` comes from whoever wrote the annotation file: ``../../etc/hostname``, an
absolute path, a symlink out of the image folder, ``/dev/zero`` or a FIFO must never be opened (or
hashed into a training set). :func:`read_confined` resolves the name against the resolved folder,
refuses anything that lands outside it, then walks down to the file one component at a time with
``O_NOFOLLOW`` (so a symlink swapped in after the check is not followed either), looks at the file
with ``lstat`` before opening it (a device or FIFO is never opened) and reads at most the cap plus
one byte. Symlinks that stay inside the folder are followed.
"""

from __future__ import annotations

import errno
import os
import stat

from lakevision.errors import LakevisionError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
# O_NONBLOCK: were a FIFO swapped in between lstat and open, open would not wait for a writer
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class RefusedFile(LakevisionError):
    """The name was not opened, because it is not a regular file inside the folder, or it is too big."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check_regular(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile(f"is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise RefusedFile(f"is {st.st_size} bytes, over the limit of {max_bytes}")


def _resolve(folder: str, name: str) -> tuple[str, list[str]]:
    """The resolved folder and the components of ``name`` below it; refuses names that leave it."""
    if not name or "\0" in name:
        raise RefusedFile("is empty" if not name else "contains a NUL character")
    if os.path.isabs(name):
        raise RefusedFile("is an absolute path; file names are relative to the image folder")
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, name))
    if target == root or os.path.commonpath([root, target]) != root:
        raise RefusedFile(f"resolves to {target}, outside the image folder {root}")
    return root, os.path.relpath(target, root).split(os.sep)


def _open_below(root: str, parts: list[str], max_bytes: int) -> int:
    """Open ``root/parts...`` with no symlink followed on the way; the file is lstat-ed first."""
    if os.open not in os.supports_dir_fd:  # no openat (Windows): the resolved path, checked just before
        path = os.path.join(root, *parts)
        _check_regular(os.lstat(path), max_bytes)
        return os.open(path, _FILE_FLAGS)
    dir_fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            below = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = below
        _check_regular(os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False), max_bytes)
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def read_confined(folder: str, name: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``folder/name``.

    Raises :class:`RefusedFile` (nothing read) when ``name`` leaves the folder, is not a regular
    file, or is bigger than ``max_bytes``; :class:`FileNotFoundError` when nothing is there; any
    other :class:`OSError` when it is there but cannot be read.
    """
    root, parts = _resolve(folder, name)
    try:
        fd = _open_below(root, parts, max_bytes)
    except NotADirectoryError as exc:  # a file where the name has a folder: nothing by that name
        raise FileNotFoundError(errno.ENOENT, "no such file", os.path.join(root, *parts)) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a component became a symlink after it was resolved
            raise RefusedFile("changed into a symbolic link while it was checked") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        _check_regular(st, max_bytes)  # the file opened is the kind of file looked at
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:  # it grew while being read: read on, up to the cap
            data += fh.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise RefusedFile(f"is over the limit of {max_bytes} bytes")
    return data
