"""The remote unit (`usbmirror remote`): a TCP/TLS server that applies each source's journal to its target.

Each source id maps to its own target (an image file, a partition, a whole disk or an md device,
opened as `firmware.volume.Volume`). A connection from a source goes through the journey protocol
(`firmware.link`): HELLO (the peer certificate must name the source id it asks for), then batches
of records, applied strictly in journal order, made durable (fdatasync of the target), and only then
acknowledged with the new applied position.

Durable position: `<state_dir>/<source id>.json`, a small sidecar written tmp + fsync + rename +
fsync(dir) after the target's fdatasync. A crash between the two re-applies records the source sends
again; records are absolute block writes applied in order, so applying one twice leaves the same
bytes (and a record at or below the stored position is skipped, counted as a duplicate).

Resync (initial sync, or after the source's journal overflowed): the source records its position P,
asks for region digests, sends the regions that differ, marks the end of the copy with Q (its position
then), and streams the records after P. Between the start of the resync and the moment records up to
Q are applied, the target is *not* a consistent image (regions copied at different instants). So,
when the target held a consistent image before (same volume, applied position > 0), every block
range is saved to an undo log (`<state_dir>/<source id>.undo`, fsynced before the target is
overwritten, one copy per 64 KiB chunk) from RESYNC_BEGIN until the position Q is applied; then the
log is dropped. `rollback_resync()` restores the pre-resync consistent image, for a switchover while a
resync is incomplete. docs/JOURNEY.md explains why the image at Q is consistent.

Layout: `firmware.replication.target.TargetSession` decides (hello checks, order of applies, the
durable position, resync state); `firmware.target_store.TargetStore` does the target's I/O (apply,
sync, state file, undo log, with the `ApplyHook` point before blocks are overwritten);
`firmware.link_transport.LinkTransport` carries frames; this module accepts connections and drives a
session per connection with the actions it returns.

What it does not do: decide when to resync (the source does), keep point-in-time history or forward
to a further remote.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware.failover.state import open_roles
from firmware.history import DEFAULT_AGE_S, HistoryWriter, history_dir
from firmware.history import status_keys as history_status_keys
from firmware.link import protocol as jp
from firmware.link_driver import LinkDriver, Waker
from firmware.link_transport import LinkTransport
from firmware.pairing import TlsFiles, peer_identity, server_context
from firmware.replication.target import (
    ApplyRecords,
    Close,
    CopyRegion,
    MakeDurable,
    ReadDigests,
    Refused,
    SaveState,
    Send,
    SyncNow,
    TargetAction,
    TargetSession,
    TargetState,
    Undo,
    UndoStep,
)
from firmware.storage import SpaceExhausted, StorageError
from firmware.target_store import TargetStore, UndoLog, save_json_durably, target_fingerprint
from firmware.volume import Volume, VolumeError

__all__ = ["RemoteUnit", "RemoteUnitConfig", "SourceTarget", "TargetState", "UndoLog", "save_json_durably",
           "target_fingerprint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteUnitConfig:
    """`usbmirror remote` settings.

    `tls_dir=None` runs the link in plaintext: for tests and benchmarks only, never on a network.
    `volume_factory(path, size, block_size)` opens a target (tests substitute a failing volume).
    """

    listen: tuple[str, int]
    name: str
    targets: dict[str, str]
    tls_dir: str | None
    state_dir: str
    heartbeat_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    volume_factory: Callable[[str, int, int], Volume] | None = None
    history_size: int | None = None  # bytes of point-in-time history per source; None = none kept
    history_age_s: float = DEFAULT_AGE_S


class SourceTarget:
    """One source id's target: its session (positions, order of applies, resync state) and its store
    (volume, state file, undo log). One replicating connection at a time holds `lock`."""

    def __init__(self, unit: RemoteUnit, source_id: str, path: str) -> None:
        self.unit = unit
        self.source_id = source_id
        self.path = path
        self.store = TargetStore(source_id, path, unit.cfg.state_dir, unit.cfg.volume_factory)
        self.session = TargetSession(self.store.load_state(), remote_name=unit.cfg.name)
        self.roles = open_roles(unit.cfg.state_dir, source_id, primary=False)
        self.lock = threading.Lock()  # held by the connection that replicates
        self.active: _Connection | None = None
        self.last_error = ""
        self.connections = 0
        self.peer = ""
        self.last_ack_time: float | None = None
        self._rate: list[tuple[float, int]] = []  # (monotonic, bytes_applied) samples at ACK time
        self.history: HistoryWriter | None = None
        if unit.cfg.history_size is not None:
            self.history = HistoryWriter.reopen(history_dir(unit.cfg.state_dir, source_id),
                                                size_cap=unit.cfg.history_size, age_s=unit.cfg.history_age_s)
            if self.history is not None:
                self.store.add_hook(self.history)

    def open_history(self, hello: jp.Hello) -> None:
        """Keep point-in-time history for the volume this source sends (docs/HISTORY.md): a hook that
        saves before-images before the store overwrites the target."""
        cfg = self.unit.cfg
        if cfg.history_size is None:
            return
        key = (hello.volume_uuid.hex(), hello.generation, hello.block_size)
        h = self.history
        if h is not None and (h.meta.volume_uuid, h.meta.generation, h.meta.block_size) == key:
            return
        if h is not None:
            self.store.hooks.remove(h)
            h.close()
        self.history = HistoryWriter.open(history_dir(cfg.state_dir, self.source_id), block_size=hello.block_size,
                                          num_blocks=hello.volume_size // hello.block_size, volume_uuid=key[0],
                                          generation=hello.generation, target=os.path.realpath(self.path),
                                          base_seq=self.state.applied_seq, size_cap=cfg.history_size,
                                          age_s=cfg.history_age_s)
        self.store.add_hook(self.history)

    @property
    def state(self) -> TargetState:
        return self.session.state

    @property
    def records_applied(self) -> int:
        return self.session.records_applied

    @property
    def duplicates_skipped(self) -> int:
        return self.session.duplicates_skipped

    @property
    def undo_path(self) -> Path:
        return self.store.undo_path

    def note_ack(self) -> None:
        now = time.monotonic()
        self.last_ack_time = now
        self._rate.append((now, self.session.bytes_applied))
        while len(self._rate) > 2 and now - self._rate[0][0] > 5.0:
            self._rate.pop(0)

    def throughput_bps(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._rate[0], self._rate[-1]
        if self.last_ack_time is not None and time.monotonic() - self.last_ack_time > 5.0:
            return 0.0
        return (b1 - b0) / max(1e-3, t1 - t0)

    def rollback_resync(self) -> bool:
        """Restore the image from before an incomplete resync. True if one was restored."""
        with self.lock:
            if not self.session.rollback_possible() or not self.store.rollback(self.state):
                return False
            self.session.rolled_back()
            self.store.save_state(self.state)
            self.store.undo_discard()
            log.warning("rolled back incomplete resync source=%s applied_seq=%d", self.source_id,
                        self.state.applied_seq)
            return True

    def status(self) -> dict[str, Any]:
        st, ses = self.state, self.session
        pct = None
        if st.resync_active and ses.resync_regions_total:
            pct = 100.0 * ses.resync_regions_done / ses.resync_regions_total
        return {
            "source_id": self.source_id,
            "target": self.path,
            "state": ("resyncing" if st.resync_active else "connected") if self.active else
                     ("error" if self.last_error else "idle"),
            "consistent": not st.resync_active,
            "rollback_available": st.resync_active and st.resync_undo,
            "peer": self.peer,
            "applied_seq": st.applied_seq,
            "volume_uuid": st.volume_uuid,
            "generation": st.generation,
            "records_applied": ses.records_applied,
            "duplicates_skipped": ses.duplicates_skipped,
            "bytes_applied": ses.bytes_applied,
            "connections": self.connections,
            "resync_percent": pct,
            "last_error": self.last_error,
            "seconds_since_ack": None if self.last_ack_time is None else time.monotonic() - self.last_ack_time,
            "throughput_bps": round(self.throughput_bps(), 1),
            "applied_record_age_s": (None if not ses.last_record_ts_ns
                                     else max(0.0, time.time() - ses.last_record_ts_ns / 1e9)),
            **self.roles.state.status(),
            **(self.history.status_keys() if self.history is not None else
               history_status_keys(None, self.unit.cfg.history_size, self.unit.cfg.history_age_s, time.time_ns())),
        }

    def close(self) -> None:
        self.roles.close()
        self.store.close()
        if self.history is not None:
            self.history.close()
            self.history = None


class _Flusher:
    """Carries out MakeDurable off the receive path (group commit): sync the target, store the
    position, then `waker.wake()` so the connection's driver reports `durable(seq)` and ACKs."""

    def __init__(self, target: SourceTarget) -> None:
        self.target = target
        self.cond = threading.Condition()
        self.requested = 0
        self.done = 0
        self.busy = False
        self.error: BaseException | None = None
        self._stop = False
        self.waker = Waker()
        self.thread = threading.Thread(target=self._run, name="remote-flusher", daemon=True)
        self.thread.start()

    def request(self, seq: int) -> None:
        with self.cond:
            self.requested = seq
            self.busy = True
            self.cond.notify_all()

    def wait_idle(self) -> None:
        with self.cond:
            while self.busy:
                self.cond.wait(0.5)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.busy and not self._stop:
                    self.cond.wait()
                if self._stop:
                    return
                seq = self.requested
            t = self.target
            try:
                t.store.make_durable(t.state, seq)
                self.done = max(self.done, seq)
            except BaseException as exc:  # handed to the connection thread, which reports it
                self.error = exc
            with self.cond:
                self.busy = False
                self.cond.notify_all()
            self.waker.wake()

    def stop(self) -> None:
        with self.cond:
            while self.busy:
                self.cond.wait(0.5)
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=10)
        self.waker.close()


class _Connection:
    """One accepted connection, served by its own thread: the driver of a target session.

    It turns frames into `TargetSession` calls and carries out the actions they return on the
    target's `TargetStore` (apply, sync, state file, undo log) and the link."""

    def __init__(self, unit: RemoteUnit, sock: socket.socket, peer: str) -> None:
        self.unit = unit
        self.link = LinkTransport(sock, jp.Role.REMOTE, timeout=unit.cfg.heartbeat_timeout_s)
        self.peer = peer
        self.target: SourceTarget | None = None
        self.session: TargetSession | None = None  # the target's, or a verify connection's own
        self.replicating = False
        self.closing = False
        self.flusher: _Flusher | None = None

    def kill(self) -> None:
        self.closing = True
        self.link.shutdown()

    def run(self) -> None:
        try:
            self._serve()
        except Refused as exc:
            self.unit.refused += 1
            log.warning("refused source peer=%s code=%s reason=%s", self.peer, exc.code.name, exc)
            self._note_error(f"{exc.code.name}: {exc}")
            self.link.try_send(jp.Error(exc.code, str(exc)))
        except jp.ProtocolError as exc:
            log.warning("protocol error peer=%s code=%s reason=%s", self.peer, exc.code.name, exc)
            self._note_error(f"protocol: {exc}")
            self.link.try_send(jp.Error(exc.code, str(exc)))
        except StorageError as exc:
            code = jp.ErrorCode.TARGET_FULL if isinstance(exc, SpaceExhausted) else jp.ErrorCode.TARGET_IO
            log.error("target failure source=%s code=%s reason=%s", self.target and self.target.source_id,
                      code.name, exc)
            self._note_error(f"{code.name}: {exc}")
            self.link.try_send(jp.Error(code, str(exc)))
        except (OSError, TimeoutError) as exc:
            if not self.closing:
                log.info("connection lost peer=%s reason=%s", self.peer, exc)
        except Exception:
            log.exception("unexpected failure peer=%s", self.peer)
            self.link.try_send(jp.Error(jp.ErrorCode.INTERNAL, "internal error"))
        finally:
            if self.flusher is not None:
                self.flusher.stop()
            self._release()
            self.link.close()

    def _note_error(self, message: str) -> None:
        if self.target is not None:
            self.target.last_error = message

    def _release(self) -> None:
        t = self.target
        if t is None or not self.replicating or t.active is not self:
            return
        t.active = None
        last = t.session.connection_lost()
        if last is not None and t.store.volume is not None:
            try:
                t.store.make_durable(t.state, last.seq)
                t.session.durable(last.seq)  # the ACK it returns has no connection to go to
            except (StorageError, OSError) as exc:
                log.warning("could not save the applied position source=%s error=%s", t.source_id, exc)
        t.session.forget_unsynced()
        t.lock.release()

    # -- the loop -------------------------------------------------------------------------------
    def _serve(self) -> None:
        """Receive and apply in this thread (the `LinkDriver`); make durable in the flusher thread
        (group commit), so the link keeps flowing while the target syncs. Only this thread touches
        the socket."""
        timeout = self.unit.cfg.heartbeat_timeout_s
        driver = LinkDriver(self.link, self)
        while not self.closing:
            if self.flusher is not None and not driver.wakers:
                driver.wakers.append(self.flusher.waker)
            if not driver.pump(timeout):
                raise TimeoutError(f"nothing heard for {timeout} s")

    # -- the driver's channel -------------------------------------------------------------------
    def on_wake(self, waker: Waker) -> None:
        self._flush_done()

    def on_events(self, events: Sequence[jp.Event]) -> None:
        for ev in events:
            self._event(ev)
            if self.closing:
                return
        self._maybe_flush()

    def _event(self, ev: jp.Event) -> None:
        if isinstance(ev, jp.Hello):
            self._hello(ev)
            return
        t, ses = self.target, self.session
        if t is None or ses is None:
            raise jp.ProtocolError(f"{type(ev).__name__} before HELLO")
        if isinstance(ev, jp.ResyncBegin | jp.ResyncEnd):
            self._quiesce()
        self._do(t, ses, ses.event(ev))
        if isinstance(ev, jp.ResyncBegin) and t.history is not None and self.replicating:
            t.store.resync_begins(ses.state.resync_base_seq)  # the history keeps the image from before it

    def _do(self, t: SourceTarget, ses: TargetSession, actions: list[TargetAction]) -> None:
        """Carry out a session's actions, in order."""
        store = t.store
        for a in actions:
            if isinstance(a, ApplyRecords):
                store.apply(a.records)
                ses.applied_ok(a.records)
            elif isinstance(a, Send):
                self.link.send(a.event)
                if isinstance(a.event, jp.Ack) and self.replicating:
                    t.note_ack()
            elif isinstance(a, CopyRegion):
                store.copy_region(a.lba, a.data)
            elif isinstance(a, ReadDigests):
                self.link.send(jp.RegionDigests(a.first_region, a.region_blocks,
                                                store.digests(a.first_region, a.count, a.region_blocks)))
            elif isinstance(a, SyncNow):
                store.sync()
            elif isinstance(a, SaveState):
                store.save_state(ses.state)
            elif isinstance(a, MakeDurable):
                self._request_flush(a.seq)
            elif isinstance(a, Undo):
                self._undo(t, ses.state, a.step)
            elif isinstance(a, Close):
                log.warning("closing source=%s reason=%s", t.source_id, a.reason)
                self.closing = True
            else:  # pragma: no cover - every action is handled above
                raise AssertionError(f"unhandled action {a!r}")

    def _undo(self, t: SourceTarget, st: TargetState, step: UndoStep) -> None:
        if step is UndoStep.DISCARD:
            t.store.undo_discard()
        elif step is UndoStep.OPEN:
            t.store.undo_open(st.block_size or 512)
        else:
            t.store.undo_discard()
            if t.history is not None:
                t.history.resync_end(st.applied_seq, time.time_ns())
            log.info("resync complete source=%s applied_seq=%d", t.source_id, st.applied_seq)

    def _hello(self, hello: jp.Hello) -> None:
        sock = self.link.sock
        ident = peer_identity(sock) if isinstance(sock, ssl.SSLSocket) else ("source", hello.source_id)
        t = self.unit.targets.get(hello.source_id)
        if ident is None or ident[0] != "source" or ident[1] != hello.source_id:
            raise Refused(jp.ErrorCode.PERMISSION_DENIED,
                          f"certificate names {ident and ':'.join(ident)!r}, not source {hello.source_id!r}")
        if t is None:
            raise Refused(jp.ErrorCode.UNKNOWN_SOURCE, f"no target for source {hello.source_id!r}")
        if hello.purpose is jp.Purpose.REPLICATE:
            old = t.active
            if old is not None:
                log.info("new connection supersedes the old one source=%s", t.source_id)
                old.kill()
            if not t.lock.acquire(timeout=max(5.0, self.unit.cfg.heartbeat_timeout_s)):
                raise Refused(jp.ErrorCode.BUSY, "another connection still replicates this source")
            self.target = t
            self.replicating = True
            t.active = self
            t.connections += 1
            t.peer = self.peer
            self.flusher = _Flusher(t)
            session = t.session
        else:
            self.target = t
            # a verify connection reads digests only: a session of its own over a copy of the state
            session = TargetSession(dataclasses.replace(t.state), remote_name=self.unit.cfg.name)
        self.session = session
        try:
            vol = t.store.open(hello.volume_size, hello.block_size)
        except VolumeError as exc:
            raise Refused(jp.ErrorCode.VOLUME_MISMATCH, str(exc)) from None
        except StorageError as exc:
            raise Refused(jp.ErrorCode.TARGET_IO, str(exc)) from None
        if hello.purpose is jp.Purpose.REPLICATE:
            t.open_history(hello)
        actions = session.hello(hello, target_id=t.store.target_id, target_blocks=vol.num_blocks)
        self._do(t, session, actions)
        log.info("source connected source=%s peer=%s purpose=%s applied_seq=%d", t.source_id, self.peer,
                 hello.purpose.name, session.state.applied_seq)

    # -- group commit ---------------------------------------------------------------------------
    def _request_flush(self, seq: int) -> None:
        assert self.flusher is not None
        self.flusher.request(seq)

    def _maybe_flush(self) -> None:
        t = self.target
        if t is None or self.flusher is None:
            return
        want = t.session.want_flush(self.flusher.busy)
        if want is not None:
            self.flusher.request(want.seq)

    def _flush_done(self) -> None:
        """The flusher made a position durable: the session acknowledges it (and finishes a resync at Q)."""
        f, t = self.flusher, self.target
        assert f is not None and t is not None
        f.waker.clear()
        err = f.error
        if err is not None:
            f.error = None
            raise err
        self._do(t, t.session, t.session.durable(f.done))
        self._maybe_flush()

    def _quiesce(self) -> None:
        """Wait for a flush in progress and acknowledge it (before resync state changes)."""
        f, t = self.flusher, self.target
        if f is not None and t is not None and (f.busy or f.done > t.session.acked):
            f.wait_idle()
            self._flush_done()


class RemoteUnit:
    """The remote unit server. `with RemoteUnit(cfg) as ru: ru.serve_forever()` (or start()/stop())."""

    def __init__(self, cfg: RemoteUnitConfig) -> None:
        self.cfg = cfg
        seen: dict[str, str] = {}
        for sid, path in cfg.targets.items():
            real = os.path.realpath(path)
            if real in seen:
                raise ValueError(f"sources {seen[real]!r} and {sid!r} both map to {path}: each source needs "
                                 "its own target")
            seen[real] = sid
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        self.targets = {sid: SourceTarget(self, sid, path) for sid, path in cfg.targets.items()}
        self._ctx: ssl.SSLContext | None = None
        if cfg.tls_dir is not None:
            self._ctx = server_context(TlsFiles.for_remote(cfg.tls_dir, cfg.name))
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[_Connection] = set()
        self._mutex = threading.Lock()
        self.refused = 0
        self.started = time.monotonic()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        host, port = self.cfg.listen
        ls = socket.create_server((host, port), reuse_port=False, backlog=16)
        ls.settimeout(0.2)
        self._listener = ls
        t = threading.Thread(target=self._accept_loop, name="remote-accept", daemon=True)
        t.start()
        self._accept_thread = t
        log.info("remote unit listening name=%s address=%s:%d targets=%s tls=%s", self.cfg.name, host, self.port,
                 ",".join(self.targets), self._ctx is not None)

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        if self._listener is None:
            self.start()
        while not self._stop.is_set() and not (stop is not None and stop.is_set()):
            self._stop.wait(0.5)

    def stop(self) -> None:
        """Stop accepting first (a source that reconnects at once must not get a connection that
        outlives the stop), then end every connection."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=10)
        with self._mutex:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            c.kill()
        for t in threads:
            t.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
        for tgt in self.targets.values():
            if tgt.lock.acquire(timeout=5):
                tgt.close()
                tgt.lock.release()

    def __enter__(self) -> RemoteUnit:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def rollback_resync(self, source_id: str) -> bool:
        return self.targets[source_id].rollback_resync()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    time.sleep(0.1)
                continue
            if self._stop.is_set():
                sock.close()
                return
            th = threading.Thread(target=self._serve_conn, args=(sock, f"{addr[0]}:{addr[1]}"),
                                  name=f"remote-conn-{addr[1]}", daemon=True)
            with self._mutex:
                self._threads = [t for t in self._threads if t.is_alive()] + [th]
            th.start()

    def _serve_conn(self, raw: socket.socket, peer: str) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket = raw
        if self._ctx is not None:
            raw.settimeout(self.cfg.handshake_timeout_s)
            try:
                sock = self._ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.refused += 1
                log.warning("refused peer=%s reason=TLS handshake failed: %s", peer, exc)
                raw.close()
                return
        c = _Connection(self, sock, peer)
        with self._mutex:
            if self._stop.is_set():  # stop() has already ended the connections it knew of
                c.link.close()
                return
            self._conns.add(c)
        try:
            c.run()
        finally:
            with self._mutex:
                self._conns.discard(c)

    def status(self) -> dict[str, Any]:
        return {
            "role": "remote",
            "name": self.cfg.name,
            "listen": f"{self.cfg.listen[0]}:{self.port if self._listener else self.cfg.listen[1]}",
            "tls": self._ctx is not None,
            "uptime_s": time.monotonic() - self.started,
            "refused_connections": self.refused,
            "sources": (sources := [t.status() for t in self.targets.values()]),
            "warnings": [f"source {s['source_id']}: {s['history_warning']}" for s in sources
                         if s.get("history_warning")],
        }
