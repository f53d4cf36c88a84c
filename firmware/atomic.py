"""Crash-safe file writing, used for every small state file of the project.

`write_atomically` writes a temporary file beside the target, fsyncs it, renames it into place and
fsyncs the directory, so a crash leaves either the old or the new content under the real name;
`fsync_dir` makes a directory's entries (a file created, renamed or removed in it) durable.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_atomically"]


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `path` so that a crash leaves either the old or the new content: tmp, fsync, rename,
    fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a file created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
