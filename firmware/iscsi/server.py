"""`IscsiServer`: the socket adapter that runs `firmware.iscsi.connection.Connection`s.

One thread per connection reads the socket and feeds its `Connection`; the commands it yields run
on a shared pool of worker threads, each with its own `ScsiTarget` instance over the SAME block
store (the local unit). The store is thread-safe and commits the journal in groups, so writes that
are in flight at once, from one session or several, share one flash sync. Each worker's target
keeps its own sense data, which is read right after `execute()` and sent with the response
(autosense), so concurrent commands never see each other's sense.

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
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from firmware.identity import UnitIdentity
from firmware.iscsi.connection import Connection, Phase, ScsiTask, TargetConfig
from firmware.logical_unit import CommandPlan, CommandResult, Status
from firmware.scsi.reservations import Reservations
from firmware.scsi.sense import Sense
from firmware.storage import BlockStore

if TYPE_CHECKING:
    from firmware.scsi.shared import SharedUnit

log = logging.getLogger(__name__)

_RECV_BYTES = 256 * 1024
_LOGIN_TIMEOUT_S = 30.0


class SenseUnit(Protocol):
    """What the server needs of a SCSI logical unit: `ScsiTarget` is one."""

    def plan(self, cdb: bytes) -> CommandPlan: ...

    def execute(self, cdb: bytes, data_out: bytes = b"", nexus: str = "") -> CommandResult: ...

    @property
    def sense(self) -> Sense: ...

    @property
    def block_size(self) -> int: ...

    def status(self) -> dict[str, object]: ...


class _Peer:
    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None


class IscsiServer:
    """Listens on (host, port) and serves `config`'s target from units made by `unit_factory`."""

    def __init__(
        self,
        config: TargetConfig,
        unit_factory: Callable[[], SenseUnit],
        *,
        host: str,
        port: int,
        workers: int = 16,
        reservations: Reservations | None = None,
    ) -> None:
        self._config = config
        self._reservations = reservations  # told of nexus losses and resets (SPC-2 reservations end)
        self._factory = unit_factory
        self._units: queue.SimpleQueue[SenseUnit] = queue.SimpleQueue()
        self._all_units = [unit_factory() for _ in range(workers)]
        for unit in self._all_units:
            self._units.put(unit)
        self._planners: list[SenseUnit] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="iscsi-cmd")
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.5)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._peers: set[_Peer] = set()
        self._peers_lock = threading.Lock()
        self._stop = threading.Event()
        self._logins = 0
        self._refused = 0
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
        self._pool.shutdown(wait=True)

    # ---- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        with self._peers_lock:
            peers = list(self._peers)
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
        commands: dict[str, int] = {}
        for unit in self._all_units:
            counts = unit.status().get("commands")
            if isinstance(counts, dict):
                for name, n in counts.items():
                    commands[name] = commands.get(name, 0) + int(n)
        return {
            "target": self._config.target_name,
            "commands": dict(sorted(commands.items())),
            "portal": f"{self.host}:{self.port}",
            "chap": self._config.chap is not None,
            "sessions": sessions,
            "logins": self._logins,
            "logins_refused": self._refused,
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
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            planner = self._factory()
            here = sock.getsockname()
            # SendTargets names the address this initiator reached, even when listening on 0.0.0.0
            config = replace(self._config, portal=f"[{here[0]}]:{here[1]}" if ":" in here[0] else f"{here[0]}:{here[1]}")
            conn = Connection(config, planner.plan, random=os.urandom, peer=f"{addr[0]}:{addr[1]}",
                              block_size=planner.block_size)
            peer = _Peer(sock, conn)
            peer.thread = threading.Thread(target=self._serve, args=(peer,), name=f"iscsi-{addr[1]}", daemon=True)
            with self._peers_lock:
                self._peers.add(peer)
            peer.thread.start()

    def _serve(self, peer: _Peer) -> None:
        sock, conn = peer.sock, peer.conn
        counted = False
        try:
            sock.settimeout(_LOGIN_TIMEOUT_S)
            while not conn.closed:
                try:
                    data = sock.recv(_RECV_BYTES)
                except TimeoutError:
                    if conn.phase is Phase.LOGIN:
                        log.warning("iscsi login timed out peer=%s", conn.peer)
                        break
                    continue
                except OSError:
                    break
                if not data:
                    break
                with peer.lock:
                    resets = conn.resets
                    conn.receive(data)
                    tasks = conn.take_tasks()
                    self._flush(peer)
                if conn.resets != resets and self._reservations is not None:
                    self._reservations.reset()
                if not counted and conn.phase is Phase.FULL_FEATURE:
                    counted = True
                    self._logins += 1
                    sock.settimeout(None)
                for task in tasks:
                    self._pool.submit(self._run, peer, task)
            if conn.close_reason.startswith("login refused"):
                self._refused += 1
            if counted and self._reservations is not None:
                self._reservations.nexus_lost(conn.nexus)
        finally:
            with peer.lock:  # commands still running report to the connection and are dropped
                _shutdown(sock)
            sock.close()
            with self._peers_lock:
                self._peers.discard(peer)

    def _flush(self, peer: _Peer) -> None:
        """Send what the connection produced; called with `peer.lock` held, so PDUs leave in order."""
        out = peer.conn.take_output()
        if out:
            try:
                peer.sock.sendall(out)
            except OSError as exc:
                log.info("iscsi send failed peer=%s error=%s", peer.conn.peer, exc)
                _shutdown(peer.sock)
                return
        if peer.conn.closed:
            _shutdown(peer.sock)

    def _run(self, peer: _Peer, task: ScsiTask) -> None:
        unit = self._units.get()
        try:
            result = unit.execute(task.cdb, task.data_out, peer.conn.nexus)
            sense = unit.sense.to_fixed() if result.status == Status.CHECK_CONDITION else b""
        except Exception:  # the target never raises; this guards the adapter's own promise
            log.exception("iscsi command failed peer=%s", peer.conn.peer)
            result, sense = CommandResult(Status.CHECK_CONDITION), Sense(0x04, 0x44, 0x00).to_fixed()
        finally:
            self._units.put(unit)
        with peer.lock:
            peer.conn.task_done(task.task_id, int(result.status), result.data, sense)
            self._flush(peer)


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
    initiators: tuple[str, ...] = (),
    shared: SharedUnit | None = None,
) -> Iterator[IscsiServer]:
    """Serve `store` (the local unit) as the unit's iSCSI target, with the same SCSI identity
    (serial, VPD 0x83 designator) the USB transports show, so a host sees one disk either way.
    `shared`: the reservations and write gate of a USB target serving the same store, if any, so
    both buses see one set of reservations."""
    from firmware.scsi import naa_locally_assigned
    from firmware.scsi.lba_status import LbaStatusTarget
    from firmware.scsi.shared import SharedUnit

    unit_state = shared if shared is not None else SharedUnit()

    device_id = naa_locally_assigned(ident.unit_uuid.bytes)
    config = TargetConfig(
        target_name=unit_iqn(ident.unit_uuid),
        portal=f"{host}:{port}",
        alias=f"usbmirror {ident.serial}",
        chap=chap,
        allowed_initiators=frozenset(initiators) if initiators else None,
    )
    with IscsiServer(
        # max_unmap_blocks: 1 Mi blocks per UNMAP, the ceiling initiators such as libiscsi's suite expect.
        # max_write_same_blocks below 64 Ki: some initiators (libiscsi's suite among them) size a plain
        # WRITE by MAXIMUM WRITE SAME LENGTH, which must then not exceed what one command may carry.
        config,
        lambda: LbaStatusTarget(store, serial=ident.serial, device_id=device_id, max_unmap_blocks=1 << 20,
                                max_write_same_blocks=0xFFFF, shared=unit_state),
        host=host,
        port=port,
        reservations=unit_state.reservations,
    ) as server:
        yield server


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
