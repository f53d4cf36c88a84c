"""Test kit for the journey link: an in-memory journal and local unit with the journal's API (and its
record, RecordsGone and DirtySnapshot types), a fault-injecting TCP proxy, and helpers to run a remote
unit and a replicator."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.journal import JournalRecord, RecordKind, RecordsGone
from firmware.journal.bitmap import DirtySnapshot
from firmware.replication.source import RECORD_OVERHEAD
from firmware.volume import Volume


class FakeJournal:
    """In-memory journal: durable at once, drops records only when told (overflow simulation)."""

    def __init__(self, unit_uuid: uuid.UUID | None = None) -> None:
        self.unit_uuid = unit_uuid or uuid.uuid4()
        self.generation = 1
        self.records: list[JournalRecord] = []
        self.tail_seq = 1  # first seq still held
        self.cond = threading.Condition()
        self.consumers_: dict[str, int] = {}
        self.confirm_calls: list[tuple[str, int]] = []
        self.listeners: list[Callable[[], None]] = []

    @property
    def head_seq(self) -> int:
        return self.records[-1].seq if self.records else self.tail_seq - 1

    @property
    def durable_seq(self) -> int:
        return self.head_seq

    def append(self, kind: RecordKind, lba: int, count: int, payload: bytes = b"") -> int:
        with self.cond:
            rec = JournalRecord(self.head_seq + 1, kind, lba, count, time.time_ns(), payload)
            self.records.append(rec)
            self.cond.notify_all()
            for listener in self.listeners:
                listener()
            return rec.seq

    def register_consumer(self, name: str) -> int:
        """A known consumer's confirmed position; a new one starts at the head (like the ring)."""
        with self.cond:
            return self.consumers_.setdefault(name, self.head_seq)

    def unregister_consumer(self, name: str) -> None:
        self.consumers_.pop(name, None)

    def consumers(self) -> dict[str, int]:
        return dict(self.consumers_)

    def confirm(self, name: str, seq: int) -> None:
        with self.cond:
            if name not in self.consumers_:
                raise KeyError(f"unknown journal consumer {name!r}")
            if seq > self.durable_seq:
                raise ValueError(f"consumer {name!r} confirms seq {seq} beyond durable seq {self.durable_seq}")
            self.confirm_calls.append((name, seq))
            self.consumers_[name] = max(self.consumers_[name], seq)

    def release_through(self, seq: int) -> None:
        """The producer no longer needs records up to `seq`: drop what every consumer confirmed
        (the ring's `set_applied`)."""
        with self.cond:
            limit = min([seq, self.head_seq, *self.consumers_.values()])
            if limit + 1 > self.tail_seq:
                self.drop_before(limit + 1)

    def drop_before(self, seq: int) -> None:
        """Forget records below seq (what an overflow does to a lagging consumer)."""
        with self.cond:
            self.records = [r for r in self.records if r.seq >= seq]
            self.tail_seq = seq

    def read_records(self, after_seq: int, max_bytes: int) -> list[JournalRecord]:
        with self.cond:
            if after_seq + 1 < self.tail_seq:
                raise RecordsGone(f"records after {after_seq} are gone")
            out: list[JournalRecord] = []
            size = 0
            start = after_seq + 1 - self.tail_seq
            for r in self.records[max(0, start):]:
                if out and size + len(r.payload) + RECORD_OVERHEAD > max_bytes:
                    break
                out.append(r)
                size += len(r.payload) + RECORD_OVERHEAD
            return out

    def add_durable_listener(self, listener: Callable[[], None]) -> None:
        with self.cond:
            self.listeners.append(listener)

    def remove_durable_listener(self, listener: Callable[[], None]) -> None:
        with self.cond:
            if listener in self.listeners:
                self.listeners.remove(listener)

    def wait_for_records(self, after_seq: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.head_seq > after_seq, timeout)

    def timestamp_of(self, seq: int) -> int | None:
        with self.cond:
            i = seq - self.tail_seq
            return self.records[i].timestamp_ns if 0 <= i < len(self.records) else None


class FakeLocalUnit:
    """Journal first, then the volume (reads see the newest data); while `overflow` is set, writes
    go straight to the volume and mark their regions dirty, like firmware.local_unit.LocalUnit."""

    def __init__(self, volume: Volume, journal: FakeJournal, region_blocks: int = 128) -> None:
        self.volume = volume
        self.journal = journal
        self.region_blocks = region_blocks
        self.overflow = False
        self.stamp = 0
        self.dirty: dict[int, int] = {}
        self.gates: list[Callable[[int], None]] = []
        self.lock = threading.Lock()
        self.cleared: list[DirtySnapshot] = []
        self.epochs: list[tuple[int, int, int]] = []  # (first stamp, head, head) per run of dirty writes

    @property
    def block_size(self) -> int:
        return self.volume.block_size

    @property
    def num_blocks(self) -> int:
        return self.volume.num_blocks

    def read(self, lba: int, count: int) -> bytes:
        with self.lock:
            return self.volume.read(lba, count)

    def _mark(self, lba: int, count: int) -> None:
        head = self.journal.head_seq
        if not self.epochs or self.epochs[-1][1:] != (head, head):
            self.epochs.append((self.stamp + 1, head, head))
        self.stamp += 1
        for r in range(lba // self.region_blocks, (lba + max(count, 1) - 1) // self.region_blocks + 1):
            self.dirty[r] = self.stamp

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        count = len(data) // self.block_size
        with self.lock:
            if self.overflow:
                self._mark(lba, count)
                self.volume.write_nosync(lba, data)
                return
            seq = self.journal.append(RecordKind.WRITE, lba, count, data)
            self.volume.write_nosync(lba, data)
        for g in self.gates:
            g(seq)

    def unmap(self, lba: int, count: int) -> None:
        with self.lock:
            if self.overflow:
                self._mark(lba, count)
                self.volume.unmap(lba, count)
                return
            seq = self.journal.append(RecordKind.UNMAP, lba, count)
            self.volume.unmap(lba, count)
        for g in self.gates:
            g(seq)

    def flush(self) -> None:
        with self.lock:
            if self.overflow:
                return
            seq = self.journal.append(RecordKind.FLUSH, 0, 0)
        for g in self.gates:
            g(seq)

    def add_sync_gate(self, gate: Callable[[int], None]) -> None:
        self.gates.append(gate)

    def remove_sync_gate(self, gate: Callable[[int], None]) -> None:
        if gate in self.gates:
            self.gates.remove(gate)

    def dirty_snapshot(self) -> DirtySnapshot:
        with self.lock:
            idx = tuple(sorted(self.dirty))
            rb = self.region_blocks
            return DirtySnapshot(self.stamp, tuple((i * rb, rb) for i in idx), idx)

    def clear_dirty(self, snap: DirtySnapshot) -> int:
        with self.lock:
            gone = [r for r in snap.region_indices if self.dirty.get(r, snap.token + 1) <= snap.token]
            for r in gone:
                del self.dirty[r]
            self.cleared.append(snap)
            if not self.dirty:
                self.epochs.clear()
            return len(gone)

    def dirty_runs(self) -> tuple[int, tuple[tuple[int, int, int], ...]]:
        """As LocalUnit.dirty_runs: (the stamp now, (first stamp, lo, hi) per run of dirty writes)."""
        with self.lock:
            return (self.stamp, tuple(self.epochs)) if self.dirty else (0, ())


class FaultProxy:
    """A TCP proxy on loopback that can drop connections, corrupt bytes, or blackhole traffic."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.blackhole = False
        self.drop_after_bytes: int | None = None  # client->server bytes, then reset (once)
        self.corrupt_at: int | None = None  # flip one client->server byte at this offset (once)
        self.corrupt_reply_at: int | None = None  # flip one server->client byte at this offset (once)
        self.forwarded = 0
        self.resets = 0
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop_ev.is_set():
            try:
                c, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.blackhole:  # a partition: the SYN gets through, nothing else does
                with self.lock:
                    self.pairs.append((c, c))
                continue
            try:
                s = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            self.connections += 1
            with self.lock:
                self.pairs.append((c, s))
            threading.Thread(target=self._pipe, args=(c, s), daemon=True).start()

    def _pipe(self, c: socket.socket, s: socket.socket) -> None:
        up = 0
        down = 0
        try:
            while not self.stop_ev.is_set():
                r, _, _ = select.select([c, s], [], [], 0.1)
                if self.blackhole:
                    continue
                for src in r:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is c:
                        if self.corrupt_at is not None and up <= self.corrupt_at < up + len(data):
                            i = self.corrupt_at - up
                            data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]
                            self.corrupt_at = None
                        if self.drop_after_bytes is not None and up + len(data) >= self.drop_after_bytes:
                            keep = self.drop_after_bytes - up
                            s.sendall(data[:keep])
                            self.drop_after_bytes = None
                            self.resets += 1
                            for sock in (c, s):
                                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                            return
                        up += len(data)
                        s.sendall(data)
                        self.forwarded += len(data)
                    else:
                        if self.corrupt_reply_at is not None and down <= self.corrupt_reply_at < down + len(data):
                            i = self.corrupt_reply_at - down
                            data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]
                            self.corrupt_reply_at = None
                        down += len(data)
                        c.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (c, s):
                with contextlib.suppress(OSError):
                    sock.close()

    def cut_all(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for c, s in pairs:
            for sock in (c, s):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self.stop_ev.set()
        self.cut_all()
        self.listener.close()
        self.thread.join(timeout=2)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(pred: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll until pred() holds (generous timeout: a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def file_bytes(path: str | os.PathLike[str], size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


@contextlib.contextmanager
def env(**_: Any) -> Iterator[None]:
    yield


@dataclass
class Setup:
    tmp: Path
    size: int = 4 << 20
    block_size: int = 512
    extras: dict[str, Any] = field(default_factory=dict)
