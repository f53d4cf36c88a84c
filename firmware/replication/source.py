"""The source session: what a source (a local unit, later a promoted remote or a relay) sends to one remote.

Sans-IO: the driver feeds it what happened (a connection came up, the peer's HELLO_REPLY, an ACK, the
clock's `now`, a connection lost) and does what it answers (send this frame, let the journal forget
up to this position, the link is dead). No socket, thread, file or clock inside.

Positions (the source side's one place for them):

- `acked_seq`: the remote's durable applied position as it last said (HELLO_REPLY or ACK). It is the
  truth: the journal is confirmed up to it and a resumed connection ships what follows it.
- `sent_seq`: the last record shipped on the current connection; `sent_seq - acked_seq` records (the
  `in_flight` batches) are in flight, bounded by `window_bytes`.

A dropped connection forgets what was in flight: the next one resumes after the position the remote
reports (records stay in the journal until acknowledged; the remote skips what it already has).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from firmware.link import protocol as jp

OPEN_END = (1 << 64) - 1  # RESYNC_END position meaning "not final yet"
RECORD_OVERHEAD = jp.RECORD_HEADER_SIZE  # bytes a record header adds on the wire


@runtime_checkable
class SourceJournal(Protocol):
    """What a source needs of its journal (the local unit's ring; a relay's received stream later)."""

    @property
    def head_seq(self) -> int: ...
    @property
    def durable_seq(self) -> int: ...
    @property
    def tail_seq(self) -> int: ...
    def register_consumer(self, name: str) -> int: ...
    def confirm(self, name: str, seq: int) -> None: ...
    def read_records(self, after_seq: int, max_bytes: int) -> Sequence[jp.RecordLike]: ...
    def wait_for_records(self, after_seq: int, timeout: float) -> bool: ...
    def add_durable_listener(self, listener: Callable[[], None]) -> None: ...
    def remove_durable_listener(self, listener: Callable[[], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class SourceIdentity:
    """What a source says about its volume in HELLO."""

    source_id: str
    volume_uuid: bytes  # 16 bytes
    volume_size: int
    block_size: int
    generation: int


class ResyncReason(enum.Enum):
    INTERRUPTED = "resume interrupted resync"
    INITIAL = "initial sync"
    REMOTE_AHEAD = "remote ahead of the journal"
    RECORDS_GONE = "records no longer in the journal"
    OVERFLOW = "journal overflow"
    OVERFLOW_CONTINUING = "journal overflow (continuing)"


# -- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Resume:
    """Stream the records after `after_seq` (the remote's durable position)."""

    after_seq: int


@dataclass(frozen=True, slots=True)
class ResyncPlan:
    """Compare `regions` (region indexes), copy those that differ, then stream records after `position` (P)."""

    reason: ResyncReason
    regions: tuple[int, ...]
    position: int


@dataclass(frozen=True, slots=True)
class Confirm:
    """The remote has every record up to `seq` durable: the journal may forget them."""

    seq: int


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    token: int


@dataclass(frozen=True, slots=True)
class LinkDead:
    reason: str


SourceAction = Resume | ResyncPlan | Confirm | SendHeartbeat | LinkDead


@dataclass(slots=True)
class InFlight:
    """One batch shipped and not yet acknowledged."""

    last_seq: int
    wire_bytes: int
    oldest_ts_ns: int


def regions_of(extents: Iterable[tuple[int, int]], region_blocks: int, total_regions: int) -> tuple[int, ...]:
    """The sorted region indexes that cover block extents (lba, count): the resync plan of a dirty bitmap."""
    idx: set[int] = set()
    for lba, count in extents:
        idx.update(range(lba // region_blocks, (lba + max(count, 1) - 1) // region_blocks + 1))
    return tuple(sorted(i for i in idx if 0 <= i < total_regions))


def dirty_plan(snapshot: tuple[int, Sequence[tuple[int, int]]] | None, *, covered_token: int | None,
               resync_open: bool, overflowing: bool, position: int, region_blocks: int,
               total_regions: int) -> ResyncPlan | None:
    """The resync plan from the dirty bitmap: the regions a journal overflow wrote straight to the
    local volume that this remote does not have yet (`snapshot` = (token, extents) of the bitmap now;
    `covered_token`: the newest snapshot the remote already holds). A round while the overflow lasts
    is not final (the remote keeps its pre-resync image); after a non-final round, one final round
    runs once the overflow has ended even with nothing new. P is `position` (what was sent so far)."""
    new = snapshot is not None and (covered_token is None or snapshot[0] > covered_token)
    if not new and not (resync_open and not overflowing):
        return None
    regions = regions_of(snapshot[1] if snapshot is not None else (), region_blocks, total_regions)
    reason = ResyncReason.OVERFLOW_CONTINUING if overflowing else ResyncReason.OVERFLOW
    return ResyncPlan(reason, regions, position)


# per run of dirty writes (`LocalUnit.dirty_runs`): (first bitmap stamp, lo, hi): every record up to
# lo was journaled before the run's writes, every record after hi after them
DirtyRuns = tuple[tuple[int, int, int], ...]


def records_before_dirty(runs: DirtyRuns, token: int, covered_token: int | None) -> int | None:
    """The last journal position a remote whose resync is not open may be sent before the dirty
    regions it lacks, or None when it lacks none. `runs`/`token`: the local unit's dirty runs and
    bitmap stamp now; `covered_token`: the newest stamp the remote holds (None: none).

    Every record up to the position was journaled before every dirty write the remote misses; the
    next one may postdate such a write (an overflow ended and journaling resumed). Shipped before
    the regions, it would leave the remote with a later write but without the overflow's writes: an
    image of the host's disk at no point, and not marked inconsistent. So the source resyncs the
    dirty regions at this position first (the remote is marked inconsistent from that round until
    a final one), and sends the records before it as usual."""
    if not runs or (covered_token is not None and token <= covered_token):
        return None
    seen = -1 if covered_token is None else covered_token
    # run i holds the stamps from its first one up to the next run's first one, exclusive
    ends = [first - 1 for first, _, _ in runs[1:]] + [token]
    return next(lo for (_, lo, _), end in zip(runs, ends, strict=True) if end > seen)


def dirty_round_covers(runs: DirtyRuns, token: int, position: int) -> tuple[int, bool]:
    """What a dirty round at P = `position` that copies the regions of snapshot `token` gives the
    remote: (the newest stamp it then holds, whether that is every dirty write of the snapshot).

    The records after P are replayed over the copy, so the writes of a run that records after P may
    precede (its hi above P) are overwritten by older records where they overlap: the remote holds
    them only after a round at or past that hi, and its resync stays open until then."""
    later = [first for first, _, hi in runs if hi > position]
    if later:
        return min(token, later[0] - 1), False
    return token, True


def plan_after_hello(reply: jp.HelloReply, me: SourceIdentity, *, durable_seq: int, tail_seq: int,
                     has_records_after: bool, total_regions: int) -> Resume | ResyncPlan:
    """Resume after the remote's position, or a full comparison (P = the durable position now: reads of
    the local volume return the newest data, so every record up to P is in the copy).

    `has_records_after`: the journal still holds the records after `reply.applied_seq`."""
    every = tuple(range(total_regions))
    if reply.flags & jp.ReplyFlag.RESYNC_IN_PROGRESS:
        return ResyncPlan(ResyncReason.INTERRUPTED, every, durable_seq)
    if reply.flags & jp.ReplyFlag.NEW_TARGET or reply.volume_uuid != me.volume_uuid \
            or reply.generation != me.generation:
        return ResyncPlan(ResyncReason.INITIAL, every, durable_seq)
    if reply.applied_seq > durable_seq:
        return ResyncPlan(ResyncReason.REMOTE_AHEAD, every, durable_seq)
    if reply.applied_seq + 1 < tail_seq or not has_records_after:
        return ResyncPlan(ResyncReason.RECORDS_GONE, every, durable_seq)
    return Resume(reply.applied_seq)


class SourceSession:
    """The source's state for one remote, across its connections (one connection at a time)."""

    def __init__(self, me: SourceIdentity, *, acked_seq: int, window_bytes: int, heartbeat_interval_s: float,
                 dead_after_s: float, compression: bool = True) -> None:
        self.me = me
        self.window_bytes = window_bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self.dead_after_s = dead_after_s
        self.compression = compression
        self.acked_seq = acked_seq
        self.sent_seq = acked_seq
        self.in_flight: deque[InFlight] = deque()
        self.in_flight_bytes = 0
        self.avg_record_bytes = 4096.0
        self.bytes_acked = 0
        self.connected = False
        self.last_rx = 0.0
        self.last_tx = 0.0
        self.last_ack_time = 0.0
        self._token = 0

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, now: float) -> None:
        self.connected = True
        self.last_rx = self.last_tx = now
        self._forget_in_flight()

    def connection_lost(self) -> None:
        self.connected = False
        self._forget_in_flight()

    def _forget_in_flight(self) -> None:
        self.in_flight.clear()
        self.in_flight_bytes = 0
        self.sent_seq = self.acked_seq

    def hello(self, purpose: jp.Purpose = jp.Purpose.REPLICATE) -> jp.Hello:
        m = self.me
        return jp.Hello(m.source_id, m.volume_uuid, m.volume_size, m.block_size, m.generation, self.acked_seq,
                        jp.Feature.LZ4 if self.compression else jp.Feature.NONE, purpose)

    def hello_reply(self, reply: jp.HelloReply, now: float, *, durable_seq: int, tail_seq: int,
                    has_records_after: bool, total_regions: int) -> tuple[list[Confirm], Resume | ResyncPlan]:
        """The remote's HELLO_REPLY: where to go on from, and what the journal may forget."""
        self.last_rx = now
        plan = plan_after_hello(reply, self.me, durable_seq=durable_seq, tail_seq=tail_seq,
                                has_records_after=has_records_after, total_regions=total_regions)
        confirms: list[Confirm] = []
        if isinstance(plan, Resume):
            self.acked_seq = reply.applied_seq
            self.sent_seq = reply.applied_seq
            if reply.applied_seq > 0:
                confirms.append(Confirm(reply.applied_seq))
        return confirms, plan

    # -- streaming -------------------------------------------------------------------------------
    @property
    def window_open(self) -> bool:
        return self.in_flight_bytes < self.window_bytes

    def batch(self, records: Sequence[jp.RecordLike]) -> jp.Batch:
        """The BATCH frame for `records` (which follow `sent_seq`), counted in flight."""
        if not records:
            raise ValueError("an empty batch")
        if records[0].seq <= self.sent_seq:
            raise ValueError(f"records from seq={records[0].seq} do not follow sent seq={self.sent_seq}")
        b = jp.Batch(self.sent_seq, jp.batch_records(records))
        payload = sum(len(r.payload) for r in b.records)
        wire = payload + RECORD_OVERHEAD * len(b.records)
        self.in_flight.append(InFlight(b.records[-1].seq, wire, b.records[0].timestamp_ns))
        self.in_flight_bytes += wire
        self.avg_record_bytes = 0.9 * self.avg_record_bytes + 0.1 * (wire / len(b.records))
        self.sent_seq = b.records[-1].seq
        return b

    def resync_copy_done(self, position: int) -> None:
        """The copy of a resync ended; records after P follow on this connection."""
        self.sent_seq = position
        self.in_flight.clear()
        self.in_flight_bytes = 0

    def ack(self, seq: int, now: float) -> tuple[int, list[Confirm]]:
        """An ACK: returns the wire bytes it acknowledged, and a Confirm when the position moved.

        Acknowledgements are cumulative: an old or repeated one changes nothing. One for a
        position never sent on this connection is a protocol error."""
        self.last_rx = now
        if seq > self.sent_seq and seq > self.acked_seq:
            raise jp.ProtocolError(f"ACK of seq={seq} but only seq={self.sent_seq} was sent", jp.ErrorCode.SEQUENCE)
        acked = 0
        while self.in_flight and self.in_flight[0].last_seq <= seq:
            acked += self.in_flight.popleft().wire_bytes
        self.in_flight_bytes -= acked
        self.bytes_acked += acked
        if seq <= self.acked_seq:
            return acked, []
        self.acked_seq = seq
        self.last_ack_time = now
        return acked, [Confirm(seq)]

    # -- time ------------------------------------------------------------------------------------
    def data_received(self, now: float) -> None:
        self.last_rx = now

    def frame_sent(self, now: float) -> None:
        self.last_tx = now

    def tick(self, now: float) -> list[SendHeartbeat | LinkDead]:
        """What the clock asks for: a heartbeat when nothing was sent for `heartbeat_interval_s`, or the
        end of the link when nothing was heard for `dead_after_s`."""
        if not self.connected:
            return []
        if now - self.last_rx > self.dead_after_s:
            return [LinkDead(f"nothing heard from the remote for {now - self.last_rx:.1f} s")]
        if now - self.last_tx > self.heartbeat_interval_s:
            self._token += 1
            self.last_tx = now
            return [SendHeartbeat(self._token)]
        return []

    def next_deadline(self) -> float:
        """When `tick` has something to do next (absolute, in the driver's clock)."""
        return min(self.last_tx + self.heartbeat_interval_s, self.last_rx + self.dead_after_s)
