"""`IscsiServer`: the socket adapter that runs `firmware.iscsi.connection.Connection`s.

One thread per connection reads the socket (into one buffer, `recv_into`), feeds its `Connection`
and runs the commands it yields on the connection's own `ScsiTarget` (its own sense data, sent with
the response), without a hand-off per command. Writes are group-committed: over a store that can
defer its wait (`GroupCommitStore`, the local unit), a WRITE or UNMAP puts its record in the journal
and returns at once; the responses of every such command of one batch of received PDUs go to the
connection's committer threads, one of which waits once for the journal sync that covers them all
(and the sync remotes) and only then sends them. Meanwhile the reader takes the next batch, and the
other committer takes it to a sync of its own that overlaps the first (the journal keeps several
flash syncs in flight, each making durable what was written before it started); concurrent
connections share them too (the journal's own group commit). Two committers per connection
(`committers`) is the default: measured under load on two cores, one left the next batch waiting
for the sync in flight, and four cost more thread hand-offs than their overlap gained; while both
wait, the batches the reader queues are taken together by the next free one. No response is sent
before its record is durable. SYNCHRONIZE CACHE, which waits
for the flash itself, runs on the committer as well, so the reader stays free (NOP-Outs, task
management). Other commands (reads, inquiries) are answered at once.

Keep-alive: after `nop_interval` seconds of silence in the full feature phase the target sends a
NOP-In ping; an initiator that has not answered (nor sent anything) `nop_timeout` seconds later is
dropped and logged.

Lifecycle: a context manager; `close()` stops accepting, closes every connection and waits for the
commands that are running (their writes complete on the store; ERL 0 drops only the responses).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from firmware.identity import UnitIdentity
from firmware.iscsi.connection import Connection, Phase, ScsiTask, TargetConfig
from firmware.logical_unit import CommandPlan, CommandResult, Status
from firmware.scsi.reservations import Reservations
from firmware.scsi.sense import Sense
from firmware.storage import BlockStore, StorageError

if TYPE_CHECKING:
    from firmware.scsi.shared import SharedUnit

log = logging.getLogger(__name__)

_RECV_BYTES = 512 * 1024
_LOGIN_TIMEOUT_S = 30.0
_INTERNAL_FAILURE = Sense(0x04, 0x44, 0x00)
# commands that wait for the flash (or the sync remotes) themselves: run off the reader thread
_SLOW_OPCODES = frozenset({0x35, 0x91})  # SYNCHRONIZE CACHE (10), (16)


class SenseUnit(Protocol):
    """What the server needs of a SCSI logical unit: `ScsiTarget` is one."""

    def plan(self, cdb: bytes) -> CommandPlan: ...

    def execute(self, cdb: bytes, data_out: bytes = b"", nexus: str = "") -> CommandResult: ...

    @property
    def sense(self) -> Sense: ...

    @property
    def block_size(self) -> int: ...

    def status(self) -> dict[str, object]: ...


@runtime_checkable
class GroupCommitStore(BlockStore, Protocol):
    """A block store whose writes can be journaled now and waited for later (`LocalUnit`).

    A ticket > 0 must be passed to `complete()` before the write is acknowledged; < 0 asks for a
    sync soon without an acknowledgement depending on it; 0 needs nothing."""

    def submit_write(self, lba: int, data: bytes, *, fua: bool = False) -> int: ...

    def submit_unmap(self, lba: int, count: int) -> int: ...

    def complete(self, ticket: int) -> None: ...


def combine_tickets(a: int, b: int) -> int:
    """One ticket that covers both: a journal sync covers every record appended before it, and the
    sync gates are passed for the highest seq that needs them."""
    if a > 0 or b > 0:
        return max(a, b)
    return min(a, b)


class DeferredWrites:
    """A `BlockStore` over a `GroupCommitStore` for one connection's target: `write()` and `unmap()`
    journal and return at once, and the ticket to wait for is collected with `take()`."""

    def __init__(self, store: GroupCommitStore) -> None:
        self._store = store
        self._ticket = 0

    def take(self) -> int:
        ticket, self._ticket = self._ticket, 0
        return ticket

    def complete(self, ticket: int) -> None:
        self._store.complete(ticket)

    @property
    def block_size(self) -> int:
        return self._store.block_size

    @property
    def num_blocks(self) -> int:
        return self._store.num_blocks

    @property
    def write_cache(self) -> bool:
        return self._store.write_cache

    @property
    def read_only(self) -> bool:
        return self._store.read_only

    def set_write_cache(self, enabled: bool) -> None:
        self._store.set_write_cache(enabled)

    def read(self, lba: int, count: int) -> bytes:
        return self._store.read(lba, count)

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self._ticket = combine_tickets(self._ticket, self._store.submit_write(lba, data, fua=fua))

    def flush(self) -> None:
        self._store.flush()

    def unmap(self, lba: int, count: int) -> None:
        self._ticket = combine_tickets(self._ticket, self._store.submit_unmap(lba, count))


@dataclass
class Lane:
    """What one connection runs its commands on: a SCSI target and, when the target's store is a
    `DeferredWrites`, that store (the server then commits writes in groups)."""

    unit: SenseUnit
    writes: DeferredWrites | None = None


@dataclass(slots=True)
class _Done:
    task_id: int
    result: CommandResult
    sense: bytes


class _Peer:
    def __init__(self, sock: socket.socket, conn: Connection, lane: Lane, slow: SenseUnit) -> None:
        self.sock = sock
        self.conn = conn
        self.lane = lane
        # the target slow tasks run on (committers, one at a time): a target is not shared between
        # threads, its sense data belongs to the command it just ran
        self.slow_unit = slow
        self.slow_lock = threading.Lock()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        # the committer's work: (ticket, done commands) to answer once durable, or a slow task to run
        self.slow: queue.SimpleQueue[tuple[int, list[_Done]] | ScsiTask | None] = queue.SimpleQueue()
        self.committers: list[threading.Thread] = []
        self.logged_in = False       # reached full feature phase: its nexus may hold a reservation
        self.nexus_ended = False     # its SPC-2 reservation was released (logout or connection end)


class IscsiServer:
    """Listens on (host, port) and serves `config`'s target; `unit_factory` makes each connection's
    target (a `SenseUnit`, or a `Lane` to have its writes group-committed)."""

    def __init__(
        self,
        config: TargetConfig,
        unit_factory: Callable[[], SenseUnit | Lane],
        *,
        host: str,
        port: int,
        reservations: Reservations | None = None,
        nop_interval: float = 15.0,
        nop_timeout: float = 15.0,
        committers: int = 2,
    ) -> None:
        self._config = config
        self._committers = max(1, committers)
        self._reservations = reservations  # told of nexus losses and resets (SPC-2 reservations end)
        self._factory = unit_factory
        self._nop_interval = nop_interval
        self._nop_timeout = nop_timeout
        self._retired: Counter[str] = Counter()  # command counts of connections that ended
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.5)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._peers: set[_Peer] = set()
        self._peers_lock = threading.Lock()
        self._stop = threading.Event()
        self._logins = 0
        self._refused = 0
        self._dropped_idle = 0
        self._accept_thread = threading.Thread(target=self._accept_loop, name="iscsi-accept", daemon=True)
        self._accept_thread.start()
        log.info("iscsi target listening host=%s port=%d target=%s", host, self.port, config.target_name)

    @property
    def target_name(self) -> str:
        return self._config.target_name

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> IscsiServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._accept_thread.join()
        self._listener.close()
        with self._peers_lock:
            peers = list(self._peers)
        for peer in peers:
            _shutdown(peer.sock)
        for peer in peers:
            if peer.thread is not None:
                peer.thread.join()

    # ---- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        with self._peers_lock:
            peers = list(self._peers)
            commands = Counter(self._retired)
        sessions = [
            {
                "initiator": p.conn.initiator_name,
                "peer": p.conn.peer,
                "session_type": p.conn.session_type,
                "phase": p.conn.phase.value,
                "in_flight": p.conn.in_flight,
                "header_digest": p.conn.params.header_digest,
                "data_digest": p.conn.params.data_digest,
            }
            for p in peers
        ]
        for p in peers:
            commands.update(_command_counts(p.lane.unit))
            commands.update(_command_counts(p.slow_unit))
        return {
            "target": self._config.target_name,
            "commands": dict(sorted(commands.items())),
            "portal": f"{self.host}:{self.port}",
            "chap": self._config.chap is not None,
            "sessions": sessions,
            "logins": self._logins,
            "logins_refused": self._refused,
            "dropped_idle": self._dropped_idle,
        }

    # ---- threads ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("iscsi accept failed")
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                made = self._factory()
                lane = made if isinstance(made, Lane) else Lane(made)
                slow = self._factory()
                slow_unit = slow.unit if isinstance(slow, Lane) else slow
                here = sock.getsockname()
            except Exception:
                log.exception("iscsi connection could not be set up peer=%s:%s", addr[0], addr[1])
                sock.close()
                continue
            config = self._config
            if not config.portal:
                # SendTargets names the address this initiator reached, even when listening on 0.0.0.0
                config = replace(config, portal=f"[{here[0]}]:{here[1]}" if ":" in here[0] else f"{here[0]}:{here[1]}")
            conn = Connection(config, lane.unit.plan, random=os.urandom, peer=f"{addr[0]}:{addr[1]}",
                              block_size=lane.unit.block_size)
            peer = _Peer(sock, conn, lane, slow_unit)
            peer.thread = threading.Thread(target=self._serve, args=(peer,), name=f"iscsi-{addr[1]}", daemon=True)
            with self._peers_lock:
                self._peers.add(peer)
            peer.thread.start()

    def _serve(self, peer: _Peer) -> None:
        sock, conn = peer.sock, peer.conn
        peer.committers = [threading.Thread(target=self._commit_loop, args=(peer,),
                                            name=f"{threading.current_thread().name}-commit{i}", daemon=True)
                           for i in range(self._committers)]
        for thread in peer.committers:
            thread.start()
        counted = False
        buf = bytearray(_RECV_BYTES)
        view = memoryview(buf)
        pinged_at = 0.0
        try:
            sock.settimeout(_LOGIN_TIMEOUT_S)
            while not conn.closed:
                try:
                    n = sock.recv_into(buf)
                except TimeoutError:
                    if conn.phase is Phase.LOGIN:
                        log.warning("iscsi login timed out peer=%s", conn.peer)
                        break
                    if pinged_at:
                        log.warning("iscsi initiator gone: no answer to a NOP-In for %.0f s, connection dropped "
                                    "peer=%s initiator=%s", self._nop_timeout, conn.peer, conn.initiator_name)
                        self._dropped_idle += 1
                        break
                    with peer.lock:
                        conn.ping()
                        self._flush(peer)
                    pinged_at = time.monotonic()
                    sock.settimeout(self._nop_timeout)
                    continue
                except OSError:
                    break
                if not n:
                    break
                if pinged_at:
                    pinged_at = 0.0
                    sock.settimeout(self._nop_interval)
                with peer.lock:
                    resets = conn.resets
                    conn.receive(view[:n])
                    tasks = conn.take_tasks()
                    self._flush(peer)
                if conn.resets != resets and self._reservations is not None:
                    self._reservations.reset()
                if not counted and conn.phase is Phase.FULL_FEATURE:
                    counted = peer.logged_in = True
                    self._logins += 1
                    sock.settimeout(self._nop_interval if self._nop_interval > 0 else None)
                if tasks:
                    self._run_batch(peer, tasks)
            if conn.close_reason.startswith("login refused"):
                self._refused += 1
        finally:
            # the nexus is gone now: its reservation ends before the writes in flight are waited for,
            # so an initiator that logs in next is not refused by it
            self._end_nexus(peer)
            for _ in peer.committers:
                peer.slow.put(None)
            for thread in peer.committers:
                thread.join()  # the writes taken complete on the store; their answers are dropped
            with peer.lock:
                _shutdown(sock)
            sock.close()
            with self._peers_lock:
                self._peers.discard(peer)
                self._retired.update(_command_counts(peer.lane.unit))
                self._retired.update(_command_counts(peer.slow_unit))

    def _run_batch(self, peer: _Peer, tasks: list[ScsiTask]) -> None:
        """Run the commands of one batch on the connection's target; answer those that need no wait
        now and hand the others to the committer, all in one group."""
        unit, writes = peer.lane.unit, peer.lane.writes
        nexus = peer.conn.nexus
        ticket = 0
        waiting: list[_Done] = []
        answered: list[_Done] = []
        for task in tasks:
            if task.cdb[0] in _SLOW_OPCODES:
                if waiting:  # what came before it is answered first, in order
                    peer.slow.put((ticket, waiting))
                    ticket, waiting = 0, []
                peer.slow.put(task)
                continue
            done = _execute(unit, task, nexus)
            taken = writes.take() if writes is not None else 0
            if taken:
                ticket = combine_tickets(ticket, taken)
                waiting.append(done)
            else:
                answered.append(done)
        if waiting:
            peer.slow.put((ticket, waiting))
        if answered:
            with peer.lock:
                for done in answered:
                    peer.conn.task_done(done.task_id, int(done.result.status), done.result.data, done.sense)
                self._flush(peer)

    def _commit_loop(self, peer: _Peer) -> None:
        writes = peer.lane.writes
        while True:
            item = peer.slow.get()
            if item is None:
                return
            if isinstance(item, ScsiTask):
                with peer.slow_lock:
                    done = [_execute(peer.slow_unit, item, peer.conn.nexus)]
            else:
                ticket, done = item
                # every batch already queued shares this one wait
                while True:
                    try:
                        more = peer.slow.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(more, tuple):
                        peer.slow.put(more)  # a slow task or a stop: for the next free committer
                        break
                    ticket = combine_tickets(ticket, more[0])
                    done += more[1]
                try:
                    if writes is not None:
                        writes.complete(ticket)
                except StorageError as exc:
                    log.warning("iscsi writes failed to become durable peer=%s error=%s", peer.conn.peer, exc)
                    sense = Sense(exc.sense_key & 0x0F, exc.asc & 0xFF, exc.ascq & 0xFF).to_fixed()
                    done = [_Done(d.task_id, CommandResult(Status.CHECK_CONDITION), sense) for d in done]
                except Exception:
                    log.exception("iscsi commit failed peer=%s", peer.conn.peer)
                    sense = _INTERNAL_FAILURE.to_fixed()
                    done = [_Done(d.task_id, CommandResult(Status.CHECK_CONDITION), sense) for d in done]
            with peer.lock:
                for d in done:
                    peer.conn.task_done(d.task_id, int(d.result.status), d.result.data, d.sense)
                self._flush(peer)

    def _end_nexus(self, peer: _Peer) -> None:
        """The I_T nexus of `peer` ended (logout or a lost connection): its SPC-2 reservation is
        released, once."""
        if peer.logged_in and not peer.nexus_ended and self._reservations is not None:
            peer.nexus_ended = True
            self._reservations.nexus_lost(peer.conn.nexus)

    def _flush(self, peer: _Peer) -> None:
        """Send what the connection produced; called with `peer.lock` held, so PDUs leave in order.
        A logout ends the nexus before its answer leaves, so the initiator's next session finds its
        reservation released."""
        out = peer.conn.take_output()
        if peer.conn.closed and peer.conn.close_reason == "logout":
            self._end_nexus(peer)
        if out:
            try:
                peer.sock.sendall(out)
            except OSError as exc:
                log.info("iscsi send failed peer=%s error=%s", peer.conn.peer, exc)
                _shutdown(peer.sock)
                return
        if peer.conn.closed:
            _shutdown(peer.sock)


def _execute(unit: SenseUnit, task: ScsiTask, nexus: str) -> _Done:
    try:
        result = unit.execute(task.cdb, task.data_out, nexus)
        sense = unit.sense.to_fixed() if result.status == Status.CHECK_CONDITION else b""
    except Exception:  # the target never raises; this guards the adapter's own promise
        log.exception("iscsi command failed")
        result, sense = CommandResult(Status.CHECK_CONDITION), _INTERNAL_FAILURE.to_fixed()
    return _Done(task.task_id, result, sense)


def _command_counts(unit: SenseUnit) -> dict[str, int]:
    counts = unit.status().get("commands")
    return {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}


IQN_PREFIX = "iqn.2026-01.net.usbmirror"


def unit_iqn(unit_uuid: uuid.UUID) -> str:
    """The target name of a unit: stable for its identity (RFC 3720 3.2.6.3.1 iqn. format)."""
    return f"{IQN_PREFIX}:{unit_uuid.hex}"


@contextmanager
def serve_unit(
    store: BlockStore,
    ident: UnitIdentity,
    *,
    host: str,
    port: int,
    chap: tuple[str, str] | None = None,
    mutual_chap: tuple[str, str] | None = None,
    portal: str | None = None,
    initiators: tuple[str, ...] = (),
    shared: SharedUnit | None = None,
    nop_interval: float = 15.0,
    nop_timeout: float = 15.0,
) -> Iterator[IscsiServer]:
    """Serve `store` (the local unit) as the unit's iSCSI target, with the same SCSI identity
    (serial, VPD 0x83 designator) the USB transports show, so a host sees one disk either way.
    `shared`: the reservations and write gate of a USB target serving the same store, if any, so
    both buses see one set of reservations. `portal`: the "host:port" SendTargets advertises (default:
    the address each initiator reached). `mutual_chap`: the (name, secret) the target proves to an
    initiator that asks (needs `chap`). `nop_interval`: seconds of silence before a NOP-In
    ping (0: none); `nop_timeout`: seconds the initiator has to answer it before it is dropped."""
    from firmware.scsi import naa_locally_assigned
    from firmware.scsi.lba_status import LbaStatusTarget
    from firmware.scsi.shared import SharedUnit

    unit_state = shared if shared is not None else SharedUnit()

    device_id = naa_locally_assigned(ident.unit_uuid.bytes)
    config = TargetConfig(
        target_name=unit_iqn(ident.unit_uuid),
        portal=portal or "",
        alias=f"usbmirror {ident.serial}",
        chap=chap,
        mutual_chap=mutual_chap,
        allowed_initiators=frozenset(initiators) if initiators else None,
    )

    def lane() -> Lane:
        writes = DeferredWrites(store) if isinstance(store, GroupCommitStore) else None
        # max_unmap_blocks: 1 Mi blocks per UNMAP, the ceiling initiators such as libiscsi's suite expect.
        # max_write_same_blocks below 64 Ki: some initiators (libiscsi's suite among them) size a plain
        # WRITE by MAXIMUM WRITE SAME LENGTH, which must then not exceed what one command may carry.
        unit = LbaStatusTarget(writes if writes is not None else store, serial=ident.serial, device_id=device_id,
                               max_unmap_blocks=1 << 20, max_write_same_blocks=0xFFFF, shared=unit_state)
        return Lane(unit, writes)

    with IscsiServer(
        config,
        lane,
        host=host,
        port=port,
        reservations=unit_state.reservations,
        nop_interval=nop_interval,
        nop_timeout=nop_timeout,
    ) as server:
        yield server


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
