"""A remote unit's target on disk: the volume, its state file and the resync undo log.

The I/O half of a target; `firmware.replication.target.TargetSession` decides, `TargetStore` does.

- State file `<state_dir>/<source id>.json`: `TargetState`, written tmp + fsync + rename + fsync(dir).
- Undo log `<state_dir>/<source id>.undo`: the pre-resync contents of every 64 KiB chunk a resync
  overwrites, fsynced before the target changes (`UndoLog`), so an incomplete resync can be rolled back.
- Apply: `apply(records)` and `copy_region(lba, data)` are the only calls that overwrite target blocks.

Hook point "before a record overwrites blocks": each registered `ApplyHook` is called, in order,
before the blocks change: `before_apply(records, read)` for a batch of records (WRITE, UNMAP, FLUSH
and any other kind, in journal order; `read(lba, count)` reads the target as it is now),
`before_region(lba, count, read)` for resync data and `resync_begin(base_seq, time_ns)` when a resync
starts. A hook that raises stops the apply: nothing of that batch is written (the connection ends and
the source sends the batch again). The resync undo log is such a hook (`ResyncUndo`); undo history
is another (`TargetStore.add_hook`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

import google_crc32c

from firmware.atomic import fsync_dir, write_atomically
from firmware.journal.format import RecordKind
from firmware.link import protocol as jp
from firmware.replication.target import TargetState
from firmware.storage import WriteError, storage_error
from firmware.volume import Volume

log = logging.getLogger(__name__)

UNDO_CHUNK_BYTES = 64 << 10
_UNDO_ENTRY = struct.Struct(">QII")  # lba, byte length, crc32c of the data

Reader = Callable[[int, int], bytes]
VolumeFactory = Callable[[str, int, int], Volume]


class ApplyHook(Protocol):
    """Called before target blocks are overwritten (see the module docstring)."""

    def before_apply(self, records: Sequence[jp.RecordLike], read: Reader) -> None: ...
    def before_region(self, lba: int, count: int, read: Reader) -> None: ...
    def resync_begin(self, base_seq: int, time_ns: int) -> None: ...


def save_json_durably(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, sort_keys=True).encode())


def target_fingerprint(path: str) -> str:
    """Identify the file or disk behind `path`: a regular file by device and inode, a block device by
    its WWID or serial when the kernel knows one (else major:minor and size)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if not stat.S_ISBLK(st.st_mode):
        return f"file:{st.st_dev}:{st.st_ino}"
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sysdir = Path(f"/sys/dev/block/{major}:{minor}")
    for rel in ("device/wwid", "device/serial", "../device/wwid", "../device/serial", "md/uuid", "dm/uuid"):
        with contextlib.suppress(OSError):
            ident = (sysdir / rel).read_text().strip()
            if ident:
                part = (sysdir / "partition").read_text().strip() if (sysdir / "partition").exists() else "0"
                return f"blk:{ident}:p{part}"
    size = ""
    with contextlib.suppress(OSError):
        size = (sysdir / "size").read_text().strip()
    return f"blk:{major}:{minor}:{size}"


def open_target(path: str, size: int, block_size: int) -> Volume:
    p = Path(path)
    if p.exists() and not p.is_file():
        return Volume(p, block_size=block_size)  # a block device: may be larger than the volume
    return Volume(p, size=size, block_size=block_size)


class UndoLog:
    """Saved pre-resync contents, one copy per chunk, fsynced before the target is overwritten."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.path = path
        self.chunk_blocks = max(1, UNDO_CHUNK_BYTES // block_size)
        self.block_size = block_size
        self.saved: set[int] = set()
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if created:
            fsync_dir(path.parent)  # the state file already says an undo log exists: it must survive a crash
        self._end = 0
        for lba, _data in self.entries():
            self.saved.add(lba // self.chunk_blocks)
        os.ftruncate(self._fd, self._end)  # drop a torn tail entry

    def entries(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        off = 0
        while True:
            head = os.pread(self._fd, _UNDO_ENTRY.size, off)
            if len(head) < _UNDO_ENTRY.size:
                break
            lba, n, crc = _UNDO_ENTRY.unpack(head)
            data = os.pread(self._fd, n, off + _UNDO_ENTRY.size)
            if len(data) < n or google_crc32c.value(data) != crc:
                break
            out.append((lba, data))
            off += _UNDO_ENTRY.size + n
        self._end = off
        return out

    def protect(self, vol: Volume, num_blocks: int, lba: int, count: int) -> None:
        """Save every chunk of [lba, lba+count) not saved yet; durable before returning."""
        first, last = lba // self.chunk_blocks, (lba + max(count, 1) - 1) // self.chunk_blocks
        parts: list[bytes] = []
        for c in range(first, last + 1):
            if c in self.saved:
                continue
            start = c * self.chunk_blocks
            n = min(self.chunk_blocks, num_blocks - start)
            if n <= 0:
                continue
            data = vol.read(start, n)
            parts.append(_UNDO_ENTRY.pack(start, len(data), google_crc32c.value(data)))
            parts.append(data)
            self.saved.add(c)
        if parts:
            try:
                os.write(self._fd, b"".join(parts))
                os.fsync(self._fd)
            except OSError as exc:
                raise storage_error(exc, f"undo log {self.path}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TargetStore:
    """One source id's target: its volume, state file, undo log and apply hooks.

    Used by one replicating connection at a time; a verify connection only reads digests."""

    def __init__(self, source_id: str, path: str, state_dir: str, volume_factory: VolumeFactory | None = None) -> None:
        self.source_id = source_id
        self.path = path
        self.state_path = Path(state_dir) / f"{source_id}.json"
        self.undo_path = Path(state_dir) / f"{source_id}.undo"
        self.volume_factory = volume_factory or open_target
        self.volume: Volume | None = None
        self.undo: UndoLog | None = None
        self.target_id = ""
        self.num_blocks = 0
        self.hooks: list[ApplyHook] = []
        # called by make_durable after the target is synced and before the state file is written;
        # each returns keys kept in the state file beside the TargetState (`extra_state`): a relay
        # makes its journal durable there (firmware/relay.py)
        self.durable_hooks: list[Callable[[int], dict[str, Any]]] = []
        self.extra_state: dict[str, Any] = {}
        self.save_lock = threading.Lock()

    # -- state file -------------------------------------------------------------------------------
    def load_state(self) -> TargetState:
        try:
            raw = json.loads(self.state_path.read_text())
            fields = TargetState.__dataclass_fields__
            self.extra_state = {k: v for k, v in raw.items() if k not in fields}
            return TargetState(**{k: v for k, v in raw.items() if k in fields})
        except FileNotFoundError:
            return TargetState(self.source_id)

    def save_state(self, state: TargetState) -> None:
        with self.save_lock:
            self._save_locked(state)

    def _save_locked(self, state: TargetState) -> None:
        try:
            save_json_durably(self.state_path, {**self.extra_state, **asdict(state)})
        except OSError as exc:
            raise storage_error(exc, f"state file {self.state_path}") from exc

    # -- volume -----------------------------------------------------------------------------------
    def open(self, volume_size: int, block_size: int) -> Volume:
        """Open (or reopen, if the block size or the file behind the path changed) the target.
        Raises VolumeError or StorageError."""
        num_blocks = volume_size // block_size
        fp = target_fingerprint(self.path)
        if self.volume is not None and (self.volume.block_size != block_size
                                        or self.volume.num_blocks < num_blocks or fp != self.target_id):
            self.volume.close()
            self.volume = None
        if self.volume is None:
            self.volume = self.volume_factory(self.path, volume_size, block_size)
            self.volume.set_write_cache(True)  # synced once per acknowledged position
            fp = target_fingerprint(self.path)  # a file created just now has its inode only now
        self.target_id = fp
        self.num_blocks = num_blocks
        return self.volume

    def _vol(self) -> Volume:
        if self.volume is None:
            raise WriteError(f"target {self.path} is not open")
        return self.volume

    def add_hook(self, hook: ApplyHook) -> None:
        self.hooks.append(hook)

    def _read(self, lba: int, count: int) -> bytes:
        return self._vol().read(lba, count)

    def apply(self, records: Sequence[jp.RecordLike]) -> None:
        """Write records to the target in order (not yet durable). The hooks run first."""
        vol = self._vol()
        for hook in self.hooks:
            hook.before_apply(records, self._read)
        undo = self.undo
        for r in records:
            kind = r.kind
            if kind == RecordKind.WRITE:
                if undo is not None:
                    undo.protect(vol, self.num_blocks, r.lba, r.count)
                vol.write_nosync(r.lba, r.payload)
            elif kind == RecordKind.UNMAP:
                if undo is not None:
                    undo.protect(vol, self.num_blocks, r.lba, r.count)
                vol.unmap(r.lba, r.count)

    def copy_region(self, lba: int, data: bytes) -> None:
        vol = self._vol()
        count = len(data) // vol.block_size
        for hook in self.hooks:
            hook.before_region(lba, count, self._read)
        if self.undo is not None:
            self.undo.protect(vol, self.num_blocks, lba, count)
        vol.write_nosync(lba, data)

    def resync_begins(self, base_seq: int) -> None:
        for hook in self.hooks:
            hook.resync_begin(base_seq, time.time_ns())

    def digests(self, first_region: int, count: int, region_blocks: int) -> tuple[bytes, ...]:
        vol = self._vol()
        total = (self.num_blocks + region_blocks - 1) // region_blocks
        out: list[bytes] = []
        for i in range(first_region, min(first_region + count, total)):
            lba = i * region_blocks
            out.append(jp.region_digest(vol.read(lba, min(region_blocks, self.num_blocks - lba))))
        return tuple(out)

    def sync(self) -> None:
        self._vol().flush()

    def make_durable(self, state: TargetState, seq: int) -> None:
        """Sync the target, then store `seq` as the durable position (state file)."""
        self._vol().flush()
        for hook in self.durable_hooks:
            self.extra_state.update(hook(seq))
        # the copy of the live state is taken under the lock: a write limit raised meanwhile by the
        # receive path (saved before its records are written) is never overwritten by an older one
        with self.save_lock:
            if seq > state.applied_seq:
                self._save_locked(replace(state, applied_seq=seq))

    # -- undo log ---------------------------------------------------------------------------------
    def undo_discard(self) -> None:
        if self.undo is not None:
            self.undo.close()
            self.undo = None
        self.undo_path.unlink(missing_ok=True)

    def undo_open(self, block_size: int) -> None:
        if self.undo is None:
            self.undo = UndoLog(self.undo_path, block_size)

    def rollback(self, state: TargetState, before: Callable[[int, int], object] | None = None) -> bool:
        """Restore the pre-resync image from the undo log. False when there is none. `before(lba,
        count)` is told of each range before it is written (a relay marks it for its next hop)."""
        if not self.undo_path.exists():
            return False
        bs = state.block_size
        vol = self.volume or open_target(self.path, state.num_blocks * bs, bs)
        undo = self.undo or UndoLog(self.undo_path, bs)
        for lba, data in undo.entries():
            if before is not None:
                before(lba, len(data) // bs)
            vol.write_nosync(lba, data)
        vol.flush()
        undo.close()
        self.undo = None
        if self.volume is None:
            vol.close()
        return True

    def close(self) -> None:
        if self.undo is not None:
            self.undo.close()
            self.undo = None
        if self.volume is not None:
            self.volume.close()
            self.volume = None
