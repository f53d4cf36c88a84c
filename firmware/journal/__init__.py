"""The local unit's write journal on flash: record format, flash devices, the ring and recovery.

`Journal` is the ring (see `firmware.journal.ring`), `JournalRecord`/`RecordKind` what consumers
read, `firmware.journal.format` the on-flash layout (docs/JOURNAL.md), `firmware.journal.sim` the
power-cut simulator used by the tests.
"""

from firmware.journal.flash import FileFlash, Flash
from firmware.journal.format import (
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalRecord,
    RecordKind,
    RecordsGone,
)
from firmware.journal.ring import Journal, RecoveryReport

__all__ = [
    "FileFlash",
    "Flash",
    "Journal",
    "JournalCorrupt",
    "JournalError",
    "JournalFull",
    "JournalRecord",
    "RecordKind",
    "RecordsGone",
    "RecoveryReport",
]
