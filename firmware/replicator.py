"""The local unit's side of the journey link: one TCP/TLS client per configured remote unit.

Each remote is a consumer of the journal (`Journal.register_consumer`). Its link thread connects,
says HELLO with the volume identity, and resumes after the position the remote reports as durably
applied (the remote's word is the truth; the journal's confirmed position only follows it). Records
are shipped in batches with many in flight (a window of `window_bytes`, at least the bandwidth-delay
product of the link) and forgotten by the journal only when the remote acknowledges them durable.
A broken link is retried with exponential backoff; nothing is lost (records stay in the journal until
acknowledged) and nothing is applied twice (the remote skips records at or below its position).

Resync (a new target, a target mid-resync, a generation change, records the journal no longer holds,
or dirty regions left by a journal overflow): record the journal position P, compare region digests
(BLAKE2b-128 over `region_blocks` blocks) with the remote, copy only the regions that differ from the
local volume, tell the remote the position Q at which the copy finished, then ship the records after P.
Each copied region holds the local volume as of some instant between P and Q; replaying every record
after P, in order, through Q gives each block its last value written up to Q, so at Q the target is
exactly the local volume at Q. Before Q it is not a consistent image, which is why the remote keeps an
undo log of the pre-resync contents until Q is applied (see `firmware.remote_unit`, docs/JOURNEY.md).

Sync-mode remotes register a sync gate with the local unit: a host write is acknowledged only once
every sync remote has the record durable (or, after `sync_timeout_s` without the remote, the link is
marked degraded and the gate lets writes through with a logged warning rather than hanging the host).

What it does not do: journaling (`firmware.journal`), the CLI or the status socket (`firmware.cli`,
`firmware.control`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import random
import socket
import ssl
import threading
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from firmware.crash_points import crash_point
from firmware.journal import RecordsGone
from firmware.journal.bitmap import DirtySnapshot
from firmware.link import protocol as jp
from firmware.link_driver import LinkDriver, Waker
from firmware.link_transport import LinkTransport, PeerClosed
from firmware.pairing import TlsFiles, client_context, peer_identity
from firmware.replication.source import (
    OPEN_END,
    LinkDead,
    Resume,
    ResyncPlan,
    SourceIdentity,
    SourceJournal,
    SourceSession,
    dirty_plan,
    dirty_round_covers,
    records_before_dirty,
)
from firmware.replication.spec import DEFAULT_PORT, RemoteSpec

__all__ = ["DEFAULT_PORT", "OPEN_END", "Progress", "RemoteLink", "RemoteSpec", "RemoteState", "Replicator",
           "ReplicatorTuning"]

log = logging.getLogger(__name__)


class RemoteState(enum.IntEnum):
    CONNECTING = 1
    RESYNCING = 2
    STREAMING = 3
    DISCONNECTED = 4
    REFUSED = 5  # the remote refused us for a reason retrying will not fix soon (still retried, slowly)
    TARGET_ERROR = 6  # the target is full or failing; retried until it takes writes again
    STOPPED = 7


PERMANENT_ERRORS = frozenset({jp.ErrorCode.UNKNOWN_SOURCE, jp.ErrorCode.PERMISSION_DENIED, jp.ErrorCode.VERSION,
                              jp.ErrorCode.VOLUME_MISMATCH, jp.ErrorCode.PRIMARY})


@dataclass(frozen=True)
class ReplicatorTuning:
    window_bytes: int = 32 << 20  # bytes in flight; >= 100 Mbit/s x 80 ms x 30
    max_batch_bytes: int = 4 << 20
    heartbeat_interval_s: float = 5.0
    dead_after_s: float = 20.0  # nothing heard for this long: the link is dead
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    # a remote that refused us because it was promoted is asked again this often: `usbmirror
    # failback` on it hands the source back at the next attempt (docs/FAILOVER.md)
    primary_poll_s: float = 2.0
    sync_timeout_s: float = 15.0  # under Linux sd's 30 s command timeout
    region_blocks: int | None = None  # default: the local unit's, else 1 MiB worth
    digests_per_request: int = 64
    requests_in_flight: int = 4
    compression: bool = True
    drain_timeout_s: float = 120.0  # verify waits this long for the remote to catch up
    overflow_resync_after_s: float = 60.0  # a journal overflow lasting longer: resync rounds anyway
    overflow_round_interval_s: float = 10.0  # between such rounds
    # An async remote's records gather this long after the journal's wake-up before they are read
    # and sent as one batch (docs/REPLICATION.md: shipping), unless `coalesce_records` wait already.
    # A sync remote never waits: the host's write waits for its ACK.
    coalesce_s: float = 0.01
    coalesce_records: int = 256


@dataclass(frozen=True, slots=True)
class Progress:
    """Reported to the progress callback during resync and verify (drive a `rich` bar with it)."""

    remote: str
    phase: str  # "resync" | "verify"
    done: int  # regions compared
    total: int
    bytes_copied: int


@runtime_checkable
class ReplicatedJournal(SourceJournal, Protocol):
    """The local unit's journal as the replicator uses it."""

    @property
    def unit_uuid(self) -> uuidlib.UUID: ...
    @property
    def generation(self) -> int: ...
    def timestamp_of(self, seq: int) -> int | None: ...


@runtime_checkable
class ReplicatedUnit(Protocol):
    """The local unit as the replicator uses it: reads of the newest data, the dirty regions a journal
    overflow left, and the sync gates a `sync` remote holds the host's writes with."""

    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def region_blocks(self) -> int: ...
    @property
    def overflow(self) -> bool: ...
    def read(self, lba: int, count: int) -> bytes: ...
    def dirty_snapshot(self) -> DirtySnapshot: ...
    def clear_dirty(self, snapshot: DirtySnapshot) -> int: ...
    def dirty_runs(self) -> tuple[int, tuple[tuple[int, int, int], ...]]: ...
    def add_sync_gate(self, gate: Callable[[int], None]) -> None: ...
    def remove_sync_gate(self, gate: Callable[[int], None]) -> None: ...


# what a local unit wrote since it and a promoted remote last agreed, as (lba, count) extents, or None and
# why that set is not whole (given the FETCH connection's HELLO_REPLY)
LocalChanges = Callable[[jp.HelloReply], tuple[list[tuple[int, int]] | None, str]]

FAILBACK_PIECE_BYTES = 4096  # a failback compares a differing region again in pieces of this size


def piece_runs(pieces: Sequence[int], piece_blocks: int, max_blocks: int, num_blocks: int) -> list[tuple[int, int]]:
    """Adjacent piece indices (each `piece_blocks` long) as (lba, blocks) runs of at most
    `max_blocks`, clipped to the volume's end."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(pieces)):
        lba = p * piece_blocks
        if lba >= num_blocks:
            continue
        n = min(piece_blocks, num_blocks - lba)
        if runs and runs[-1][0] + runs[-1][1] == lba and runs[-1][1] + n <= max_blocks:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((lba, n))
    return runs


class LinkFailure(Exception):
    """This session ended; the link thread reconnects."""

    def __init__(self, message: str, state: RemoteState = RemoteState.DISCONNECTED,
                 code: jp.ErrorCode | None = None) -> None:
        super().__init__(message)
        self.state = state
        self.code = code


class _TokenBucket:
    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.burst = max(64 << 10, rate / 20)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def wait_time(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens > 0 else -self.tokens / self.rate

    def spend(self, n: int) -> None:
        self.tokens -= n


class RemoteLink:
    """The link to one remote unit: a thread that connects, resyncs if needed, and streams.

    The positions, the window and the acknowledgements are the `SourceSession`'s (`self.session`);
    this class owns the thread, the socket and what the local unit and the status ask."""

    def __init__(self, rep: Replicator, spec: RemoteSpec) -> None:
        self.rep = rep
        self.spec = spec
        self.tuning = rep.tuning
        self.consumer = f"remote:{spec.name or spec.label}"
        self.state = RemoteState.CONNECTING
        self.cond = threading.Condition()
        self.session = SourceSession(rep.identity, acked_seq=rep.journal.register_consumer(self.consumer),
                                     window_bytes=self.tuning.window_bytes,
                                     heartbeat_interval_s=self.tuning.heartbeat_interval_s,
                                     dead_after_s=self.tuning.dead_after_s, compression=self.tuning.compression)
        self.last_error = ""
        self.recent_errors: deque[str] = deque(maxlen=8)
        self.connected_since: float | None = None
        self.connects = 0
        self.remote_name = ""
        self.degraded = False
        self.throughput_bps = 0.0
        self.batches_sent = 0  # BATCH frames of records (an async remote's carry many: `coalesce_s`)
        self._tp_window: deque[tuple[float, int]] = deque()
        self._tp_window_bytes = 0  # sum of the window's byte counts, kept as acks come and go
        self.last_ack_time = time.monotonic()
        self.resync: dict[str, Any] = {"active": False, "percent": None, "rate_bps": None, "regions_done": 0,
                                       "regions_total": 0, "bytes_copied": 0, "reason": ""}
        self.covered: DirtySnapshot | None = None  # the last dirty snapshot whose regions this remote has
        self.resync_open = False  # a non-final overflow round left the remote's resync open
        self.next_dirty_check = 0.0
        self.resync_end: int | None = None
        self._transport: LinkTransport | None = None
        self.peer_generations: jp.Generations | None = None  # a promoted remote's, from its last refusal
        self._handshaken = False
        self._thread = threading.Thread(target=self._run, name=f"link-{spec.label}", daemon=True)

    # -- positions (the session's) ----------------------------------------------------------------
    @property
    def acked_seq(self) -> int:
        return self.session.acked_seq

    @property
    def sent_seq(self) -> int:
        return self.session.sent_seq

    @property
    def bytes_acked(self) -> int:
        return self.session.bytes_acked

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self.cond.notify_all()
        transport = self._transport
        if transport is not None:
            transport.shutdown()
        self._thread.join(timeout=15)
        self.state = RemoteState.STOPPED

    def stopping(self) -> bool:
        return self.rep.stop_event.is_set()

    def _run(self) -> None:
        backoff = self.tuning.backoff_initial_s
        while not self.stopping():
            self._handshaken = False
            promoted_remote = False
            try:
                self._connection()
            except LinkFailure as exc:
                self._fail(str(exc), exc.state)
                if exc.code is jp.ErrorCode.PRIMARY:
                    promoted_remote = True
                    backoff = min(self.tuning.backoff_max_s, self.tuning.primary_poll_s)
                elif exc.code in PERMANENT_ERRORS:
                    backoff = self.tuning.backoff_max_s
                if exc.code is jp.ErrorCode.PRIMARY and self.rep.on_remote_primary is not None:
                    try:
                        if self.rep.on_remote_primary(self, self.peer_generations, str(exc)):
                            # this unit is primary again (failed back): replicate to the remote now
                            promoted_remote = False
                            backoff = self.tuning.backoff_initial_s
                    except Exception:
                        log.exception("handling a promoted remote failed remote=%s", self.spec.label)
            except PeerClosed:
                self._fail("remote closed the connection", RemoteState.DISCONNECTED)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}", RemoteState.DISCONNECTED)
            except jp.ProtocolError as exc:
                self._fail(f"protocol error: {exc}", RemoteState.DISCONNECTED)
            except Exception as exc:
                log.exception("link failure remote=%s", self.spec.label)
                self._fail(f"internal: {exc}", RemoteState.DISCONNECTED)
            finally:
                self.connected_since = None
                transport, self._transport = self._transport, None
                if transport is not None:
                    transport.close()
                self.session.connection_lost()
                self.resync["active"] = False
                with self.cond:
                    self.cond.notify_all()
            if self.stopping():
                break
            if self._handshaken:  # the remote answered: start the backoff over
                backoff = self.tuning.backoff_initial_s
            delay = backoff * (0.5 + random.random())
            self.rep.stop_event.wait(delay)
            backoff = min(self.tuning.backoff_max_s, backoff * 2)
            if promoted_remote:
                backoff = min(backoff, self.tuning.primary_poll_s)
        self.state = RemoteState.STOPPED

    def _fail(self, message: str, state: RemoteState) -> None:
        if self.stopping():
            return
        self.last_error = message
        self.recent_errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}")
        self.state = state
        log.warning("link down remote=%s state=%s reason=%s", self.spec.label, state.name, message)

    # -- one connection -------------------------------------------------------------------------
    def connect(self) -> LinkTransport:
        """A TCP (TLS) connection to the remote, its certificate checked."""
        raw = socket.create_connection(self.spec.host_port, timeout=self.tuning.connect_timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = raw
        try:
            ctx = self.rep.ssl_context
            if ctx is not None:
                sock = ctx.wrap_socket(raw, server_hostname=None)
                ident = peer_identity(sock)
                if ident is None or ident[0] != "remote" or (self.spec.name and ident[1] != self.spec.name):
                    raise LinkFailure(f"remote certificate names {ident!r}, expected remote {self.spec.name or '*'}",
                                      RemoteState.REFUSED, jp.ErrorCode.PERMISSION_DENIED)
                self.remote_name = ident[1]  # known before HELLO_REPLY (a refusal names the remote by it)
        except BaseException:
            sock.close()
            raise
        return LinkTransport(sock, jp.Role.SOURCE, timeout=self.tuning.dead_after_s)

    def _connection(self) -> None:
        """One connection: handshake, resync if needed, stream. Ends only by an exception."""
        self.state = RemoteState.CONNECTING
        self._transport = self.connect()
        conn = _SourceConnection(self, self._transport, self.session)
        reply = conn.handshake(jp.Purpose.REPLICATE)
        self._handshaken = True
        if self.rep.on_link_up is not None:
            self.rep.on_link_up(self)
        self.remote_name = reply.remote_name
        self.connects += 1
        self.connected_since = time.monotonic()
        self.last_error = ""
        rep, j = self.rep, self.rep.journal
        try:
            j.read_records(reply.applied_seq, 1)
            has_after = True
        except RecordsGone:
            has_after = False
        confirms, plan = self.session.hello_reply(reply, time.monotonic(), durable_seq=j.durable_seq,
                                                  tail_seq=j.tail_seq, has_records_after=has_after,
                                                  total_regions=rep.total_regions)
        self.next_dirty_check = 0.0
        for c in confirms:
            rep.confirm(self, c.seq)
        if isinstance(plan, Resume):
            log.info("link up remote=%s name=%s resume_after=%d", self.spec.label, reply.remote_name,
                     plan.after_seq)
        else:
            log.info("link up remote=%s name=%s resync=%s regions=%d", self.spec.label, reply.remote_name,
                     plan.reason.value, len(plan.regions))
            conn.resync(plan, rep.dirty_state(), final=not rep.local_unit.overflow)
        self.state = RemoteState.STREAMING
        conn.stream()
        raise LinkFailure("stopping")

    # -- accounting (called from the connection) --------------------------------------------------
    def on_ack(self, seq: int) -> None:
        now = time.monotonic()
        acked_bytes, confirms = self.session.ack(seq, now)
        window = self._tp_window
        window.append((now, acked_bytes))
        self._tp_window_bytes += acked_bytes
        while window and now - window[0][0] > 5.0:
            self._tp_window_bytes -= window.popleft()[1]
        span = max(1e-3, now - window[0][0]) if len(window) > 1 else 1.0
        # a running sum: summing the window on every ack cost O(acks in 5 s), most of the
        # replicator's CPU at a few thousand commands per second
        self.throughput_bps = self._tp_window_bytes / span
        for c in confirms:
            self.last_ack_time = now
            self.rep.confirm(self, c.seq)
        if self.degraded and self.acked_seq >= self.rep.journal.durable_seq:
            self.degraded = False
            log.info("sync remote caught up remote=%s seq=%d", self.spec.label, seq)
        with self.cond:
            self.cond.notify_all()

    def drain(self, seq: int, deadline: float) -> bool:
        """Wait until this remote acknowledged `seq` (False at the deadline or on stop)."""
        with self.cond:
            while self.acked_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping():
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def sync_gate(self, seq: int) -> None:
        """Blocks the host's write until this remote has `seq` durable (sync mode).

        A remote that does not acknowledge within `sync_timeout_s` (stopped, partitioned, slow) is
        marked degraded: this write and the following ones are acknowledged to the host without it
        (logged, `degraded` in status), until the remote has caught up with the journal again."""
        deadline = time.monotonic() + self.tuning.sync_timeout_s
        with self.cond:
            while self.acked_seq < seq and not self.stopping():
                if self.degraded:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    self.degraded = True
                    log.warning("sync remote unavailable, acknowledging without it remote=%s seq=%d",
                                self.spec.label, seq)
                    return
                self.cond.wait(min(left, 0.5))

    def status(self) -> dict[str, Any]:
        j, ses = self.rep.journal, self.session
        head = j.durable_seq
        lag_records = max(0, head - ses.acked_seq)
        unsent = max(0, head - ses.sent_seq)
        lag_bytes = ses.in_flight_bytes + int(unsent * ses.avg_record_bytes)
        oldest = j.timestamp_of(ses.acked_seq + 1) if lag_records else None
        if lag_records == 0:
            lag_s = 0.0
        elif oldest:
            lag_s = max(0.0, time.time() - oldest / 1e9)  # age of the oldest record it lacks
        elif ses.in_flight:
            lag_s = max(0.0, time.time() - ses.in_flight[0].oldest_ts_ns / 1e9)
        else:
            lag_s = time.monotonic() - self.last_ack_time
        return {
            "address": self.spec.label,
            "name": self.spec.name or self.remote_name,
            "state": self.state.name.lower(),
            "mode": self.spec.mode,
            "acked_seq": ses.acked_seq,
            "sent_seq": ses.sent_seq,
            "lag_records": lag_records,
            "lag_bytes": lag_bytes,
            "lag_seconds": round(lag_s, 3),
            "throughput_bps": round(self.throughput_bps, 1),
            "bytes_acked": ses.bytes_acked,
            "batches_sent": self.batches_sent,
            "connects": self.connects,
            "degraded": self.degraded,
            "bandwidth_limit_bps": self.spec.bandwidth_limit_bps,
            "last_error": self.last_error,
            "recent_errors": list(self.recent_errors),
            "resync": dict(self.resync),
        }


class _SourceConnection:
    """One connection, driven by the link thread alone (the TLS socket is never shared between threads):
    the driver of the link's `SourceSession` on a `LinkTransport`.

    Its `LinkDriver` waits on the link and on a `Waker` that the journal's durable listener wakes,
    so the connection selects on the link and the journal together.
    """

    def __init__(self, link: RemoteLink, transport: LinkTransport, session: SourceSession) -> None:
        self.link = link
        self.tuning = link.tuning
        self.transport = transport
        self.session = session
        self.digests: deque[jp.RegionDigests] = deque()
        self.echoes: set[int] = set()
        self.fetching = False  # a failback's FETCH connection: region data and ACKs are its own
        self.fetched: deque[jp.RegionData] = deque()
        self.dirty_frames: deque[jp.DirtyRegions] = deque()
        self.bytes_digested = 0  # bytes of the local volume read to compare digests on this connection
        self.fetch_acks: deque[int] = deque()
        self.bucket = _TokenBucket(link.spec.bandwidth_limit_bps) if link.spec.bandwidth_limit_bps else None
        self.driver = LinkDriver(transport, self)
        session.connection_made(time.monotonic())

    def _send(self, ev: jp.Event) -> None:
        n = self.transport.send(ev)
        if self.bucket is not None:
            self.bucket.spend(n)
        self.session.frame_sent(time.monotonic())

    def pump(self, timeout: float) -> None:
        """Wait up to `timeout` for input or a journal wake-up; handle every event that arrived."""
        self.driver.pump(timeout)
        for action in self.session.tick(time.monotonic()):
            if isinstance(action, LinkDead):
                raise LinkFailure(action.reason)
            self._send(jp.Heartbeat(action.token))

    # -- the driver's channel -------------------------------------------------------------------
    def on_events(self, events: Sequence[jp.Event]) -> None:
        self.session.data_received(time.monotonic())
        for ev in events:
            self._event(ev)

    def on_wake(self, waker: Waker) -> None:
        pass  # new durable records: the stream loop reads them next

    def _event(self, ev: jp.Event) -> None:
        if self.fetching and isinstance(ev, jp.Ack):
            self.fetch_acks.append(ev.seq)
        elif self.fetching and isinstance(ev, jp.RegionData):
            self.fetched.append(ev)
        elif self.fetching and isinstance(ev, jp.DirtyRegions):
            self.dirty_frames.append(ev)
        elif isinstance(ev, jp.Ack):
            self.link.on_ack(ev.seq)
        elif isinstance(ev, jp.Heartbeat):
            self.echoes.add(ev.token)
        elif isinstance(ev, jp.RegionDigests):
            self.digests.append(ev)
        elif isinstance(ev, jp.Error):
            raise LinkFailure(f"remote error {ev.code.name}: {ev.message}", _state_for(ev.code), ev.code)
        else:
            raise jp.ProtocolError(f"unexpected {type(ev).__name__} from the remote")

    def barrier(self) -> None:
        """Return once the remote has handled every frame sent so far: it answers a heartbeat in
        order, after the frames before it (a RESYNC_END is durable on the remote by then)."""
        token = random.getrandbits(63) | (1 << 63)  # never one of the session's own heartbeat tokens
        self._send(jp.Heartbeat(token))
        while token not in self.echoes:
            if self.link.stopping():
                raise LinkFailure("stopping")
            self.pump(0.5)
        self.echoes.discard(token)

    def handshake(self, purpose: jp.Purpose) -> jp.HelloReply:
        hello = self.session.hello(purpose)
        if purpose is jp.Purpose.FETCH:  # a failback asks for the promoted copy's written regions
            hello = replace(hello, features=hello.features | jp.Feature.DIRTY_MAP)
        rep = self.link.rep
        gens = rep.generations() if rep.generations is not None and purpose is jp.Purpose.REPLICATE else None
        if gens is not None:
            hello = replace(hello, features=hello.features | jp.Feature.GENERATIONS)
        self._send(hello)
        if gens is not None:
            self._send(gens)
        self.link.peer_generations = None
        deadline = time.monotonic() + self.tuning.connect_timeout_s
        while time.monotonic() < deadline:
            link_ready, _ = self.transport.wait(deadline - time.monotonic())
            if not link_ready:
                continue
            try:
                events = self.transport.read_events()
            except PeerClosed:
                raise LinkFailure("remote closed the connection during HELLO") from None
            while events and isinstance(first := events[0], jp.Generations):
                self.link.peer_generations = first  # a promoted remote's, before its refusal
                events = events[1:]
            if not events:
                continue
            ev = events[0]
            if isinstance(ev, jp.Error):
                raise LinkFailure(f"remote refused: {ev.code.name}: {ev.message}", _state_for(ev.code), ev.code)
            if not isinstance(ev, jp.HelloReply):
                raise jp.ProtocolError(f"expected HELLO_REPLY, got {type(ev).__name__}")
            self.session.data_received(time.monotonic())
            for later in events[1:]:
                self._event(later)
            return ev
        raise LinkFailure("no HELLO_REPLY in time")

    # -- region comparison (resync and verify) --------------------------------------------------
    def compare_regions(self, regions: Sequence[int], rb: int, on_region: Callable[[int, bool], None],
                        phase: str) -> None:
        """Ask the remote for the digests of `regions`; call on_region(index, differs) for each."""
        rep = self.link.rep
        runs: list[tuple[int, int]] = []
        for idx in sorted(set(regions)):
            if runs and runs[-1][0] + runs[-1][1] == idx and runs[-1][1] < self.tuning.digests_per_request:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((idx, 1))
        pending = deque(runs)
        outstanding = 0
        done = 0
        total = sum(n for _, n in runs)
        while pending or outstanding:
            while pending and outstanding < self.tuning.requests_in_flight:
                first, n = pending.popleft()
                self._send(jp.DigestRequest(first, n, rb))
                outstanding += 1
            while not self.digests:
                if self.link.stopping():
                    raise LinkFailure("stopping")
                self.pump(0.5)
            d = self.digests.popleft()
            outstanding -= 1
            for k, remote_digest in enumerate(d.digests):
                idx = d.first_region + k
                lba = idx * rb
                n = min(rb, rep.num_blocks - lba)
                local = rep.local_unit.read(lba, n)
                self.bytes_digested += len(local)
                on_region(idx, jp.region_digest(local) != remote_digest)
                done += 1
            rep.progress(Progress(self.link.spec.label, phase, done, total,
                                  int(self.link.resync.get("bytes_copied") or 0)))

    def resync(self, plan: ResyncPlan, snapshot: DirtySnapshot | None, final: bool = True) -> None:
        """Copy the regions of `plan` that differ, then ship records after its position (P).

        `snapshot` is the dirty snapshot (or None) the copy covers: taken before the first region is
        read, so every region it names is copied with data at least as new as it. A round that is not
        `final` (the journal is still overflowing, so writes still bypass it) ends with Q = "never":
        the remote keeps its undo log, and its pre-resync consistent image, until a final round."""
        link, rep = self.link, self.link.rep
        rb = rep.region_blocks
        regions, position = plan.regions, plan.position
        if snapshot is not None:
            # dirty writes journaled after P are overwritten by the records replayed after P: the
            # remote holds them only after a round at their position, and stays inconsistent until then
            _, runs = rep.local_unit.dirty_runs()
            held, complete = dirty_round_covers(tuple(r for r in runs if r[0] <= snapshot.token), snapshot.token,
                                                position)
            final = final and complete
            if held < snapshot.token:
                snapshot = dataclasses.replace(snapshot, token=held)
        link.state = RemoteState.RESYNCING
        started = time.monotonic()
        link.resync.update({"active": True, "percent": 0.0, "rate_bps": 0.0, "regions_done": 0,
                            "regions_total": len(regions), "bytes_copied": 0, "reason": plan.reason.value})
        log.info("resync begins remote=%s reason=%s position=%d regions=%d", link.spec.label, plan.reason.value,
                 position, len(regions))
        self._send(jp.ResyncBegin(position, rb, len(regions)))
        copied = 0

        def on_region(idx: int, differs: bool) -> None:
            nonlocal copied
            if differs:
                lba = idx * rb
                n = min(rb, rep.num_blocks - lba)
                data = rep.local_unit.read(lba, n)
                while self.bucket is not None and (w := self.bucket.wait_time(time.monotonic())) > 0:
                    self.pump(w)
                self._send(jp.RegionData(lba, data))
                copied += len(data)
                self.pump(0)
            link.resync["regions_done"] += 1
            link.resync["bytes_copied"] = copied
            link.resync["percent"] = 100.0 * link.resync["regions_done"] / max(1, len(regions))
            link.resync["rate_bps"] = copied / max(1e-3, time.monotonic() - started)

        self.compare_regions(regions, rb, on_region, "resync")
        end = rep.journal.head_seq if final else OPEN_END
        self.session.resync_copy_done(position)  # the remote acknowledges P when RESYNC_END is durable
        self._send(jp.ResyncEnd(end))
        self.barrier()  # the copied regions are durable on the remote before any dirty bit goes
        link.resync_end = end
        link.resync_open = not final
        link.resync.update({"active": False, "percent": 100.0, "end_seq": end if final else None,
                            "open": not final})
        if snapshot is not None:
            rep.covered(link, snapshot)
        log.info("resync copy done remote=%s begin=%d end=%d copied_bytes=%d", link.spec.label, position, end,
                 copied)

    # -- streaming ------------------------------------------------------------------------------
    def stream(self) -> None:
        """Send records as the journal makes them durable: the committing thread wakes this driver
        through a `Waker` (a journal durable listener), so no thread stands between them."""
        rep = self.link.rep
        j = rep.journal
        waker = Waker()
        self.driver.wakers.append(waker)
        j.add_durable_listener(waker.wake)
        coalesce = self.tuning.coalesce_s if self.link.spec.mode != "sync" else 0.0
        try:
            while not rep.stop_event.is_set():
                wait = self._send_batches()
                timeout = min(wait, self.tuning.heartbeat_interval_s / 2)
                if coalesce > 0:
                    self._gather(timeout, waker, coalesce)
                else:
                    self.pump(timeout)
        finally:
            j.remove_durable_listener(waker.wake)
            self.driver.wakers.remove(waker)
            waker.close()

    def _gather(self, timeout: float, waker: Waker, coalesce: float) -> None:
        """`pump` for an async remote: once the journal wakes this link, let records gather for
        `coalesce` seconds (the remote's ACKs are still read meanwhile) so they leave as one batch:
        one journal read, one frame, one TLS write and one ACK for many host writes instead of
        one each. The waker stays set while they gather, so the committing thread's later
        wake-ups cost it nothing (no byte on the socketpair)."""
        transport, driver, ses = self.transport, self.driver, self.session
        link_ready, woken = transport.wait(timeout, driver.wakers)
        if link_ready:
            driver.channel.on_events(transport.read_events())
        if woken:
            j = self.link.rep.journal
            deadline = time.monotonic() + coalesce
            while j.durable_seq - ses.sent_seq < self.tuning.coalesce_records:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if transport.wait(left)[0]:
                    driver.channel.on_events(transport.read_events())
            for w in woken:
                w.clear()  # before the records are read: a later commit wakes the link again
        for action in ses.tick(time.monotonic()):
            if isinstance(action, LinkDead):
                raise LinkFailure(action.reason)
            self._send(jp.Heartbeat(action.token))

    def _send_batches(self) -> float:
        """Send what the window and the bandwidth cap allow. Returns how long to wait for input."""
        link, rep, ses = self.link, self.link.rep, self.session
        while ses.window_open:
            if self.bucket is not None:
                w = self.bucket.wait_time(time.monotonic())
                if w > 0:
                    return w
            try:
                records = rep.journal.read_records(ses.sent_seq, self.tuning.max_batch_bytes)
            except RecordsGone:
                raise LinkFailure(f"records after seq={ses.sent_seq} are gone from the journal") from None
            if not records:
                now = time.monotonic()
                if now >= link.next_dirty_check:
                    link.next_dirty_check = now + 1.0
                    todo = rep.dirty_for(link)
                    if todo is not None:
                        # every record up to sent_seq precedes the copy on this connection, so the
                        # remote applies them first; P = sent_seq
                        plan, snap, final = todo
                        self.resync(ResyncPlan(plan.reason, plan.regions, ses.sent_seq), snap, final)
                        link.state = RemoteState.STREAMING
                        if not final:  # rounds during an overflow: spaced out, they read whole regions
                            link.next_dirty_check = time.monotonic() + self.tuning.overflow_round_interval_s
                        continue
                return 0.5
            limit = None if link.resync_open else rep.records_before_dirty(link)
            if limit is not None and records[-1].seq > limit:
                if ses.sent_seq < limit:  # the records journaled before the dirty writes go first
                    records = [r for r in records if r.seq <= limit]
                else:
                    # the next record may postdate writes this remote lacks (an overflow ended): copy
                    # their regions first, at P = sent_seq, so the remote never holds a later write
                    # without them (it is marked inconsistent only during the copy, as in any resync)
                    if self.resync_dirty_now():
                        continue
                    return 0.05  # the dirty regions went meanwhile (another remote's round cleared them)
            self._send(ses.batch(records))
            link.batches_sent += 1
            self.pump(0)
        return 0.5

    def resync_dirty_now(self) -> bool:
        """The dirty round the next record must wait for: final once the overflow has ended, else a
        round that leaves the remote's resync open (its pre-resync image kept) until a final one."""
        link, rep, ses = self.link, self.link.rep, self.session
        todo = rep.dirty_for(link, wait_during_overflow=False)
        if todo is None:
            return False
        plan, snap, final = todo
        self.resync(ResyncPlan(plan.reason, plan.regions, ses.sent_seq), snap, final)
        link.state = RemoteState.STREAMING
        link.next_dirty_check = time.monotonic() + (0.0 if final else self.tuning.overflow_round_interval_s)
        return True


def _state_for(code: jp.ErrorCode) -> RemoteState:
    if code in (jp.ErrorCode.TARGET_FULL, jp.ErrorCode.TARGET_IO):
        return RemoteState.TARGET_ERROR
    if code in PERMANENT_ERRORS:
        return RemoteState.REFUSED
    return RemoteState.DISCONNECTED


class Replicator:
    """Replicates the local unit's journal to every configured remote.

    `with Replicator(local_unit, journal, source_id=..., remotes=[...], tls=TlsFiles(...), state_dir=...)`
    starts one link thread per remote; `status()` and `verify()` may be called from any thread.
    Without `tls`/`tls_dir` it refuses to start unless `plaintext=True` (tests, benchmarks). `state_dir` is
    accepted for symmetry with the other units but holds nothing: the persistent positions are the
    journal's consumer positions and each remote's applied position, which the remote reports.
    """

    def __init__(
        self,
        local_unit: ReplicatedUnit,
        journal: ReplicatedJournal,
        *,
        source_id: str,
        remotes: Sequence[RemoteSpec],
        tls: TlsFiles | None = None,
        tls_dir: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        tuning: ReplicatorTuning | None = None,
        progress: Callable[[Progress], None] | None = None,
        plaintext: bool = False,
        generations: Callable[[], jp.Generations] | None = None,
        on_remote_primary: Callable[[RemoteLink, jp.Generations | None, str], bool] | None = None,
        on_link_up: Callable[[RemoteLink], None] | None = None,
    ) -> None:
        self.local_unit = local_unit
        self.journal = journal
        self.source_id = source_id
        # roles (docs/FAILOVER.md): this unit's data generations, sent after each HELLO, and what to
        # do when a remote answers that it was promoted (its GENERATIONS, if sent, and the message)
        self.generations = generations
        self.on_remote_primary = on_remote_primary
        self.on_link_up = on_link_up
        self.tuning = tuning or ReplicatorTuning()
        self.state_dir = state_dir
        if tls is None and tls_dir:
            tls = TlsFiles.for_source(tls_dir, source_id)
        if tls is None and not plaintext:
            raise ValueError("the journey link needs TLS files (tls= or tls_dir=, made by `usbmirror pair`); "
                             "plaintext=True is for tests and benchmarks only")
        self.ssl_context: ssl.SSLContext | None = client_context(tls) if tls is not None else None
        self.volume_uuid = journal.unit_uuid.bytes
        self.generation = journal.generation  # a new journal format starts seqs again under a new one
        self.block_size = local_unit.block_size
        self.num_blocks = local_unit.num_blocks
        self.volume_size = self.block_size * self.num_blocks
        self.identity = SourceIdentity(source_id, self.volume_uuid, self.volume_size, self.block_size,
                                       self.generation)
        rb = self.tuning.region_blocks or local_unit.region_blocks or max(1, (1 << 20) // self.block_size)
        self.region_blocks = rb
        self.total_regions = (self.num_blocks + rb - 1) // rb
        self.progress_callbacks: list[Callable[[Progress], None]] = [progress] if progress else []
        self.stop_event = threading.Event()
        self._confirm_lock = threading.Lock()
        self._dirty_lock = threading.Lock()
        self._cleared_token = -1
        self._overflow_seen: float | None = None
        self.links = [RemoteLink(self, spec) for spec in remotes]
        for link in self.links:
            if link.spec.mode == "sync":
                local_unit.add_sync_gate(link.sync_gate)
            elif link.spec.mode != "async":
                raise ValueError(f"remote {link.spec.label}: mode must be async or sync")

    def __enter__(self) -> Replicator:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        for link in self.links:
            link.start()

    def close(self) -> None:
        self.stop_event.set()
        for link in self.links:
            if link.spec.mode == "sync":
                self.local_unit.remove_sync_gate(link.sync_gate)
            link.stop()

    # -- shared helpers -------------------------------------------------------------------------
    def confirm(self, link: RemoteLink, seq: int) -> None:
        with self._confirm_lock:
            try:
                self.journal.confirm(link.consumer, min(seq, self.journal.durable_seq))
            except Exception as exc:  # the journal refusing a confirm must not kill the link
                log.warning("journal confirm failed consumer=%s seq=%d error=%s", link.consumer, seq, exc)

    def progress(self, p: Progress) -> None:
        for cb in self.progress_callbacks:
            try:
                cb(p)
            except Exception:
                log.exception("progress callback failed")

    def dirty_state(self) -> DirtySnapshot | None:
        """The local unit's current dirty snapshot, or None when no region is dirty."""
        snap = self.local_unit.dirty_snapshot()
        return snap if snap.regions else None

    def records_before_dirty(self, link: RemoteLink) -> int | None:
        """The last record `link` may be sent before the dirty regions it lacks (source.records_before_dirty)."""
        token, runs = self.local_unit.dirty_runs()
        if not runs:
            return None
        return records_before_dirty(runs, token, None if link.covered is None else link.covered.token)

    def dirty_for(self, link: RemoteLink, *, wait_during_overflow: bool = True,
                  ) -> tuple[ResyncPlan, DirtySnapshot | None, bool] | None:
        """Dirty regions this remote still needs (written straight to the local volume while the
        journal was full), with whether this round can be final.

        While the overflow lasts the copy would chase the writes, so the first `overflow_resync_after_s`
        wait; after that (say another remote is down and keeps the journal full) rounds run anyway so
        this remote does not fall arbitrarily behind, each one not final: the remote keeps its
        consistent pre-resync image (undo log) until the final round after the overflow ends."""
        now = time.monotonic()
        overflowing = self.local_unit.overflow  # ends as soon as the journal has room (LocalUnit.overflow)
        if overflowing:
            if self._overflow_seen is None:
                self._overflow_seen = now
            if wait_during_overflow and now - self._overflow_seen < self.tuning.overflow_resync_after_s:
                return None
        else:
            self._overflow_seen = None
        snap = self.dirty_state()
        plan = dirty_plan(None if snap is None else (snap.token, snap.regions),
                          covered_token=None if link.covered is None else link.covered.token,
                          resync_open=link.resync_open, overflowing=overflowing, position=link.sent_seq,
                          region_blocks=self.region_blocks, total_regions=self.total_regions)
        return None if plan is None else (plan, snap, not overflowing)

    def covered(self, link: RemoteLink, snap: DirtySnapshot) -> None:
        """`link` holds every region of `snap`; once every remote does, the dirty bits may go."""
        with self._dirty_lock:
            if link.covered is None or snap.token > link.covered.token:
                link.covered = snap
            if any(ln.covered is None for ln in self.links):
                return
            oldest = min((ln.covered for ln in self.links if ln.covered is not None), key=lambda s: s.token)
            if oldest.token <= self._cleared_token:
                return
            self.local_unit.clear_dirty(oldest)
            self._cleared_token = oldest.token
            log.info("dirty regions brought to every remote token=%d regions=%d", oldest.token,
                     len(oldest.regions))

    # -- status and verify ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "region_blocks": self.region_blocks,
                "remotes": [link.status() for link in self.links]}

    def wait_drained(self, timeout: float, links: Sequence[RemoteLink] | None = None) -> bool:
        """Wait until every remote (or those given) acknowledged the journal's current durable position."""
        target = self.journal.durable_seq
        deadline = time.monotonic() + timeout
        return all(link.drain(target, deadline) for link in (self.links if links is None else links))

    def verify(self, *, drain_timeout_s: float | None = None) -> dict[str, Any]:
        """Compare the local volume with every remote by region digests; list every difference.

        Waits for each connected remote to catch up first (a remote that is not connected is not
        waited for: it is reported with its error); a region that differs is compared again after a
        second drain, so writes still in flight are not reported as differences.
        """
        timeout = self.tuning.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        out: list[dict[str, Any]] = []
        for link in self.links:
            up = link.state in (RemoteState.STREAMING, RemoteState.RESYNCING)
            drained = up and link.drain(self.journal.durable_seq, time.monotonic() + timeout)
            entry: dict[str, Any] = {"address": link.spec.label, "name": link.spec.name or link.remote_name,
                                     "match": False, "differences": [], "regions": self.total_regions,
                                     "region_blocks": self.region_blocks, "drained": drained,
                                     "local_seq": self.journal.durable_seq, "remote_seq": link.acked_seq}
            try:
                if not up:
                    raise LinkFailure(f"not connected ({link.state.name.lower()}): {link.last_error}")
                diffs = self._verify_one(link, list(range(self.total_regions)))
                if diffs:
                    link.drain(self.journal.durable_seq, time.monotonic() + timeout)
                    diffs = self._verify_one(link, diffs)
                rb = self.region_blocks
                entry["differences"] = [{"region": i, "lba": i * rb, "count": min(rb, self.num_blocks - i * rb)}
                                        for i in diffs]
                entry["match"] = not diffs
            except (LinkFailure, OSError, ssl.SSLError, jp.ProtocolError) as exc:
                entry["error"] = str(exc)
            out.append(entry)
        return {"remotes": out, "match": bool(out) and all(e["match"] for e in out)}

    def fetch_back(self, link: RemoteLink, take_over: Callable[[dict[str, Any]], jp.Generations] | None, *,
                   pull: bool = True, local_changes: LocalChanges | None = None) -> dict[str, Any]:
        """Failback from a promoted remote that hands the source back (docs/FAILOVER.md): on a FETCH
        connection of its own, find the regions either side wrote since the two last agreed (the
        union of the remote's bitmap, DIRTY_REQUEST, and `local_changes(reply)`: this unit's
        writes after the promotion's fork position), compare the digests of the 4 KiB pieces of
        those regions only, and pull only the runs of pieces that differ into the local volume (the
        local unit is a replica: `LocalUnit.install`), make them durable, then `take_over(report)`
        (which records this unit's new generation and returns it) is sent and acknowledged by the
        remote, which becomes the replica. When either side's set cannot be trusted (the remote's
        bitmap lost, damaged or of another generation; this unit's journal no longer holding the
        records; no `local_changes`), every region is compared, then the pieces of those that
        differ (mode `full`, with the reason). Returns the report (`mode`, `bytes_moved`,
        `bytes_compared`, `seconds`, `regions_copied`, `regions_compared`, `pieces_compared`).
        `pull=False` only repeats the take-over (a crash came between the two sides recording it).
        `take_over=None` is a catch-up while the promoted copy is still served: the same pull, no
        take-over, and nothing when a side's set cannot be trusted (`skipped` says why: the failback
        compares every region then)."""
        catch_up = take_over is None
        what = "catch-up" if catch_up else "failback"
        t0 = time.monotonic()
        transport = link.connect()
        peer = link.remote_name or link.spec.label
        try:
            session = SourceSession(self.identity, acked_seq=link.acked_seq, window_bytes=self.tuning.window_bytes,
                                    heartbeat_interval_s=self.tuning.heartbeat_interval_s,
                                    dead_after_s=self.tuning.dead_after_s, compression=self.tuning.compression)
            conn = _SourceConnection(link, transport, session)
            conn.fetching = True
            reply = conn.handshake(jp.Purpose.FETCH)
            rb = self.region_blocks
            diffs: set[int] = set()
            moved = 0
            fine_compared = 0
            report: dict[str, Any] = {}
            if pull:
                union, why = self._failback_union(conn, reply, local_changes)
                if catch_up and union is None:
                    return {"skipped": why, "bytes_moved": 0, "from": peer}
                fine = max(1, FAILBACK_PIECE_BYTES // self.block_size)
                if rb % fine:
                    fine = rb
                per = rb // fine
                if union is None:
                    log.warning("failback: comparing every region remote=%s reason=%s", peer, why)
                    coarse: list[int] = []
                    conn.compare_regions(range(self.total_regions), rb,
                                         lambda idx, d: coarse.append(idx) if d else None, "failback")
                    candidates = coarse
                else:
                    log.info("%s: comparing the regions either side wrote remote=%s regions=%d of %d", what, peer,
                             len(union), self.total_regions)
                    candidates = sorted(union)
                # inside each candidate region, the 4 KiB pieces that differ: only those cross
                pieces = [p for idx in candidates for p in range(idx * per, (idx + 1) * per)
                          if p * fine < self.num_blocks]
                fine_compared = len(pieces)
                differing: list[int] = []
                conn.compare_regions(pieces, fine, lambda p, d: differing.append(p) if d else None, what)
                diffs = {p // per for p in differing}
                runs = piece_runs(differing, fine, rb, self.num_blocks)
                for lba, n in runs:
                    conn._send(jp.RegionRead(lba, n))
                    while not conn.fetched:
                        if link.stopping():
                            raise LinkFailure("stopping")
                        conn.pump(0.5)
                    got = conn.fetched.popleft()
                    if got.lba != lba or len(got.data) != n * self.block_size:
                        raise jp.ProtocolError(f"REGION_DATA for {got.lba}+{len(got.data)} bytes, asked "
                                               f"{lba}+{n} blocks")
                    self.local_unit.install(lba, got.data)  # type: ignore[attr-defined]
                    moved += len(got.data)
                    if len(runs) > 1 and not catch_up:
                        crash_point("failback.pulled")
                self.local_unit.install_done()  # type: ignore[attr-defined]
                report = {"mode": "full" if union is None else "bitmap",
                          "regions_compared": self.total_regions if union is None else len(union),
                          "regions_total": self.total_regions}
                if union is None:
                    report["mode_reason"] = why
            report = {"bytes_moved": moved, "bytes_compared": conn.bytes_digested,
                      "seconds": round(time.monotonic() - t0, 3), "regions_copied": len(diffs),
                      "regions_compared": 0, "pieces_compared": fine_compared, "from": peer, **report}
            if take_over is None:
                return report
            gens = take_over(report)
            conn._send(gens)
            while not conn.fetch_acks:
                if link.stopping():
                    raise LinkFailure("stopping")
                conn.pump(0.5)
            return report
        finally:
            transport.close()

    def _failback_union(self, conn: _SourceConnection, reply: jp.HelloReply,
                        local_changes: LocalChanges | None) -> tuple[set[int] | None, str]:
        """The regions (of `region_blocks`) written on either side since they last agreed, or None
        and the reason when one side's set cannot be trusted."""
        if local_changes is None:
            return None, "this unit does not know what it wrote since the promotion"
        if jp.Feature.DIRTY_MAP not in reply.features:
            return None, "the remote does not send the regions written on its copy"
        conn._send(jp.DirtyRequest())
        frames: list[jp.DirtyRegions] = []
        while not frames or jp.DirtyFlag.LAST not in frames[-1].flags:
            while not conn.dirty_frames:
                if conn.link.stopping():
                    raise LinkFailure("stopping")
                conn.pump(0.5)
            frames.append(conn.dirty_frames.popleft())
        n, rb = self.num_blocks, self.region_blocks
        union: set[int] = set()

        def add(lba: int, count: int) -> None:
            if count > 0 and lba < n:
                union.update(range(lba // rb, (min(n, lba + count) - 1) // rb + 1))

        for f in frames:
            if jp.DirtyFlag.TRUSTED not in f.flags:
                return None, f"the remote's record of its writes cannot be trusted: {f.reason}"
            if f.total_regions != (n + f.region_blocks - 1) // f.region_blocks:
                return None, (f"the remote's bitmap has {f.total_regions} regions of {f.region_blocks} blocks, "
                              f"not this volume's")
            for k, byte in enumerate(f.bits):
                if byte:
                    for b in range(8):
                        if byte >> b & 1:
                            r = f.first_region + 8 * k + b
                            add(r * f.region_blocks, f.region_blocks)
        mine, why = local_changes(reply)
        if mine is None:
            return None, why
        for lba, count in mine:
            add(lba, count)
        return union, ""

    def _verify_one(self, link: RemoteLink, regions: list[int]) -> list[int]:
        transport = link.connect()
        try:
            # a connection of its own, with a session of its own: the link's positions are not touched
            session = SourceSession(self.identity, acked_seq=link.acked_seq, window_bytes=self.tuning.window_bytes,
                                    heartbeat_interval_s=self.tuning.heartbeat_interval_s,
                                    dead_after_s=self.tuning.dead_after_s, compression=self.tuning.compression)
            conn = _SourceConnection(link, transport, session)
            conn.handshake(jp.Purpose.VERIFY)
            diffs: list[int] = []

            def on_region(idx: int, differs: bool) -> None:
                if differs:
                    diffs.append(idx)

            conn.compare_regions(regions, self.region_blocks, on_region, "verify")
            return diffs
        finally:
            transport.close()
