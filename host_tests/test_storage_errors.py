"""The one OSError -> StorageError mapping (used by the volume and the remote's target store) and
the sense each storage error puts before the host."""

from __future__ import annotations

import errno

import pytest

from firmware.storage import (
    NotReady,
    ReadError,
    SpaceExhausted,
    StorageError,
    WriteError,
    WriteProtected,
    storage_error,
)


@pytest.mark.parametrize(("code", "what", "cls"), [
    (errno.ENOSPC, "write lba=0 count=1", SpaceExhausted),
    (errno.EDQUOT, "state file /s", SpaceExhausted),
    (errno.EROFS, "write lba=0 count=1", WriteProtected),
    (errno.EACCES, "read lba=0 count=1", WriteProtected),
    (errno.EPERM, "flush", WriteProtected),
    (errno.EIO, "read lba=8 count=2", ReadError),
    (errno.EIO, "write lba=8 count=2", WriteError),
    (errno.EIO, "undo log /u", WriteError),
])  # fmt: skip
def test_oserror_maps_to_the_storage_error_the_host_hears(code: int, what: str, cls: type[StorageError]) -> None:
    err = storage_error(OSError(code, "boom"), what)
    assert type(err) is cls
    assert str(err) == f"{what}: boom"


@pytest.mark.parametrize(("cls", "sense"), [
    (StorageError, (0x04, 0x44, 0x00)),  # HARDWARE ERROR, INTERNAL TARGET FAILURE
    (ReadError, (0x03, 0x11, 0x00)),  # MEDIUM ERROR, UNRECOVERED READ ERROR
    (WriteError, (0x03, 0x0C, 0x00)),  # MEDIUM ERROR, WRITE ERROR
    (SpaceExhausted, (0x07, 0x27, 0x07)),  # DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT
    (WriteProtected, (0x07, 0x27, 0x00)),  # DATA PROTECT, WRITE PROTECTED
    (NotReady, (0x02, 0x04, 0x00)),  # NOT READY, LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE
])  # fmt: skip
def test_each_storage_error_names_its_sense(cls: type[StorageError], sense: tuple[int, int, int]) -> None:
    assert (cls.sense_key, cls.asc, cls.ascq) == sense
