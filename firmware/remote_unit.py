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

What it does not do: decide when to resync (the source does), keep point-in-time history or forward
to a further remote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import google_crc32c

from firmware.failover.state import open_roles
from firmware.identity import fsync_dir, write_atomically
from firmware.link import protocol as jp
from firmware.pairing import TlsFiles, peer_identity, server_context
from firmware.storage import SpaceExhausted, StorageError, WriteError
from firmware.volume import Volume, VolumeError

log = logging.getLogger(__name__)

UNDO_CHUNK_BYTES = 64 << 10
_UNDO_ENTRY = struct.Struct(">QII")  # lba, byte length, crc32c of the data
_RECV_CHUNK = 1 << 20
_RECV_BURST = 4 << 20


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


@dataclass
class TargetState:
    """What `<source id>.json` holds."""

    source_id: str
    volume_uuid: str = ""  # hex; empty = no volume bound yet (content unknown)
    generation: int = 0
    applied_seq: int = 0
    block_size: int = 0
    num_blocks: int = 0
    resync_active: bool = False
    resync_begin: int = 0  # P
    resync_end: int | None = None  # Q, once the copy is complete
    resync_undo: bool = False  # an undo log protects the pre-resync image
    resync_base_seq: int = 0  # applied position of that pre-resync image
    target_id: str = ""  # which file or disk the position belongs to (see target_fingerprint)


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


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpaceExhausted(f"{what}: {exc.strerror}")
    return WriteError(f"{what}: {exc.strerror}")


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
                raise _storage_error(exc, f"undo log {self.path}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SourceTarget:
    """One source id's target, its durable state and its undo log. Used by one connection at a time."""

    def __init__(self, unit: RemoteUnit, source_id: str, path: str) -> None:
        self.unit = unit
        self.source_id = source_id
        self.path = path
        self.state_path = Path(unit.cfg.state_dir) / f"{source_id}.json"
        self.undo_path = Path(unit.cfg.state_dir) / f"{source_id}.undo"
        self.state = self._load()
        self.roles = open_roles(unit.cfg.state_dir, source_id, primary=False)
        self.target_id = ""
        self.volume: Volume | None = None
        self.undo: UndoLog | None = None
        self.lock = threading.Lock()  # held by the connection that replicates
        self.save_lock = threading.RLock()
        self.active: _Connection | None = None
        self.applied = self.state.applied_seq  # in memory: applied, maybe not yet durable
        self.last_error = ""
        self.records_applied = 0
        self.duplicates_skipped = 0
        self.bytes_applied = 0
        self.connections = 0
        self.peer = ""
        self.resync_regions_done = 0
        self.resync_regions_total = 0
        self.last_ack_time: float | None = None
        self.last_record_ts_ns = 0  # host timestamp of the newest applied record
        self._rate: list[tuple[float, int]] = []  # (monotonic, bytes_applied) samples at ACK time

    def note_ack(self) -> None:
        now = time.monotonic()
        self.last_ack_time = now
        self._rate.append((now, self.bytes_applied))
        while len(self._rate) > 2 and now - self._rate[0][0] > 5.0:
            self._rate.pop(0)

    def throughput_bps(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._rate[0], self._rate[-1]
        if self.last_ack_time is not None and time.monotonic() - self.last_ack_time > 5.0:
            return 0.0
        return (b1 - b0) / max(1e-3, t1 - t0)

    def _load(self) -> TargetState:
        try:
            raw = json.loads(self.state_path.read_text())
            return TargetState(**{k: v for k, v in raw.items() if k in TargetState.__dataclass_fields__})
        except FileNotFoundError:
            return TargetState(self.source_id)

    def save(self) -> None:
        with self.save_lock:
            try:
                save_json_durably(self.state_path, asdict(self.state))
            except OSError as exc:
                raise _storage_error(exc, f"state file {self.state_path}") from exc

    def open_volume(self, hello: jp.Hello) -> None:
        num_blocks = hello.volume_size // hello.block_size
        fp = target_fingerprint(self.path)
        if self.volume is not None and (self.volume.block_size != hello.block_size
                                        or self.volume.num_blocks < num_blocks or fp != self.target_id):
            self.volume.close()  # another block size, or the file/disk behind the path changed
            self.volume = None
        if self.volume is None:
            factory = self.unit.cfg.volume_factory or _open_target
            self.volume = factory(self.path, hello.volume_size, hello.block_size)
            self.volume.set_write_cache(True)  # the applier syncs once per acknowledged position
            fp = target_fingerprint(self.path)  # a file created just now has its inode only now
        if self.volume.num_blocks < num_blocks:
            raise VolumeError(f"target {self.path} holds {self.volume.num_blocks} blocks, the source volume "
                              f"{num_blocks}")
        self.num_blocks = num_blocks
        self.target_id = fp
        if self.state.resync_active and self.state.resync_undo and self.undo is None:
            self.undo = UndoLog(self.undo_path, hello.block_size)

    def bound_to(self, hello: jp.Hello) -> bool:
        """The target holds this volume's image at the stored position: same volume, generation and
        block size, and the same file or disk as when the position was stored (a disk swapped or an
        image file replaced behind the unit's back makes the content unknown: a full comparison)."""
        return (self.state.volume_uuid == hello.volume_uuid.hex() and self.state.generation == hello.generation
                and self.state.block_size == hello.block_size
                and (not self.state.target_id or self.state.target_id == self.target_id))

    def rollback_resync(self) -> bool:
        """Restore the image from before an incomplete resync. True if one was restored."""
        with self.lock:
            if not self.state.resync_active or not self.state.resync_undo or not self.undo_path.exists():
                return False
            bs = self.state.block_size
            vol = self.volume or _open_target(self.path, self.state.num_blocks * bs, bs)
            undo = self.undo or UndoLog(self.undo_path, bs)
            for lba, data in undo.entries():
                vol.write_nosync(lba, data)
            vol.flush()
            self.state.applied_seq = self.state.resync_base_seq
            self.state.resync_active = False
            self.state.resync_undo = False
            self.state.resync_end = None
            self.save()
            undo.close()
            self.undo = None
            self.undo_path.unlink(missing_ok=True)
            if self.volume is None:
                vol.close()
            self.applied = self.state.applied_seq
            log.warning("rolled back incomplete resync source=%s applied_seq=%d", self.source_id,
                        self.state.applied_seq)
            return True

    def status(self) -> dict[str, Any]:
        st = self.state
        pct = None
        if st.resync_active and self.resync_regions_total:
            pct = 100.0 * self.resync_regions_done / self.resync_regions_total
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
            "records_applied": self.records_applied,
            "duplicates_skipped": self.duplicates_skipped,
            "bytes_applied": self.bytes_applied,
            "connections": self.connections,
            "resync_percent": pct,
            "last_error": self.last_error,
            "seconds_since_ack": None if self.last_ack_time is None else time.monotonic() - self.last_ack_time,
            "throughput_bps": round(self.throughput_bps(), 1),
            "applied_record_age_s": (None if not self.last_record_ts_ns
                                     else max(0.0, time.time() - self.last_record_ts_ns / 1e9)),
            **self.roles.state.status(),
        }

    def close(self) -> None:
        self.roles.close()
        if self.undo is not None:
            self.undo.close()
            self.undo = None
        if self.volume is not None:
            self.volume.close()
            self.volume = None


def _open_target(path: str, size: int, block_size: int) -> Volume:
    p = Path(path)
    if p.exists() and not p.is_file():
        return Volume(p, block_size=block_size)  # a block device: may be larger than the volume
    return Volume(p, size=size, block_size=block_size)


class _Refused(Exception):
    def __init__(self, code: jp.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Flusher:
    """Makes a target's applied position durable off the receive path: fdatasync, then the sidecar
    state, then a byte on `wake_w` so the connection thread sends the ACK."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.cond = threading.Condition()
        self.requested = 0
        self.done = 0
        self.busy = False
        self.error: BaseException | None = None
        self._stop = False
        self.wake_r, self.wake_w = socket.socketpair()
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

    def drain_wake(self) -> None:
        self.wake_r.setblocking(False)
        with contextlib.suppress(OSError):
            self.wake_r.recv(4096)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.busy and not self._stop:
                    self.cond.wait()
                if self._stop:
                    return
                seq = self.requested
            t = self.conn.target
            try:
                assert t is not None and t.volume is not None
                t.volume.flush()
                with t.save_lock:
                    if seq > t.state.applied_seq:
                        t.state.applied_seq = seq
                        t.save()
                self.done = max(self.done, seq)
            except BaseException as exc:  # handed to the connection thread, which reports it
                self.error = exc
            with self.cond:
                self.busy = False
                self.cond.notify_all()
            with contextlib.suppress(OSError):
                self.wake_w.send(b"x")

    def stop(self) -> None:
        with self.cond:
            self.wait_idle_locked()
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=10)
        self.wake_r.close()
        self.wake_w.close()

    def wait_idle_locked(self) -> None:
        while self.busy:
            self.cond.wait(0.5)


class _Connection:
    """One accepted connection, served by its own thread."""

    def __init__(self, unit: RemoteUnit, sock: socket.socket, peer: str) -> None:
        self.unit = unit
        self.sock = sock
        self.peer = peer
        self.conn = jp.JourneyConnection(jp.Role.REMOTE)
        self.target: SourceTarget | None = None
        self.purpose = jp.Purpose.REPLICATE
        self.closing = False
        self.acked_sent = 0
        self._hello_ev: jp.Hello | None = None
        self.flusher = _Flusher(self)

    @property
    def hello(self) -> jp.Hello:
        assert self._hello_ev is not None
        return self._hello_ev

    def kill(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _send(self, ev: jp.Event) -> None:
        self.sock.sendall(self.conn.send(ev))

    def run(self) -> None:
        try:
            self._serve()
        except _Refused as exc:
            self.unit.refused += 1
            log.warning("refused source peer=%s code=%s reason=%s", self.peer, exc.code.name, exc)
            if self.target is not None:
                self.target.last_error = f"{exc.code.name}: {exc}"
            self._try_send(jp.Error(exc.code, str(exc)))
        except jp.ProtocolError as exc:
            log.warning("protocol error peer=%s code=%s reason=%s", self.peer, exc.code.name, exc)
            if self.target is not None:
                self.target.last_error = f"protocol: {exc}"
            self._try_send(jp.Error(exc.code, str(exc)))
        except StorageError as exc:
            code = jp.ErrorCode.TARGET_FULL if isinstance(exc, SpaceExhausted) else jp.ErrorCode.TARGET_IO
            log.error("target failure source=%s code=%s reason=%s", self.target and self.target.source_id,
                      code.name, exc)
            if self.target is not None:
                self.target.last_error = f"{code.name}: {exc}"
            self._try_send(jp.Error(code, str(exc)))
        except (OSError, TimeoutError) as exc:
            if not self.closing:
                log.info("connection lost peer=%s reason=%s", self.peer, exc)
        except Exception:
            log.exception("unexpected failure peer=%s", self.peer)
            self._try_send(jp.Error(jp.ErrorCode.INTERNAL, "internal error"))
        finally:
            self._release()
            with contextlib.suppress(OSError):
                self.sock.close()

    def _try_send(self, ev: jp.Event) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.sock.sendall(self.conn.send(ev))

    def _release(self) -> None:
        t = self.target
        if t is not None and self.purpose is jp.Purpose.REPLICATE and t.active is self:
            t.active = None
            if t.applied != t.state.applied_seq and t.volume is not None and not t.state.resync_active:
                # make what was applied durable so the next connection resumes exactly after it
                try:
                    t.volume.flush()
                    t.state.applied_seq = t.applied
                    t.save()
                except (StorageError, OSError) as exc:
                    log.warning("could not save the applied position source=%s error=%s", t.source_id, exc)
            t.applied = t.state.applied_seq  # anything not durable will be sent again
            t.lock.release()

    def _recv(self) -> bytes:
        """One blocking read, then whatever else is already there without blocking (a TLS read
        returns one 16 KiB record at a time; gathering them saves a select per record)."""
        data = self.sock.recv(_RECV_CHUNK)
        if not data:
            self.conn.receive_eof()  # a frame cut short is a protocol error, logged as such
            raise ConnectionResetError("peer closed the connection")
        parts = [data]
        total = len(data)
        self.sock.settimeout(0.0)
        try:
            while total < _RECV_BURST:
                more = self.sock.recv(_RECV_CHUNK)
                if not more:
                    break
                parts.append(more)
                total += len(more)
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(self.unit.cfg.heartbeat_timeout_s)
        return b"".join(parts) if len(parts) > 1 else data

    def _serve(self) -> None:
        """Receive and apply in this thread; make durable in the flusher thread (group commit), so
        the link keeps flowing while the target syncs. Only this thread touches the TLS socket."""
        self.sock.settimeout(self.unit.cfg.heartbeat_timeout_s)
        try:
            while not self.closing:
                pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
                if pending:
                    ready = [self.sock]
                else:
                    ready, _, _ = select.select([self.sock, self.flusher.wake_r], [], [],
                                                self.unit.cfg.heartbeat_timeout_s)
                    if not ready:
                        raise TimeoutError(f"nothing heard for {self.unit.cfg.heartbeat_timeout_s} s")
                if self.flusher.wake_r in ready:
                    self._flush_done()
                if self.sock in ready:
                    self.conn.receive_data(self._recv())
                    while True:
                        ev = self.conn.next_event()
                        if isinstance(ev, jp._NeedData):
                            break
                        self._handle(ev)
                    self._maybe_flush()
        finally:
            self.flusher.stop()

    def _maybe_flush(self) -> None:
        t = self.target
        if t is None or self.purpose is not jp.Purpose.REPLICATE or t.volume is None:
            return
        if t.applied > max(self.acked_sent, self.flusher.requested) and not self.flusher.busy:
            self.flusher.request(t.applied)

    def _flush_done(self) -> None:
        """The flusher made a position durable: acknowledge it (and finish a resync at Q)."""
        self.flusher.drain_wake()
        err = self.flusher.error
        if err is not None:
            self.flusher.error = None
            raise err
        t = self.target
        done = self.flusher.done
        if t is None or done <= self.acked_sent:
            return
        if t.state.resync_active and t.state.resync_end is not None and done >= t.state.resync_end:
            self._finish_resync(t)
        self._send(jp.Ack(done))
        self.acked_sent = done
        t.note_ack()
        self._maybe_flush()

    def _quiesce(self) -> None:
        """Wait for a flush in progress and acknowledge it (before state changes other than records)."""
        if self.flusher.busy or self.flusher.done > self.acked_sent:
            self.flusher.wait_idle()
            self._flush_done()

    def _finish_resync(self, t: SourceTarget) -> None:
        t.state.resync_active = False
        undo = t.state.resync_undo
        t.state.resync_undo = False
        t.state.resync_end = None
        t.save()
        if undo and t.undo is not None:
            t.undo.close()
            t.undo = None
        t.undo_path.unlink(missing_ok=True)
        log.info("resync complete source=%s applied_seq=%d", t.source_id, t.applied)

    # -- events --------------------------------------------------------------------------------
    def _handle(self, ev: jp.Event) -> None:
        if isinstance(ev, jp.Hello):
            self._hello(ev)
            return
        t = self.target
        assert t is not None and t.volume is not None
        if isinstance(ev, jp.Heartbeat):
            self._send(jp.Heartbeat(ev.token))
        elif isinstance(ev, jp.DigestRequest):
            self._digests(t, ev)
        elif isinstance(ev, jp.Error):
            log.warning("source error source=%s code=%s message=%s", t.source_id, ev.code.name, ev.message)
            self.closing = True
        elif self.purpose is not jp.Purpose.REPLICATE:
            raise jp.ProtocolError(f"{type(ev).__name__} on a verify connection")
        elif isinstance(ev, jp.Batch):
            self._batch(t, ev)
        elif isinstance(ev, jp.ResyncBegin):
            self._resync_begin(t, ev)
        elif isinstance(ev, jp.RegionData):
            self._region(t, ev)
        elif isinstance(ev, jp.ResyncEnd):
            self._resync_end(t, ev)
        else:
            raise jp.ProtocolError(f"unexpected {type(ev).__name__}")

    def _hello(self, hello: jp.Hello) -> None:
        ident = peer_identity(self.sock) if isinstance(self.sock, ssl.SSLSocket) else ("source", hello.source_id)
        t = self.unit.targets.get(hello.source_id)
        if ident is None or ident[0] != "source" or ident[1] != hello.source_id:
            raise _Refused(jp.ErrorCode.PERMISSION_DENIED,
                           f"certificate names {ident and ':'.join(ident)!r}, not source {hello.source_id!r}")
        if t is None:
            raise _Refused(jp.ErrorCode.UNKNOWN_SOURCE, f"no target for source {hello.source_id!r}")
        self.purpose = hello.purpose
        if hello.purpose is jp.Purpose.REPLICATE:
            old = t.active
            if old is not None:
                log.info("new connection supersedes the old one source=%s", t.source_id)
                old.kill()
            if not t.lock.acquire(timeout=max(5.0, self.unit.cfg.heartbeat_timeout_s)):
                raise _Refused(jp.ErrorCode.BUSY, "another connection still replicates this source")
            self.target = t
            t.active = self
            t.connections += 1
            t.peer = self.peer
            t.applied = t.state.applied_seq
        else:
            self.target = t
        try:
            t.open_volume(hello)
        except VolumeError as exc:
            raise _Refused(jp.ErrorCode.VOLUME_MISMATCH, str(exc)) from None
        except StorageError as exc:
            raise _Refused(jp.ErrorCode.TARGET_IO, str(exc)) from None
        flags = jp.ReplyFlag.NONE
        if t.state.resync_active:
            flags |= jp.ReplyFlag.RESYNC_IN_PROGRESS
        if not t.bound_to(hello):
            flags |= jp.ReplyFlag.NEW_TARGET
        uuid = bytes.fromhex(t.state.volume_uuid) if t.state.volume_uuid else bytes(16)
        self._send(jp.HelloReply(self.unit.cfg.name, uuid, t.state.applied_seq, t.state.generation,
                                 hello.features & jp.Feature.LZ4, flags))
        self.acked_sent = t.state.applied_seq
        log.info("source connected source=%s peer=%s purpose=%s applied_seq=%d flags=%s", t.source_id, self.peer,
                 hello.purpose.name, t.state.applied_seq, flags)
        self._hello_ev = hello

    def _bind(self, t: SourceTarget) -> None:
        h = self.hello
        t.state.volume_uuid = h.volume_uuid.hex()
        t.state.generation = h.generation
        t.state.block_size = h.block_size
        t.state.num_blocks = h.volume_size // h.block_size
        t.state.target_id = t.target_id

    def _check_range(self, t: SourceTarget, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > t.num_blocks:
            raise jp.ProtocolError(f"blocks {lba}+{count} outside the volume of {t.num_blocks}")

    def _batch(self, t: SourceTarget, b: jp.Batch) -> None:
        assert t.volume is not None
        if t.state.resync_active and t.state.resync_end is None:
            raise jp.ProtocolError("records before the end of the resync copy", jp.ErrorCode.SEQUENCE)
        if not t.bound_to(self.hello):
            if t.state.volume_uuid and t.state.applied_seq:
                raise _Refused(jp.ErrorCode.SEQUENCE, "target holds another volume: resync first")
            self._bind(t)
        if b.prev_seq > t.applied:
            raise _Refused(jp.ErrorCode.SEQUENCE,
                           f"batch follows seq={b.prev_seq} but the target has applied seq={t.applied}")
        vol = t.volume
        for r in b.records:
            if r.seq <= t.applied:
                t.duplicates_skipped += 1
                continue
            if r.kind is not jp.RecordKind.FLUSH:
                self._check_range(t, r.lba, r.count)
                if t.undo is not None:
                    t.undo.protect(vol, t.num_blocks, r.lba, r.count)
            if r.kind is jp.RecordKind.WRITE:
                if len(r.payload) != r.count * t.volume.block_size:
                    raise jp.ProtocolError(f"write seq={r.seq}: {len(r.payload)} bytes for {r.count} blocks")
                vol.write_nosync(r.lba, r.payload)
                t.bytes_applied += len(r.payload)
            elif r.kind is jp.RecordKind.UNMAP:
                vol.unmap(r.lba, r.count)
            t.applied = r.seq
            t.records_applied += 1
            t.last_record_ts_ns = r.timestamp_ns

    def _digests(self, t: SourceTarget, req: jp.DigestRequest) -> None:
        assert t.volume is not None
        total = (t.num_blocks + req.region_blocks - 1) // req.region_blocks
        out: list[bytes] = []
        for i in range(req.first_region, min(req.first_region + req.count, total)):
            lba = i * req.region_blocks
            n = min(req.region_blocks, t.num_blocks - lba)
            out.append(jp.region_digest(t.volume.read(lba, n)))
        self._send(jp.RegionDigests(req.first_region, req.region_blocks, tuple(out)))

    def _resync_begin(self, t: SourceTarget, ev: jp.ResyncBegin) -> None:
        self._quiesce()
        st = t.state
        assert t.volume is not None
        if not st.resync_active and t.applied != st.applied_seq:
            # the records before this frame are the image the undo log must preserve: durable first
            t.volume.flush()
            st.applied_seq = t.applied
        if not st.resync_active:
            # an undo log is worth keeping only if the target holds a consistent image of this volume now
            keep = bool(t.bound_to(self.hello) and st.applied_seq > 0)
            st.resync_active = True
            st.resync_undo = keep
            st.resync_base_seq = st.applied_seq
            if keep:
                t.undo_path.unlink(missing_ok=True)
        self._bind(t)
        st.resync_begin = ev.position
        st.resync_end = None
        t.save()
        if st.resync_undo and t.undo is None:
            t.undo = UndoLog(t.undo_path, t.volume.block_size if t.volume else 512)
        t.resync_regions_total = ev.total_regions
        t.resync_regions_done = 0
        log.info("resync begins source=%s position=%d regions=%d undo=%s", t.source_id, ev.position,
                 ev.total_regions, st.resync_undo)

    def _region(self, t: SourceTarget, ev: jp.RegionData) -> None:
        assert t.volume is not None
        if not t.state.resync_active or t.state.resync_end is not None:
            raise jp.ProtocolError("REGION_DATA outside a resync copy", jp.ErrorCode.SEQUENCE)
        bs = t.volume.block_size
        if len(ev.data) % bs or not ev.data:
            raise jp.ProtocolError(f"REGION_DATA of {len(ev.data)} bytes is not whole blocks")
        count = len(ev.data) // bs
        self._check_range(t, ev.lba, count)
        if t.undo is not None:
            t.undo.protect(t.volume, t.num_blocks, ev.lba, count)
        t.volume.write_nosync(ev.lba, ev.data)
        t.resync_regions_done += 1
        t.bytes_applied += len(ev.data)

    def _resync_end(self, t: SourceTarget, ev: jp.ResyncEnd) -> None:
        self._quiesce()
        assert t.volume is not None
        if not t.state.resync_active:
            raise jp.ProtocolError("RESYNC_END without RESYNC_BEGIN", jp.ErrorCode.SEQUENCE)
        t.volume.flush()
        t.state.resync_end = ev.position
        t.state.applied_seq = t.state.resync_begin
        t.applied = t.state.resync_begin
        if t.applied >= ev.position:
            self._finish_resync(t)
        t.save()
        self._send(jp.Ack(t.applied))
        self.acked_sent = t.applied
        log.info("resync copy done source=%s begin=%d end=%d", t.source_id, t.state.resync_begin, ev.position)


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
        self._threads.append(t)
        log.info("remote unit listening name=%s address=%s:%d targets=%s tls=%s", self.cfg.name, host, self.port,
                 ",".join(self.targets), self._ctx is not None)

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        if self._listener is None:
            self.start()
        while not self._stop.is_set() and not (stop is not None and stop.is_set()):
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        with self._mutex:
            conns = list(self._conns)
        for c in conns:
            c.kill()
        for t in self._threads:
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
            th = threading.Thread(target=self._serve_conn, args=(sock, f"{addr[0]}:{addr[1]}"),
                                  name=f"remote-conn-{addr[1]}", daemon=True)
            th.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [th]

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
            "sources": [t.status() for t in self.targets.values()],
        }
