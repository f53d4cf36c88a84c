"""The flash the journal lives on: a pre-written file or a raw partition, read and written by offset.

`Flash` is the small interface the ring needs (pread, pwrite, sync); `FileFlash` is the real one and
`firmware.journal.sim.SimulatedFlash` the power-cut simulator used by the tests.

Why pre-written: overwriting blocks of a file that already exist on disk needs no metadata update, so
fdatasync after an overwrite is about twice as fast as after an append (measured on the CI machine
with ext4 on a virtual disk). A new journal file is therefore filled with zeros and synced once, up front.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
import threading
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

from firmware.atomic import fsync_dir

log = logging.getLogger(__name__)

_BLKGETSIZE64 = 0x80081272  # linux/fs.h: _IOR(0x12, 114, size_t)
_PREWRITE_CHUNK = 1 << 20


@runtime_checkable
class Flash(Protocol):
    """Byte-addressed storage with an explicit durability point."""

    @property
    def size(self) -> int: ...

    def pread(self, length: int, offset: int) -> bytes:
        """Exactly `length` bytes at `offset`, or OSError (outside the device, a short read, closed)."""
        ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of `data`; it is durable only after the next `sync()`. Bytes outside the device
        are refused with OSError before anything is written (a file never grows)."""
        ...

    def sync(self) -> None:
        """Make every write completed before it started durable (fdatasync). A flash with a
        `parallel_syncs` attribute > 1 allows that many syncs at once from different threads, each
        reporting the write errors of what it covered."""
        ...

    def close(self) -> None:
        """Release the device; every later pread, pwrite or sync raises OSError; closing twice is harmless."""
        ...


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


class FileFlash:
    """A journal device: a regular file (pre-written) or a block device, accessed with pread/pwrite.

    Syncs may overlap (`parallel_syncs`): each runs fdatasync on a descriptor of its own, all opened
    with the device. Linux reports a write-back error once to every open file description that was
    open when it happened, so each sync hears of a failed write it covered, even if another sync
    that ran at the same time heard of it first (one shared descriptor would tell only one of them)."""

    parallel_syncs = 4

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        # one descriptor per sync in flight, plus one for a checkpoint's sync beside them; opened now,
        # before anything is written, so each hears of every write-back error from the start
        self._sync_fds: list[int] = []
        self._sync_free = threading.Condition()
        try:
            for _ in range(self.parallel_syncs + 1):
                self._sync_fds.append(os.open(self.path, os.O_RDWR | os.O_CLOEXEC))
        except OSError:
            self._close_fds()
            raise
        self._free_fds = list(self._sync_fds)
        st = os.fstat(self._fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if self.is_block_device:
            import fcntl

            buf = fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8)
            self._size = int(struct.unpack("=Q", buf)[0])
        elif stat.S_ISREG(st.st_mode):
            self._size = st.st_size
        else:
            self._close_fds()
            raise OSError(errno.EINVAL, f"{self.path} is neither a regular file nor a block device")

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int) -> FileFlash:
        """Create a file of `size` bytes filled with zeros and synced, atomically: it is written as
        `<path>.tmp`, synced, renamed into place and the directory synced, so a crash never leaves a
        half-made journal under the real name."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            zeros = bytes(_PREWRITE_CHUNK)
            off = 0
            while off < size:
                n = os.pwrite(fd, zeros[: min(_PREWRITE_CHUNK, size - off)], off)
                off += n
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        fsync_dir(p.parent)
        log.info("created pre-written journal file path=%s size=%d", p, size)
        return cls(p)

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int, what: str, code: int) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, f"{self.path}: {what} on a closed journal device")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OSError(code, f"{self.path}: {what} beyond the device: {offset}+{length} > {self._size}")

    def pread(self, length: int, offset: int) -> bytes:
        self._check(offset, length, "read", errno.EIO)
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            raise OSError(errno.EIO, f"short read at offset {offset}: {len(data)} of {length} bytes")
        return data

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view), "write", errno.ENOSPC)
        while view:
            n = os.pwrite(self._fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: write at offset {offset} made no progress")
            view = view[n:]
            offset += n

    def pwritev(self, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
        """`pwrite` of the concatenation of `buffers` without joining them (one `os.pwritev` system
        call, at most `IOV_MAX` buffers each)."""
        total = 0
        for b in buffers:
            total += len(b)
        self._check(offset, total, "write", errno.ENOSPC)
        if len(buffers) <= _IOV_MAX:  # the usual case: one system call
            n = os.pwritev(self._fd, buffers, offset)
            if n < total:  # a partial write (rare on a file): the rest from where it stopped
                self._rest(buffers, n, offset)
            return
        at = 0
        while at < len(buffers):
            group = buffers[at:at + _IOV_MAX]
            at += len(group)
            want = sum(len(b) for b in group)
            n = os.pwritev(self._fd, group, offset)
            if n < want:
                self._rest(group, n, offset)
            offset += want

    def _rest(self, buffers: list[bytes | bytearray | memoryview], done: int, offset: int) -> None:
        """After a partial `pwritev` of `done` bytes at `offset`: the rest of `buffers`."""
        if done <= 0:
            raise OSError(errno.EIO, f"{self.path}: write at offset {offset} made no progress")
        self.pwrite(memoryview(b"".join(buffers))[done:], offset + done)

    def sync(self) -> None:
        self._check(0, 0, "sync", errno.EIO)
        with self._sync_free:
            while not self._free_fds:
                self._sync_free.wait()
            fd = self._free_fds.pop()
        try:
            os.fdatasync(fd)
        finally:
            with self._sync_free:
                self._free_fds.append(fd)
                self._sync_free.notify()

    def fileno(self) -> int:
        return self._fd

    def _close_fds(self) -> None:
        for fd in (self._fd, *self._sync_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sync_fds = []

    def close(self) -> None:
        if self._fd >= 0:
            self._close_fds()
            self._fd = -1

    def __enter__(self) -> FileFlash:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
