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

import contextlib
import enum
import logging
import os
import random
import select
import socket
import ssl
import threading
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from firmware.journal import RecordsGone
from firmware.link import protocol as jp
from firmware.pairing import TlsFiles, client_context, peer_identity

log = logging.getLogger(__name__)

DEFAULT_PORT = 7420
OPEN_END = (1 << 64) - 1  # RESYNC_END position meaning "not final yet"


class RemoteState(enum.IntEnum):
    CONNECTING = 1
    RESYNCING = 2
    STREAMING = 3
    DISCONNECTED = 4
    REFUSED = 5  # the remote refused us for a reason retrying will not fix soon (still retried, slowly)
    TARGET_ERROR = 6  # the target is full or failing; retried until it takes writes again
    STOPPED = 7


PERMANENT_ERRORS = frozenset({jp.ErrorCode.UNKNOWN_SOURCE, jp.ErrorCode.PERMISSION_DENIED, jp.ErrorCode.VERSION,
                              jp.ErrorCode.VOLUME_MISMATCH})


@dataclass(frozen=True)
class RemoteSpec:
    """One `--remote HOST:PORT[,mode=async|sync]` / `[[remote]]` entry."""

    address: tuple[str, int] | str
    mode: str = "async"
    name: str | None = None
    bandwidth_limit_bps: int | None = None  # bytes per second on the wire; None = unlimited

    @property
    def host_port(self) -> tuple[str, int]:
        if isinstance(self.address, tuple):
            return self.address
        host, _, port = self.address.rpartition(":")
        return (host.strip("[]") or "127.0.0.1", int(port) if port else DEFAULT_PORT)

    @property
    def label(self) -> str:
        h, p = self.host_port
        return f"{h}:{p}"


@dataclass(frozen=True)
class ReplicatorTuning:
    window_bytes: int = 32 << 20  # bytes in flight; >= 100 Mbit/s x 80 ms x 30
    max_batch_bytes: int = 4 << 20
    heartbeat_interval_s: float = 5.0
    dead_after_s: float = 20.0  # nothing heard for this long: the link is dead
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    sync_timeout_s: float = 15.0  # under Linux sd's 30 s command timeout
    region_blocks: int | None = None  # default: the local unit's, else 1 MiB worth
    digests_per_request: int = 64
    requests_in_flight: int = 4
    compression: bool = True
    drain_timeout_s: float = 120.0  # verify waits this long for the remote to catch up
    overflow_resync_after_s: float = 60.0  # a journal overflow lasting longer: resync rounds anyway
    overflow_round_interval_s: float = 10.0  # between such rounds


@dataclass(frozen=True, slots=True)
class Progress:
    """Reported to the progress callback during resync and verify (drive a `rich` bar with it)."""

    remote: str
    phase: str  # "resync" | "verify"
    done: int  # regions compared
    total: int
    bytes_copied: int


class JournalLike(Protocol):
    @property
    def unit_uuid(self) -> Any: ...
    @property
    def head_seq(self) -> int: ...
    @property
    def durable_seq(self) -> int: ...
    @property
    def tail_seq(self) -> int: ...
    def register_consumer(self, name: str) -> int: ...
    def confirm(self, name: str, seq: int) -> None: ...
    def read_records(self, after_seq: int, max_bytes: int) -> Sequence[Any]: ...
    def wait_for_records(self, after_seq: int, timeout: float) -> bool: ...


class LocalUnitLike(Protocol):
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    def read(self, lba: int, count: int) -> bytes: ...


class LinkFailure(Exception):
    """This session ended; the link thread reconnects."""

    def __init__(self, message: str, state: RemoteState = RemoteState.DISCONNECTED,
                 code: jp.ErrorCode | None = None) -> None:
        super().__init__(message)
        self.state = state
        self.code = code


def _uuid_bytes(value: Any) -> bytes:
    if isinstance(value, uuidlib.UUID):
        return value.bytes
    if isinstance(value, bytes | bytearray) and len(value) == 16:
        return bytes(value)
    return uuidlib.UUID(str(value)).bytes


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
    """The link to one remote unit: a thread that connects, resyncs if needed, and streams."""

    def __init__(self, rep: Replicator, spec: RemoteSpec) -> None:
        self.rep = rep
        self.spec = spec
        self.t = rep.tuning
        self.consumer = f"remote:{spec.name or spec.label}"
        self.state = RemoteState.CONNECTING
        self.cond = threading.Condition()
        self.acked_seq = rep.journal.register_consumer(self.consumer)
        self.sent_seq = self.acked_seq
        self.last_error = ""
        self.recent_errors: deque[str] = deque(maxlen=8)
        self.connected_since: float | None = None
        self.connects = 0
        self.remote_name = ""
        self.degraded = False
        self.bytes_acked = 0
        self.throughput_bps = 0.0
        self._tp_window: deque[tuple[float, int]] = deque()
        self.in_flight: deque[tuple[int, int, int]] = deque()  # (last seq, payload bytes, oldest ts_ns)
        self.in_flight_bytes = 0
        self.avg_record_bytes = 4096.0
        self.last_ack_time = time.monotonic()
        self.resync: dict[str, Any] = {"active": False, "percent": None, "rate_bps": None, "regions_done": 0,
                                       "regions_total": 0, "bytes_copied": 0, "reason": ""}
        self.covered: Any = None  # the last dirty snapshot whose regions this remote has
        self.resync_open = False  # a non-final overflow round left the remote's resync open
        self.next_dirty_check = 0.0
        self.resync_end: int | None = None
        self._sock: socket.socket | None = None
        self._handshaken = False
        self._thread = threading.Thread(target=self._run, name=f"link-{spec.label}", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self.cond.notify_all()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=15)
        self.state = RemoteState.STOPPED

    def _stopping(self) -> bool:
        return self.rep._stop.is_set()

    def _run(self) -> None:
        backoff = self.t.backoff_initial_s
        while not self._stopping():
            self._handshaken = False
            try:
                self._session()
            except LinkFailure as exc:
                self._fail(str(exc), exc.state)
                if exc.code in PERMANENT_ERRORS:
                    backoff = self.t.backoff_max_s
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}", RemoteState.DISCONNECTED)
            except jp.ProtocolError as exc:
                self._fail(f"protocol error: {exc}", RemoteState.DISCONNECTED)
            except Exception as exc:
                log.exception("link failure remote=%s", self.spec.label)
                self._fail(f"internal: {exc}", RemoteState.DISCONNECTED)
            finally:
                self.connected_since = None
                sock, self._sock = self._sock, None
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
                self.in_flight.clear()
                self.in_flight_bytes = 0
                self.resync["active"] = False
                with self.cond:
                    self.cond.notify_all()
            if self._stopping():
                break
            if self._handshaken:  # the remote answered: start the backoff over
                backoff = self.t.backoff_initial_s
            delay = backoff * (0.5 + random.random())
            self.rep._stop.wait(delay)
            backoff = min(self.t.backoff_max_s, backoff * 2)
        self.state = RemoteState.STOPPED

    def _fail(self, message: str, state: RemoteState) -> None:
        if self._stopping():
            return
        self.last_error = message
        self.recent_errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}")
        self.state = state
        log.warning("link down remote=%s state=%s reason=%s", self.spec.label, state.name, message)

    # -- one session ----------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        self.state = RemoteState.CONNECTING
        raw = socket.create_connection(self.spec.host_port, timeout=self.t.connect_timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = raw
        if self.rep.ssl_context is None:
            return raw
        sock = self.rep.ssl_context.wrap_socket(raw, server_hostname=None)
        self._sock = sock
        ident = peer_identity(sock)
        if ident is None or ident[0] != "remote" or (self.spec.name and ident[1] != self.spec.name):
            raise LinkFailure(f"remote certificate names {ident!r}, expected remote {self.spec.name or '*'}",
                              RemoteState.REFUSED, jp.ErrorCode.PERMISSION_DENIED)
        return sock

    def _session(self) -> None:
        """One connection: handshake, resync if needed, stream. Ends only by an exception."""
        sock = self._connect()
        sess = _Session(self, sock)
        reply = sess.handshake(jp.Purpose.REPLICATE)
        self._handshaken = True
        self.remote_name = reply.remote_name
        self.connects += 1
        self.connected_since = time.monotonic()
        self.last_error = ""
        rep = self.rep
        why = self._resync_reason(reply)
        self.next_dirty_check = 0.0
        if why is None:
            self.acked_seq = reply.applied_seq
            if reply.applied_seq > 0:
                rep._confirm(self, reply.applied_seq)
            self.sent_seq = reply.applied_seq
            log.info("link up remote=%s name=%s resume_after=%d", self.spec.label, reply.remote_name,
                     reply.applied_seq)
        else:
            kind, regions, position = why
            log.info("link up remote=%s name=%s resync=%s regions=%d", self.spec.label, reply.remote_name, kind,
                     len(regions))
            sess.resync(kind, regions, rep._dirty_state(), position, final=not rep._overflowing())
        self.state = RemoteState.STREAMING
        sess.stream()
        raise LinkFailure("stopping")

    def _resync_reason(self, reply: jp.HelloReply) -> tuple[str, list[int], int] | None:
        """None to resume streaming after the remote's position, or (reason, region indexes, P) for a
        full comparison. P is the durable position now: reads of the local unit return the newest
        data (records not yet on its volume are laid over), so every record up to P is in the copy."""
        rep = self.rep
        j = rep.journal
        total = list(range(rep.total_regions))
        if reply.flags & jp.ReplyFlag.RESYNC_IN_PROGRESS:
            return "resume interrupted resync", total, j.durable_seq
        if reply.flags & jp.ReplyFlag.NEW_TARGET or reply.volume_uuid != rep.volume_uuid \
                or reply.generation != rep.generation:
            return "initial sync", total, j.durable_seq
        if reply.applied_seq > j.durable_seq:
            return "remote ahead of the journal", total, j.durable_seq
        try:
            if reply.applied_seq + 1 < j.tail_seq:
                return "records no longer in the journal", total, j.durable_seq
            j.read_records(reply.applied_seq, 1)
        except RecordsGone:
            return "records no longer in the journal", total, j.durable_seq
        return None

    # -- accounting (called from the session) -----------------------------------------------------
    def on_ack(self, seq: int) -> None:
        now = time.monotonic()
        acked_bytes = 0
        while self.in_flight and self.in_flight[0][0] <= seq:
            _, nbytes, _ = self.in_flight.popleft()
            acked_bytes += nbytes
        self.in_flight_bytes -= acked_bytes
        self.bytes_acked += acked_bytes
        self._tp_window.append((now, acked_bytes))
        while self._tp_window and now - self._tp_window[0][0] > 5.0:
            self._tp_window.popleft()
        span = max(1e-3, now - self._tp_window[0][0]) if len(self._tp_window) > 1 else 1.0
        self.throughput_bps = sum(b for _, b in self._tp_window) / span
        if seq > self.acked_seq:
            self.acked_seq = seq
            self.last_ack_time = now
            self.rep._confirm(self, seq)
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
                if left <= 0 or self._stopping():
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def sync_gate(self, seq: int) -> None:
        """Blocks the host's write until this remote has `seq` durable (sync mode)."""
        deadline = time.monotonic() + self.t.sync_timeout_s
        with self.cond:
            while self.acked_seq < seq and not self._stopping():
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
        j = self.rep.journal
        head = j.durable_seq
        lag_records = max(0, head - self.acked_seq)
        unsent = max(0, head - self.sent_seq)
        lag_bytes = self.in_flight_bytes + int(unsent * self.avg_record_bytes)
        ts_fn = getattr(j, "timestamp_of", None)
        oldest = ts_fn(self.acked_seq + 1) if (ts_fn is not None and lag_records) else None
        if lag_records == 0:
            lag_s = 0.0
        elif oldest:
            lag_s = max(0.0, time.time() - oldest / 1e9)  # age of the oldest record it lacks
        elif self.in_flight:
            lag_s = max(0.0, time.time() - self.in_flight[0][2] / 1e9)
        else:
            lag_s = time.monotonic() - self.last_ack_time
        return {
            "address": self.spec.label,
            "name": self.spec.name or self.remote_name,
            "state": self.state.name.lower(),
            "mode": self.spec.mode,
            "acked_seq": self.acked_seq,
            "sent_seq": self.sent_seq,
            "lag_records": lag_records,
            "lag_bytes": lag_bytes,
            "lag_seconds": round(lag_s, 3),
            "throughput_bps": round(self.throughput_bps, 1),
            "bytes_acked": self.bytes_acked,
            "connects": self.connects,
            "degraded": self.degraded,
            "bandwidth_limit_bps": self.spec.bandwidth_limit_bps,
            "last_error": self.last_error,
            "recent_errors": list(self.recent_errors),
            "resync": dict(self.resync),
        }


class _Session:
    """One connection, driven by the link thread alone (the TLS socket is never shared between threads).

    A small watcher thread turns `journal.wait_for_records` into a byte on a socketpair, so the
    session can select() on the link and the journal together.
    """

    def __init__(self, link: RemoteLink, sock: socket.socket) -> None:
        self.link = link
        self.t = link.t
        self.sock = sock
        self.conn = jp.JourneyConnection(jp.Role.SOURCE)
        self.last_rx = time.monotonic()
        self.last_tx = time.monotonic()
        self.digests: deque[jp.RegionDigests] = deque()
        self.echoes: set[int] = set()
        self.bucket = _TokenBucket(link.spec.bandwidth_limit_bps) if link.spec.bandwidth_limit_bps else None
        sock.settimeout(self.t.dead_after_s)

    def _send(self, ev: jp.Event) -> None:
        data = self.conn.send(ev)
        if self.bucket is not None:
            self.bucket.spend(len(data))
        self.sock.sendall(data)
        self.last_tx = time.monotonic()

    def _readable(self, timeout: float, extra: Iterable[socket.socket] = ()) -> list[Any]:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return [self.sock]
        r, _, _ = select.select([self.sock, *extra], [], [], max(0.0, timeout))
        return r

    def pump(self, timeout: float, extra: Iterable[socket.socket] = ()) -> list[Any]:
        """Wait up to `timeout` for input; handle every event that arrived. Returns the ready extras."""
        ready = self._readable(timeout, extra)
        if self.sock in ready:
            try:
                data = self.sock.recv(1 << 18)
            except ssl.SSLWantReadError:
                data = None
            if data == b"":
                self.conn.receive_eof()
                raise LinkFailure("remote closed the connection")
            if data:
                self.last_rx = time.monotonic()
                self.conn.receive_data(data)
                self._events()
        now = time.monotonic()
        if now - self.last_rx > self.t.dead_after_s:
            raise LinkFailure(f"nothing heard from the remote for {now - self.last_rx:.1f} s")
        if now - self.last_tx > self.t.heartbeat_interval_s:
            self._send(jp.Heartbeat(time.monotonic_ns()))
        return [r for r in ready if r is not self.sock]

    def _events(self) -> None:
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, jp._NeedData):
                return
            if isinstance(ev, jp.Ack):
                self.link.on_ack(ev.seq)
            elif isinstance(ev, jp.Heartbeat):
                self.echoes.add(ev.token)
            elif isinstance(ev, jp.RegionDigests):
                self.digests.append(ev)
            elif isinstance(ev, jp.Error):
                state = RemoteState.DISCONNECTED
                if ev.code in (jp.ErrorCode.TARGET_FULL, jp.ErrorCode.TARGET_IO):
                    state = RemoteState.TARGET_ERROR
                elif ev.code in PERMANENT_ERRORS:
                    state = RemoteState.REFUSED
                raise LinkFailure(f"remote error {ev.code.name}: {ev.message}", state, ev.code)
            else:
                raise jp.ProtocolError(f"unexpected {type(ev).__name__} from the remote")

    def barrier(self) -> None:
        """Return once the remote has handled every frame sent so far: it answers a heartbeat in
        order, after the frames before it (a RESYNC_END is durable on the remote by then)."""
        token = random.getrandbits(63) | 1
        self._send(jp.Heartbeat(token))
        while token not in self.echoes:
            if self.link.rep._stop.is_set():
                raise LinkFailure("stopping")
            self.pump(0.5)
        self.echoes.discard(token)

    def handshake(self, purpose: jp.Purpose) -> jp.HelloReply:
        rep = self.link.rep
        self._send(jp.Hello(rep.source_id, rep.volume_uuid, rep.volume_size, rep.block_size, rep.generation,
                            self.link.acked_seq, jp.Feature.LZ4 if self.t.compression else jp.Feature.NONE,
                            purpose))
        deadline = time.monotonic() + self.t.connect_timeout_s
        while time.monotonic() < deadline:
            if not self._readable(deadline - time.monotonic()):
                continue
            data = self.sock.recv(1 << 16)
            if not data:
                raise LinkFailure("remote closed the connection during HELLO")
            self.conn.receive_data(data)
            ev = self.conn.next_event()
            if isinstance(ev, jp._NeedData):
                continue
            if isinstance(ev, jp.Error):
                state = RemoteState.REFUSED if ev.code in PERMANENT_ERRORS else RemoteState.TARGET_ERROR \
                    if ev.code in (jp.ErrorCode.TARGET_FULL, jp.ErrorCode.TARGET_IO) else RemoteState.DISCONNECTED
                raise LinkFailure(f"remote refused: {ev.code.name}: {ev.message}", state, ev.code)
            if not isinstance(ev, jp.HelloReply):
                raise jp.ProtocolError(f"expected HELLO_REPLY, got {type(ev).__name__}")
            self.last_rx = time.monotonic()
            return ev
        raise LinkFailure("no HELLO_REPLY in time")

    # -- region comparison (resync and verify) --------------------------------------------------
    def compare_regions(self, regions: Sequence[int], rb: int, on_region: Callable[[int, bool], None],
                        phase: str) -> None:
        """Ask the remote for the digests of `regions`; call on_region(index, differs) for each."""
        rep = self.link.rep
        runs: list[tuple[int, int]] = []
        for idx in sorted(set(regions)):
            if runs and runs[-1][0] + runs[-1][1] == idx and runs[-1][1] < self.t.digests_per_request:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((idx, 1))
        pending = deque(runs)
        outstanding = 0
        done = 0
        total = sum(n for _, n in runs)
        while pending or outstanding:
            while pending and outstanding < self.t.requests_in_flight:
                first, n = pending.popleft()
                self._send(jp.DigestRequest(first, n, rb))
                outstanding += 1
            while not self.digests:
                if rep._stop.is_set():
                    raise LinkFailure("stopping")
                self.pump(0.5)
            d = self.digests.popleft()
            outstanding -= 1
            for k, remote_digest in enumerate(d.digests):
                idx = d.first_region + k
                lba = idx * rb
                n = min(rb, rep.num_blocks - lba)
                local = rep.local_unit.read(lba, n)
                on_region(idx, jp.region_digest(local) != remote_digest)
                done += 1
            rep._progress(Progress(self.link.spec.label, phase, done, total,
                                   int(self.link.resync.get("bytes_copied") or 0)))

    def resync(self, reason: str, regions: list[int], snapshot: Any, position: int,
               final: bool = True) -> None:
        """Copy the `regions` that differ, then ship records after `position` (P).

        `snapshot` is the dirty snapshot (or None) the copy covers: taken before the first region is
        read, so every region it names is copied with data at least as new as it. A round that is not
        `final` (the journal is still overflowing, so writes still bypass it) ends with Q = "never":
        the remote keeps its undo log, and its pre-resync consistent image, until a final round."""
        link, rep = self.link, self.link.rep
        rb = rep.region_blocks
        link.state = RemoteState.RESYNCING
        started = time.monotonic()
        link.resync.update({"active": True, "percent": 0.0, "rate_bps": 0.0, "regions_done": 0,
                            "regions_total": len(regions), "bytes_copied": 0, "reason": reason})
        log.info("resync begins remote=%s reason=%s position=%d regions=%d", link.spec.label, reason, position,
                 len(regions))
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
        self._send(jp.ResyncEnd(end))
        self.barrier()  # the copied regions are durable on the remote before any dirty bit goes
        link.sent_seq = position
        link.resync_end = end
        link.resync_open = not final
        link.resync.update({"active": False, "percent": 100.0, "end_seq": end if final else None,
                            "open": not final})
        if snapshot is not None:
            rep._covered(link, snapshot)
        log.info("resync copy done remote=%s begin=%d end=%d copied_bytes=%d", link.spec.label, position, end,
                 copied)

    # -- streaming ------------------------------------------------------------------------------
    def stream(self) -> None:
        link, rep = self.link, self.link.rep
        j = rep.journal
        wake_r, wake_w = socket.socketpair()
        want = threading.Event()
        alive = threading.Event()
        alive.set()

        def watcher() -> None:
            while alive.is_set():
                if not want.wait(0.5):
                    continue
                if j.wait_for_records(link.sent_seq, 0.5):
                    want.clear()
                    with contextlib.suppress(OSError):
                        wake_w.send(b"x")

        wt = threading.Thread(target=watcher, name=f"link-watch-{link.spec.label}", daemon=True)
        wt.start()
        try:
            while not rep._stop.is_set():
                wait = self._send_batches(want)
                ready = self.pump(min(wait, self.t.heartbeat_interval_s / 2), [wake_r])
                if wake_r in ready:
                    with contextlib.suppress(OSError):
                        wake_r.recv(4096)
        finally:
            alive.clear()
            want.set()
            wt.join(timeout=2)
            wake_r.close()
            wake_w.close()

    def _send_batches(self, want: threading.Event) -> float:
        """Send what the window and the bandwidth cap allow. Returns how long to wait for input."""
        link, rep = self.link, self.link.rep
        while link.in_flight_bytes < self.t.window_bytes:
            if self.bucket is not None:
                w = self.bucket.wait_time(time.monotonic())
                if w > 0:
                    return w
            try:
                records = rep.journal.read_records(link.sent_seq, self.t.max_batch_bytes)
            except RecordsGone:
                raise LinkFailure(f"records after seq={link.sent_seq} are gone from the journal") from None
            if not records:
                now = time.monotonic()
                if now >= link.next_dirty_check:
                    link.next_dirty_check = now + 1.0
                    todo = rep._dirty_for(link)
                    if todo is not None:
                        # every record up to sent_seq precedes the copy on this connection, so the
                        # remote applies them first; P = sent_seq
                        regions, snap, final = todo
                        self.resync("journal overflow" if final else "journal overflow (continuing)",
                                    regions, snap, link.sent_seq, final)
                        link.state = RemoteState.STREAMING
                        if not final:  # rounds during an overflow: spaced out, they read whole regions
                            link.next_dirty_check = time.monotonic() + self.t.overflow_round_interval_s
                        continue
                want.set()
                return 0.5
            batch = jp.Batch(link.sent_seq, jp.batch_records(records))
            nbytes = sum(len(r.payload) for r in batch.records)
            self._send(batch)
            last = batch.records[-1]
            link.in_flight.append((last.seq, nbytes + 33 * len(batch.records), batch.records[0].timestamp_ns))
            link.in_flight_bytes += nbytes + 33 * len(batch.records)
            link.avg_record_bytes = 0.9 * link.avg_record_bytes + 0.1 * (nbytes / len(batch.records) + 33)
            link.sent_seq = last.seq
            self.pump(0)
        return 0.5


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
        local_unit: LocalUnitLike,
        journal: JournalLike,
        *,
        source_id: str,
        remotes: Sequence[RemoteSpec],
        tls: TlsFiles | None = None,
        tls_dir: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        tuning: ReplicatorTuning | None = None,
        progress: Callable[[Progress], None] | None = None,
        plaintext: bool = False,
    ) -> None:
        self.local_unit = local_unit
        self.journal = journal
        self.source_id = source_id
        self.tuning = tuning or ReplicatorTuning()
        self.state_dir = state_dir
        if tls is None and tls_dir:
            tls = TlsFiles.for_source(tls_dir, source_id)
        if tls is None and not plaintext:
            raise ValueError("the journey link needs TLS files (tls= or tls_dir=, made by `usbmirror pair`); "
                             "plaintext=True is for tests and benchmarks only")
        self.ssl_context: ssl.SSLContext | None = client_context(tls) if tls is not None else None
        self.volume_uuid = _uuid_bytes(journal.unit_uuid)
        gen = getattr(journal, "generation", None)
        if gen is None:
            sb = getattr(journal, "superblock", None)
            gen = getattr(sb, "epoch", 1)  # a new journal format starts seqs again under a new epoch
        self.generation = int(gen) if gen is not None else 1
        self.block_size = local_unit.block_size
        self.num_blocks = local_unit.num_blocks
        self.volume_size = self.block_size * self.num_blocks
        rb = self.tuning.region_blocks or int(getattr(local_unit, "region_blocks", 0) or 0) \
            or max(1, (1 << 20) // self.block_size)
        self.region_blocks = rb
        self.total_regions = (self.num_blocks + rb - 1) // rb
        self.progress_callbacks: list[Callable[[Progress], None]] = [progress] if progress else []
        self._stop = threading.Event()
        self._confirm_lock = threading.Lock()
        self._dirty_lock = threading.Lock()
        self._cleared_token = -1
        self._overflow_seen: float | None = None
        self.links = [RemoteLink(self, spec) for spec in remotes]
        for link in self.links:
            if link.spec.mode == "sync":
                add_gate = getattr(local_unit, "add_sync_gate", None)
                if add_gate is None:
                    raise ValueError("sync mode needs a local unit with sync gates")
                add_gate(link.sync_gate)
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
        self._stop.set()
        remove = getattr(self.local_unit, "remove_sync_gate", None)
        for link in self.links:
            if link.spec.mode == "sync" and remove is not None:
                remove(link.sync_gate)
            link.stop()

    # -- shared helpers -------------------------------------------------------------------------
    def _confirm(self, link: RemoteLink, seq: int) -> None:
        with self._confirm_lock:
            try:
                self.journal.confirm(link.consumer, min(seq, self.journal.durable_seq))
            except Exception as exc:  # the journal refusing a confirm must not kill the link
                log.warning("journal confirm failed consumer=%s seq=%d error=%s", link.consumer, seq, exc)

    def _progress(self, p: Progress) -> None:
        for cb in self.progress_callbacks:
            try:
                cb(p)
            except Exception:
                log.exception("progress callback failed")

    def _dirty_state(self) -> Any:
        """The local unit's current dirty snapshot, or None when it has none (or no bitmap)."""
        snap_fn = getattr(self.local_unit, "dirty_snapshot", None)
        if snap_fn is None:
            return None
        snap = snap_fn()
        return snap if getattr(snap, "regions", None) else None

    def _overflowing(self) -> bool:
        """Whether host writes may still bypass the journal. The local unit's `overflow` ends as soon
        as the journal has room again, also with an idle host (`LocalUnit.overflow`)."""
        return bool(getattr(self.local_unit, "overflow", False))

    def _dirty_for(self, link: RemoteLink) -> tuple[list[int], Any, bool] | None:
        """Dirty regions this remote still needs (written straight to the local volume while the
        journal was full), with whether this round can be final.

        While the overflow lasts the copy would chase the writes, so the first `overflow_resync_after_s`
        wait; after that (say another remote is down and keeps the journal full) rounds run anyway so
        this remote does not fall arbitrarily behind, each one not final: the remote keeps its
        consistent pre-resync image (undo log) until the final round after the overflow ends."""
        now = time.monotonic()
        overflowing = self._overflowing()
        if overflowing:
            if self._overflow_seen is None:
                self._overflow_seen = now
            if now - self._overflow_seen < self.tuning.overflow_resync_after_s:
                return None
        else:
            self._overflow_seen = None
        snap = self._dirty_state()
        new = snap is not None and (link.covered is None or snap.token > link.covered.token)
        if not new and not (link.resync_open and not overflowing):
            return None
        rb = self.region_blocks
        idx: set[int] = set()
        for lba, count in (snap.regions if snap is not None else ()):
            idx.update(range(lba // rb, (lba + max(count, 1) - 1) // rb + 1))
        return sorted(i for i in idx if i < self.total_regions), snap, not overflowing

    def _covered(self, link: RemoteLink, snap: Any) -> None:
        """`link` holds every region of `snap`; once every remote does, the dirty bits may go."""
        with self._dirty_lock:
            if link.covered is None or snap.token > link.covered.token:
                link.covered = snap
            if any(ln.covered is None for ln in self.links):
                return
            oldest = min((ln.covered for ln in self.links), key=lambda s: s.token)
            if oldest.token <= self._cleared_token:
                return
            clear = getattr(self.local_unit, "clear_dirty", None)
            if clear is not None:
                clear(oldest)
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

    def _verify_one(self, link: RemoteLink, regions: list[int]) -> list[int]:
        raw = socket.create_connection(link.spec.host_port, timeout=self.tuning.connect_timeout_s)
        sock: socket.socket = raw
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(raw, server_hostname=None)
            sess = _Session(link, sock)
            sess.handshake(jp.Purpose.VERIFY)
            diffs: list[int] = []

            def on_region(idx: int, differs: bool) -> None:
                if differs:
                    diffs.append(idx)

            sess.compare_regions(regions, self.region_blocks, on_region, "verify")
            return diffs
        finally:
            sock.close()


@dataclass
class RichProgress:
    """A progress callback that draws one `rich` bar per remote and phase (for the CLI)."""

    bars: dict[tuple[str, str], Any] = field(default_factory=dict)
    _progress: Any = None

    def __enter__(self) -> RichProgress:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.fields[copied]}"), TimeRemainingColumn())
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, p: Progress) -> None:
        key = (p.remote, p.phase)
        if key not in self.bars:
            self.bars[key] = self._progress.add_task(f"{p.phase} {p.remote}", total=p.total, copied="")
        self._progress.update(self.bars[key], completed=p.done, total=p.total,
                              copied=f"{p.bytes_copied / 1e6:.1f} MB copied")
