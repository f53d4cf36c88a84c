"""The block-storage contract the SCSI target executes against, and the errors it may raise.

`BlockStore` is implemented by `firmware.volume.Volume` (a plain file or block device) and by
`firmware.local_unit.LocalUnit` (journal first, then the local volume, with the acknowledgement
policy). The SCSI target maps each `StorageError` to the sense data named on the class.

Durability contract (docs/ARCHITECTURE.md, docs/SCSI.md): `write()` returns only when the data is where the write-cache
mode promises. With the write cache off it is durable; with it on it may sit in RAM until the next
`flush()` or a `write(..., fua=True)`, which return only once everything before them is durable.
"""

from __future__ import annotations

import errno
from typing import Protocol, runtime_checkable

from firmware.sense_codes import Asc, SenseKey


class StorageError(Exception):
    """A failure the host must hear about as SCSI sense (key, ASC, ASCQ)."""

    sense_key: int = SenseKey.HARDWARE_ERROR
    asc: int = Asc.INTERNAL_TARGET_FAILURE.asc
    ascq: int = Asc.INTERNAL_TARGET_FAILURE.ascq


class ReadError(StorageError):
    """The medium could not be read: MEDIUM ERROR, UNRECOVERED READ ERROR."""

    sense_key, asc, ascq = SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR.asc, Asc.UNRECOVERED_READ_ERROR.ascq


class WriteError(StorageError):
    """The medium could not be written: MEDIUM ERROR, WRITE ERROR."""

    sense_key, asc, ascq = SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR.asc, Asc.WRITE_ERROR.ascq


class SpaceExhausted(StorageError):
    """No space left behind the volume (a sparse file on a full disk):
    DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3 4.7.3.6)."""

    sense_key = SenseKey.DATA_PROTECT
    asc, ascq = Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT.asc, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT.ascq


class WriteProtected(StorageError):
    """The store is read-only: DATA PROTECT, WRITE PROTECTED."""

    sense_key, asc, ascq = SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED.asc, Asc.WRITE_PROTECTED.ascq


class NotReady(StorageError):
    """The store is temporarily unavailable (e.g. recovering): NOT READY, LOGICAL UNIT NOT READY,
    CAUSE NOT REPORTABLE."""

    sense_key = SenseKey.NOT_READY
    asc = Asc.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE.asc
    ascq = Asc.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE.ascq


def storage_error(exc: OSError, what: str) -> StorageError:
    """The StorageError the host hears for an OSError met doing `what` (a text such as
    "read at lba 8" or "state file /x"): no space is SpaceExhausted, a read-only or refused file
    WriteProtected, a failed read (`what` starts with "read") ReadError, anything else WriteError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpaceExhausted(f"{what}: {exc.strerror}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return WriteProtected(f"{what}: {exc.strerror}")
    if what.startswith("read"):
        return ReadError(f"{what}: {exc.strerror}")
    return WriteError(f"{what}: {exc.strerror}")


@runtime_checkable
class BlockStore(Protocol):
    """Fixed-size array of logical blocks. All addresses are in logical blocks.

    The caller (the SCSI target) has already checked that `lba + count <= num_blocks`; a store still
    refuses a range outside itself (or data that is not a whole number of blocks) with `ValueError`
    and touches nothing. A fresh store reads as zeros. Every implementation passes the conformance
    suite `host_tests/test_conformance_blockstore.py` before it is used.
    """

    @property
    def block_size(self) -> int:
        """Logical block size in bytes: 512 or 4096."""
        ...

    @property
    def num_blocks(self) -> int:
        """Number of logical blocks."""
        ...

    @property
    def write_cache(self) -> bool:
        """True when writes may be acknowledged before they are durable (SCSI caching page WCE)."""
        ...

    @property
    def read_only(self) -> bool:
        """True when the store refuses every `write()` and `unmap()` with `WriteProtected` (reads and
        `flush()` still work): the SCSI target then reports the disk write-protected (WP in the mode
        pages) and answers every write with DATA PROTECT, WRITE PROTECTED."""
        ...

    def set_write_cache(self, enabled: bool) -> None:
        """Switch the write cache (MODE SELECT of the caching page). Turning it off flushes first."""
        ...

    def read(self, lba: int, count: int) -> bytes:
        """Return `count` blocks starting at `lba`; always the newest data written."""
        ...

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        """Write `len(data) // block_size` blocks. With `fua`, returns once this write and every
        write before it is durable (FUA is also a consistency point)."""
        ...

    def flush(self) -> None:
        """SYNCHRONIZE CACHE: returns once every write acknowledged before it is durable."""
        ...

    def unmap(self, lba: int, count: int) -> None:
        """Discard blocks; they read back as zeros afterwards (LBPRZ=1)."""
        ...
