"""Block storage on a file (created sparse at the requested size) or on a block device.

`Volume` implements `firmware.storage.BlockStore` with no cache of its own: a write goes to the
page cache with `os.pwrite` and is durable after `flush()` (fdatasync), or at once with `fua=True`.
With `write_cache=False` every write is followed by fdatasync before it returns.

What it does not do: journaling, replication or any ordering beyond the kernel's. Those belong to
`firmware.local_unit`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from firmware.storage import ReadError, WriteProtected, storage_error

log = logging.getLogger(__name__)

VALID_BLOCK_SIZES = (512, 4096)
# BLKGETSIZE64 from linux/fs.h: _IOR(0x12, 114, size_t)
_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277  # _IO(0x12, 119)


class VolumeError(Exception):
    """The volume cannot be opened as asked (wrong size, bad block size, not a file/device)."""


def parse_size(text: str) -> int:
    """Parse a size such as `4096`, `64M`, `64MiB`, `2G`, `3TiB` into bytes (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num = t.rstrip("KMGTP")
    unit = t[len(num):]
    if not num or unit not in units:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G, 3T)")
    try:
        value = int(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G, 3T)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value * units[unit]


class Volume:
    """A fixed-size block volume backed by a regular file or a block device."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        block_size: int = 512,
        write_cache: bool = False,
        create: bool = True,
        read_only: bool = False,
    ) -> None:
        if block_size not in VALID_BLOCK_SIZES:
            raise VolumeError(f"block size must be 512 or 4096, not {block_size}")
        self.path = Path(path)
        self._block_size = block_size
        self._write_cache = write_cache
        self.read_only = read_only
        self.is_block_device = False
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if self.path.exists():
            st = self.path.stat()
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if not self.is_block_device and not stat.S_ISREG(st.st_mode):
                raise VolumeError(f"{self.path} is neither a regular file nor a block device")
            if self.is_block_device and not read_only:
                flags |= os.O_EXCL  # Linux: EBUSY when mounted or held exclusively elsewhere
            try:
                self._fd = os.open(self.path, flags | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise VolumeError(f"{self.path} is busy (mounted or in use by another program)") from None
                raise
            actual = self._device_size() if self.is_block_device else st.st_size
            if size is None:
                size = actual
            elif self.is_block_device and size > actual:
                os.close(self._fd)
                raise VolumeError(f"{self.path} holds {actual} bytes, fewer than the {size} asked for")
            elif not self.is_block_device and actual != size:
                if actual == 0 and not read_only:
                    os.ftruncate(self._fd, size)
                else:
                    os.close(self._fd)
                    raise VolumeError(
                        f"{self.path} is {actual} bytes but {size} were asked for; refusing to resize"
                        " a volume that holds data (give the existing size or a new path)"
                    )
        else:
            if not create or read_only:
                raise VolumeError(f"{self.path} does not exist")
            if size is None:
                raise VolumeError(f"{self.path} does not exist and no size was given to create it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(self._fd, size)  # sparse
            log.info("created sparse volume path=%s size=%d", self.path, size)
        if size % block_size:
            os.close(self._fd)
            raise VolumeError(f"size {size} is not a multiple of the block size {block_size}")
        self._lock_exclusively()
        self._num_blocks = size // block_size

    def _lock_exclusively(self) -> None:
        """Two units serving one volume would corrupt it: hold an exclusive lock while open.
        (flock is per open file, so this also refuses a second open in the same process.)"""
        import fcntl

        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise VolumeError(f"{self.path} is in use by another process (it holds a lock on it)") from None

    def _device_size(self) -> int:
        import fcntl
        import struct

        buf = fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("=Q", buf)[0])

    # -- BlockStore -------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def size_bytes(self) -> int:
        return self._num_blocks * self._block_size

    @property
    def write_cache(self) -> bool:
        return self._write_cache

    def set_write_cache(self, enabled: bool) -> None:
        if self._write_cache and not enabled:
            self.flush()
        self._write_cache = enabled

    def _check(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > self._num_blocks:
            raise ValueError(f"blocks {lba}+{count} outside volume of {self._num_blocks}")

    def read(self, lba: int, count: int) -> bytes:
        self._check(lba, count)
        want = count * self._block_size
        try:
            data = os.pread(self._fd, want, lba * self._block_size)
        except OSError as exc:
            raise storage_error(exc, f"read lba={lba} count={count}") from exc
        if len(data) < want:  # a block device shorter than promised, or a truncated file
            raise ReadError(f"short read at lba={lba}: {len(data)} of {want} bytes")
        return data

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        if len(data) % self._block_size:
            raise ValueError("data is not a whole number of blocks")
        self.write_nosync(lba, data)
        if fua or not self._write_cache:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise storage_error(exc, f"write lba={lba} count={len(data) // self._block_size}") from exc

    def write_nosync(self, lba: int, data: bytes) -> None:
        """Write without any sync, for callers that order durability themselves (the journal
        applier syncs the volume before it lets the journal forget a record)."""
        count = len(data) // self._block_size
        self._check(lba, count)
        if self.read_only:
            raise WriteProtected(f"{self.path} is read-only")
        try:
            off = lba * self._block_size
            n = os.pwrite(self._fd, data, off)
            if n < len(data):  # a short write (rare): the rest, through a view, not a copy
                view = memoryview(data)[n:]
                off += n
                while view:
                    n = os.pwrite(self._fd, view, off)
                    view = view[n:]
                    off += n
        except OSError as exc:
            raise storage_error(exc, f"write lba={lba} count={count}") from exc

    def flush(self) -> None:
        if self.read_only:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise storage_error(exc, "flush") from exc

    def unmap(self, lba: int, count: int) -> None:
        self._check(lba, count)
        if self.read_only:
            raise WriteProtected(f"{self.path} is read-only")
        off, length = lba * self._block_size, count * self._block_size
        try:
            if self.is_block_device:
                import fcntl
                import struct

                try:
                    fcntl.ioctl(self._fd, _BLKDISCARD, struct.pack("=QQ", off, length))
                    # a discarded range on a device without LBPRZ may not read back as zeros
                    if any(self.read(lba, min(count, 8))):
                        raise OSError(errno.EOPNOTSUPP, "discard does not zero")
                except OSError:
                    _write_zeros(self._fd, off, length)
            else:
                # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: frees the space, reads back as zeros
                _punch_hole(self._fd, off, length)
            if not self._write_cache:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise storage_error(exc, f"unmap lba={lba} count={count}") from exc

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            try:
                if not self.read_only:
                    os.fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Volume:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _write_zeros(fd: int, off: int, length: int) -> None:
    chunk = bytes(min(length, 1 << 20))
    while length:
        n = os.pwrite(fd, chunk[: min(length, len(chunk))], off)
        off += n
        length -= n


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    """libc's fallocate(2), looked up once (finding libc runs a helper program)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate


def _punch_hole(fd: int, off: int, length: int) -> None:
    import ctypes

    punch_hole, keep_size = 0x02, 0x01
    if _fallocate()(fd, punch_hole | keep_size, off, length) != 0:
        e = ctypes.get_errno()
        if e in (errno.EOPNOTSUPP, errno.ENOSYS):
            _write_zeros(fd, off, length)
            return
        raise OSError(e, os.strerror(e))
