"""USB/IP server: exports one mass-storage device over TCP so vhci-hcd (`usbip attach`) can import it.

The thin I/O adapter around `gadget.usbip_protocol.UsbipConnection` (wire format) and
`gadget.mass_storage.MassStorageDevice` (the device). Threads:

- `usbip-accept` accepts connections;
- one `usbip-<peer>` thread per connection reads its URBs in order and answers every control
  transfer, bulk OUT and ready bulk IN at once (holding the device lock only while the sans-IO
  device decides and the reply is written);
- a command (`LogicalUnit.execute()`, which may wait for a durable write or a `sync` remote) runs
  on the connection thread that received its last transfer, when no other command runs or waits:
  no hand-off to another thread on the hot path. Then, under the device lock, it is completed and
  the bulk-IN replies it made ready (data, CSW) are sent;
- `usbip-watch` looks every `HANDOVER_AFTER` seconds (only while a connection is open) for a
  connection thread busy with one command for longer than that, and hands the connection's reading
  to a new thread, so the host's next requests are read and answered while the command waits; the
  busy thread ends once its command is completed;
- one `usbip-exec` thread per server, the command executor, runs the commands that arrive while
  another one runs (after a reset, or from a new importer), one at a time in the order they came.

So while a WRITE waits, GET_DESCRIPTOR, GET_MAX_LUN, the class reset, CLEAR_FEATURE and
SET_CONFIGURATION are answered (within `HANDOVER_AFTER` of the command's start); a reset abandons
the waiting command (it still lands once, its CSW is never sent) and the commands after it queue
behind it on the executor.

Rules it enforces:
- one importer at a time: a second OP_REQ_IMPORT is refused with ST_DEV_BUSY while DEVLIST keeps
  working; when the importer detaches or vanishes (even mid-transfer) the device is reset for the
  next one;
- a bulk-IN URB the device cannot answer yet stays pending and is answered when data is ready;
  CMD_UNLINK of it answers -ECONNRESET and the URB never gets a RET_SUBMIT; unlinking a URB that
  already completed answers 0;
- a URB naming another devid gets RET_SUBMIT -ENODEV; a malformed header closes the connection
  with a log line.
- TCP_NODELAY on every connection: each URB is a small request/response exchange, and Nagle with
  delayed ACKs would add a delayed-ACK timeout (40 ms or more on Linux) to many of them; the same
  stall on the guest side of the QEMU relay held 4 KiB writes to ~20 IOPS (see hw/qemu/relay.py).

It binds 127.0.0.1 unless given another address: USB/IP has no authentication.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from firmware.logical_unit import CommandResult, LogicalUnit
from gadget.bot import BotCommand
from gadget.descriptors import DeviceIdentity, Speed, parse_descriptor, usbip_speed
from gadget.mass_storage import Completion, MassStorageDevice
from gadget.usbip_protocol import (
    DEFAULT_MAX_TRANSFER,
    ECONNRESET,
    ENODEV,
    NEED_DATA,
    URB_HEADER_SIZE,
    DevlistReply,
    DevlistRequest,
    ExportedDevice,
    ImportReply,
    ImportRequest,
    InterfaceTriple,
    OpStatus,
    SubmitCommand,
    SubmitReturn,
    UnlinkCommand,
    UnlinkReturn,
    UrbCommand,
    UrbDirection,
    UsbDeviceInfo,
    UsbipConnection,
    UsbipProtocolError,
    UsbipRole,
    pack_ret_submit,
    parse_submit,
    ret_submit_header,
)

log = logging.getLogger(__name__)

_RET_SUBMIT_CODE = int(UrbCommand.RET_SUBMIT)

RECV_BUFFER = 256 << 10
#: A connection thread busy with one command for longer than this hands its connection's reading
#: to a new thread (module docstring). Short enough that a host's control request or reset during a
#: long wait is answered well within its 5 s control timeout; long enough that a durable write
#: (well under a millisecond to a few milliseconds) never needs it.
HANDOVER_AFTER = 0.05
#: A connection that has not imported within this many seconds is closed (a stuck `usbip list`
#: or a port scanner must not hold a thread forever). An importer may stay idle indefinitely.
OP_PHASE_TIMEOUT = 60.0
#: TCP keepalive on the importer's connection: a host that vanished without closing (power cut,
#: network gone) releases the device after about idle + interval * count seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3


class UsbipDevice(Protocol):
    """What the server needs from a device (`MassStorageDevice` is one)."""

    @property
    def speed(self) -> Speed: ...
    @property
    def device_descriptor(self) -> bytes: ...
    @property
    def configuration_descriptor(self) -> bytes: ...
    @property
    def interface_triples(self) -> tuple[tuple[int, int, int], ...]: ...
    def submit(
        self, tag: int, endpoint: int, direction_in: bool, length: int, setup: bytes = b"", data: bytes = b""
    ) -> list[Completion]: ...
    def take_command(self) -> BotCommand | None: ...
    def run(self, command: BotCommand) -> CommandResult | None: ...
    def complete(self, command: BotCommand, result: CommandResult | None) -> list[Completion]: ...
    def cancel(self, tag: int) -> bool: ...
    def disconnect(self) -> None: ...
    def status(self) -> dict[str, object]: ...


def describe(device: UsbipDevice, busid: str, busnum: int, devnum: int) -> ExportedDevice:
    """The usbip_usb_device record (and interface triples) of `device`, read from its descriptors."""
    dd = parse_descriptor(device.device_descriptor)
    cd = parse_descriptor(device.configuration_descriptor[:9])
    info = UsbDeviceInfo(
        path=f"/sys/devices/usbmirror/usb{busnum}/{busid}",
        busid=busid,
        busnum=busnum,
        devnum=devnum,
        speed=usbip_speed(device.speed),
        id_vendor=dd.idVendor,
        id_product=dd.idProduct,
        bcd_device=dd.bcdDevice,
        device_class=dd.bDeviceClass,
        device_subclass=dd.bDeviceSubClass,
        device_protocol=dd.bDeviceProtocol,
        # usbip-host reports the active configuration; vhci ignores it. 0 = not configured yet.
        configuration_value=0,
        num_configurations=dd.bNumConfigurations,
        num_interfaces=cd.bNumInterfaces,
    )
    triples = tuple(InterfaceTriple(*t) for t in device.interface_triples)
    return ExportedDevice(info, triples)


def _is_device(obj: object) -> bool:
    return hasattr(obj, "submit") and hasattr(obj, "device_descriptor")


class UsbipServer:
    """Serve one device over USB/IP. A context manager: entering starts a background thread.

    `device` is a device object (reset between importers) or a factory called for every import
    (a fresh device per importer) and once up front for the DEVLIST description.
    """

    def __init__(
        self,
        device: UsbipDevice | Callable[[], UsbipDevice],
        host: str = "127.0.0.1",
        port: int = 0,
        busid: str = "1-1",
        *,
        busnum: int = 1,
        devnum: int = 2,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
    ) -> None:
        if _is_device(device):
            self._factory: Callable[[], UsbipDevice] | None = None
            self._device: UsbipDevice = device  # type: ignore[assignment]
        else:
            factory: Callable[[], UsbipDevice] = device  # type: ignore[assignment]
            self._factory = factory
            self._device = factory()
        self.busid = busid
        self.max_transfer = max_transfer
        self._exported = describe(self._device, busid, busnum, devnum)
        self._lock = threading.Lock()
        self._attached: str | None = None  # peer of the current importer
        self._connections: dict[socket.socket, str] = {}
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        # The command executor's queue: (session, device, command) in arrival order; None stops it.
        self._commands: queue.SimpleQueue[tuple[_UsbipSession, UsbipDevice, BotCommand] | None] = queue.SimpleQueue()
        self._executor: threading.Thread | None = None
        # At most one command runs at a time, inline or on the executor; `_queued` counts those
        # handed to the executor and not finished (a command runs inline only when it is 0).
        self._run_lock = threading.Lock()
        self._queued = 0
        self._sessions: set[_UsbipSession] = set()
        self._watch_wake = threading.Event()
        self._watcher: threading.Thread | None = None
        self._closing = False
        self._stopped = threading.Event()
        self.counters: dict[str, int] = {"connections": 0, "imports": 0, "refused": 0, "protocol_errors": 0}
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self._listener.getsockname()[:2]
        log.info("usbip listening host=%s port=%d busid=%s devid=0x%08x", self.host, self.port, busid,
                 self._exported.info.devid)  # fmt: skip

    @classmethod
    def for_logical_unit(
        cls,
        lu: LogicalUnit,
        identity: DeviceIdentity,
        *,
        speed: Speed = Speed.HIGH,
        host: str = "127.0.0.1",
        port: int = 0,
        busid: str = "1-1",
    ) -> UsbipServer:
        """A server exporting a `MassStorageDevice` for `lu` (one device kept across importers)."""
        return cls(MassStorageDevice(lu, identity, speed), host=host, port=port, busid=busid)

    @property
    def exported(self) -> ExportedDevice:
        return self._exported

    @property
    def attached(self) -> str | None:
        """Peer address of the current importer, if any."""
        return self._attached

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> UsbipServer:
        """Accept connections on a background thread."""
        if self._executor is None:
            self._executor = threading.Thread(target=self._execute_commands, name="usbip-exec", daemon=True)
            self._executor.start()
        if self._accept_thread is None:
            self._accept_thread = threading.Thread(target=self.serve_forever, name="usbip-accept", daemon=True)
            self._accept_thread.start()
        return self

    def _execute_commands(self) -> None:
        """The command executor: one command at a time, in the order they were received."""
        commands = self._commands
        while (item := commands.get()) is not None:
            session, device, command = item
            try:
                with self._run_lock:  # after a command still running inline
                    session.finish(device, command, device.run(command))
            finally:
                with self._lock:
                    self._queued -= 1

    def claim_inline(self) -> bool:
        """Whether the caller may run a command itself now: none runs and none waits on the
        executor. True holds the run lock; `release_inline()` gives it back."""
        # No server lock: `_queued` is read once (one int), and a command queued after that read
        # arrived after this one, so running this one first keeps the order.
        return self._queued == 0 and self._run_lock.acquire(blocking=False)

    def release_inline(self) -> None:
        self._run_lock.release()

    def submit_command(self, session: _UsbipSession, device: UsbipDevice, command: BotCommand) -> None:
        """Queue a command that a transfer of `session` made ready on `device` (under its lock) for
        the executor, behind the one running. Every queued command runs, even if the importer
        leaves before it starts."""
        with self._lock:
            if self._executor is None:  # serve_forever() called directly, without start()
                self._executor = threading.Thread(target=self._execute_commands, name="usbip-exec", daemon=True)
                self._executor.start()
            self._queued += 1
        self._commands.put((session, device, command))

    def _watch(self) -> None:
        """`usbip-watch`: while connections are open, hand over the reading of any connection whose
        thread has been busy with one command for longer than `HANDOVER_AFTER`."""
        while not self._closing:
            with self._lock:
                sessions = list(self._sessions)
                if not sessions:
                    self._watch_wake.clear()
            if not sessions:
                self._watch_wake.wait()
                continue
            if self._stopped.wait(HANDOVER_AFTER):
                break
            for session in sessions:
                session.hand_over_if_busy(HANDOVER_AFTER)

    def start_reader(self, session: _UsbipSession, conn: UsbipConnection) -> None:
        """A new thread that reads `session`'s connection from now on (`hand_over_if_busy`)."""
        thread = threading.Thread(target=self._read_connection, args=(session, conn),
                                  name=f"usbip-{session.peer}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        session.reader = thread
        thread.start()

    def serve_forever(self) -> None:
        """Accept connections until `stop()`; each gets its own thread."""
        while not self._closing:
            try:
                sock, addr = self._listener.accept()
            except OSError as exc:
                if self._closing:
                    break
                log.warning("usbip accept failed error=%s", exc)
                self._stopped.wait(0.1)  # e.g. EMFILE: do not spin while it lasts
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(OP_PHASE_TIMEOUT)
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                if self._closing:
                    sock.close()
                    break
                self._connections[sock] = peer
                self.counters["connections"] += 1
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(
                    target=self._serve_connection, args=(sock, peer), name=f"usbip-{peer}", daemon=True
                )
                self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop every connection (the importer sees a disconnect) and wait."""
        with self._lock:
            self._closing = True
            self._stopped.set()
            socks = list(self._connections)
            threads = list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() in the other thread
        self._listener.close()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        self._watch_wake.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout)
        self._commands.put(None)
        if self._executor is not None and self._executor is not threading.current_thread():
            # A command blocked in the logical unit cannot be interrupted from here; the executor
            # is a daemon thread and ends once the command does.
            self._executor.join(timeout)
        log.info("usbip stopped port=%d", self.port)

    close = stop

    def __enter__(self) -> UsbipServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        with self._lock:
            attached = self._attached
            connections = len(self._connections)
            counters = dict(self.counters)
        return {
            "transport": "usbip",
            "address": f"{self.host}:{self.port}",
            "busid": self.busid,
            "attached": attached,
            "open_connections": connections,
            **counters,
            "device": self._device.status(),
        }

    # -- one connection ----------------------------------------------------------------------------
    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        conn = UsbipConnection(UsbipRole.SERVER, max_transfer=self.max_transfer)
        session = _UsbipSession(self, sock, peer)
        session.reader = threading.current_thread()
        log.debug("usbip connection peer=%s", peer)
        with self._lock:
            self._sessions.add(session)
            if self._watcher is None and not self._closing:
                self._watcher = threading.Thread(target=self._watch, name="usbip-watch", daemon=True)
                self._watcher.start()
            self._watch_wake.set()
        self._read_connection(session, conn)

    def _read_connection(self, session: _UsbipSession, conn: UsbipConnection) -> None:
        """Read and answer `session`'s URBs until the connection ends (then close it), or until
        another thread took over the reading while this one ran a command (then just return)."""
        sock, peer = session.sock, session.peer
        me = threading.current_thread()
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        try:
            while True:
                if conn.imported and not conn.buffered:
                    # The URB phase with nothing held by the parser: the hot path, until the
                    # peer closes, the reading moves to another thread or a URB needs the parser.
                    if not self._read_urbs(session, conn, buf, view):
                        break
                    if session.reader is not me:
                        return
                    continue
                # Buffered events before the socket: a thread that takes over finds those its
                # predecessor had received and not yet handled.
                event = conn.next_event()
                if event is NEED_DATA:
                    n = sock.recv_into(view)
                    if n == 0:
                        break
                    conn.receive_data(view[:n])
                    continue
                if not session.handle(conn, event):
                    break
                if session.reader is not me:
                    return  # handed over while this thread ran a command: the new reader goes on
        except UsbipProtocolError as exc:
            self.count("protocol_errors")
            log.warning("usbip protocol error, closing peer=%s error=%s", peer, exc)
        except TimeoutError:
            log.info("usbip connection idle before import, closing peer=%s", peer)
        except OSError as exc:
            if not self._closing and exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                log.warning("usbip connection failed peer=%s error=%s", peer, exc)
        if session.reader is me:
            self._close_connection(session)

    def _read_urbs(self, session: _UsbipSession, conn: UsbipConnection, buf: bytearray, view: memoryview) -> bool:
        """The URB phase's hot path: CMD_SUBMITs parsed in place in `buf` (`parse_submit`, no event
        objects), an OUT URB's data copied once out of it, each handed to the session at once.
        Returns False when the peer closed the connection; True when `session.reader` changed
        while a command ran, or when bytes not handled yet (the next URB after the one submitted,
        or one that is not a CMD_SUBMIT) were given to `conn`, whose parser takes them from there:
        so a thread that takes over the reading finds every byte this one received."""
        recv_into = session.sock.recv_into
        submit = session.submit
        limit = conn.max_transfer
        size = len(buf)
        me = threading.current_thread()
        start = end = 0
        while True:
            avail = end - start
            if avail < URB_HEADER_SIZE:
                if start:  # keep a partial header at the front
                    buf[:avail] = buf[start:end]
                    start, end = 0, avail
                n = recv_into(view[end:])
                if not n:
                    return False
                end += n
                continue
            fields = parse_submit(buf, start, limit)
            if fields is None:  # CMD_UNLINK or a malformed header: the parser decides
                conn.receive_data(view[start:end])
                return True
            seqnum, devid, direction, ep, length, setup = fields
            if direction:  # IN: the header is the whole URB
                data = b""
                start += URB_HEADER_SIZE
            else:
                total = URB_HEADER_SIZE + length
                if total > size:  # larger than the receive buffer: the parser collects it
                    conn.receive_data(view[start:end])
                    return True
                if avail < total:
                    if start + total > size:
                        buf[:avail] = buf[start:end]
                        start, end = 0, avail
                    while end - start < total:  # the rest of this URB, and nothing beyond it
                        n = recv_into(view[end:start + total])
                        if not n:
                            return False
                        end += n
                data = bytes(view[start + URB_HEADER_SIZE:start + total])
                start += total
            if start == end:
                start = end = 0
            else:  # the host sent ahead: its next URBs go to the parser before this one runs
                conn.receive_data(view[start:end])
                submit(conn, seqnum, devid, ep, direction, length, setup, data)
                return True
            submit(conn, seqnum, devid, ep, direction, length, setup, data)
            if session.reader is not me:
                return True

    def _close_connection(self, session: _UsbipSession) -> None:
        try:
            session.end()
        finally:
            with self._lock:
                self._connections.pop(session.sock, None)
                self._sessions.discard(session)
            session.sock.close()
            log.debug("usbip connection closed peer=%s", session.peer)

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _claim(self, peer: str) -> UsbipDevice | None:
        with self._lock:
            if self._attached is not None or self._closing:
                return None
            self._attached = peer
        if self._factory is not None:
            try:
                self._device = self._factory()
            except Exception:
                with self._lock:
                    self._attached = None
                raise
        return self._device

    def _release(self, device: UsbipDevice, peer: str) -> None:
        try:
            device.disconnect()
        finally:
            with self._lock:
                if self._attached == peer:
                    self._attached = None


def _send_buffers(sock: socket.socket, buffers: list[bytes]) -> None:
    """`sendall` of the concatenation of `buffers`, without concatenating them (one `sendmsg` when
    the socket takes everything at once, as a blocking one does)."""
    if len(buffers) == 1:
        sock.sendall(buffers[0])
        return
    total = sum(len(b) for b in buffers)
    sent = sock.sendmsg(buffers)
    if sent == total:
        return
    # A partial send (a signal, a timeout): send the rest from where it stopped.
    rest = memoryview(b"".join(buffers))[sent:]
    sock.sendall(rest)


class _UsbipSession:
    """State of one connection: which device it imported, if any.

    `lock` serialises the connection thread and the executor: every call into the device and every
    write to the socket happen under it, so replies leave in the order the device produced them."""

    def __init__(self, server: UsbipServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.device: UsbipDevice | None = None
        self.devid = server.exported.info.devid
        self.lock = threading.Lock()
        self._conn: UsbipConnection | None = None
        # The thread reading the connection, and since when (monotonic) it has been running a
        # command itself (None: it is not); both change under `_reader_lock`.
        self.reader: threading.Thread | None = None
        self._busy_since: float | None = None
        self._reader_lock = threading.Lock()

    def handle(self, conn: UsbipConnection, event: object) -> bool:
        """Answer one event. False: close the connection."""
        if isinstance(event, SubmitCommand):
            self._submit(conn, event)
            return True
        if isinstance(event, UnlinkCommand):
            self._unlink(conn, event)
            return True
        if isinstance(event, DevlistRequest):
            self.sock.sendall(conn.send(DevlistReply((self.server.exported,))))
            log.debug("usbip devlist peer=%s", self.peer)
            return True
        if isinstance(event, ImportRequest):
            return self._import(conn, event)
        raise UsbipProtocolError(f"unexpected message {type(event).__name__}")

    def _import(self, conn: UsbipConnection, event: ImportRequest) -> bool:
        server = self.server
        if event.busid != server.busid:
            server.count("refused")
            log.warning("usbip import refused peer=%s busid=%s reason=no-such-busid", self.peer, event.busid)
            self.sock.sendall(conn.send(ImportReply(OpStatus.NODEV)))
            return False
        device = server._claim(self.peer)
        if device is None:
            server.count("refused")
            log.warning("usbip import refused peer=%s busid=%s reason=busy attached=%s", self.peer,
                        event.busid, server.attached)  # fmt: skip
            self.sock.sendall(conn.send(ImportReply(OpStatus.DEV_BUSY)))
            return False
        with self.lock:
            self.device = device
            attach = getattr(device, "attach_delivery", None)
            if attach is not None:  # a device that completes transfers from its own threads (UAS)
                attach(self.deliver)
        server.count("imports")
        log.info("usbip import peer=%s busid=%s", self.peer, event.busid)
        self.sock.sendall(conn.send(ImportReply(0, server.exported.info)))
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        return True

    def _submit(self, conn: UsbipConnection, cmd: SubmitCommand) -> None:
        self.submit(conn, cmd.seqnum, cmd.devid, cmd.ep, cmd.direction == UrbDirection.IN,
                    cmd.transfer_buffer_length, cmd.setup, cmd.data)

    def submit(self, conn: UsbipConnection, seqnum: int, devid: int, ep: int, direction_in: int, length: int,
               setup: bytes, data: bytes) -> None:
        """One CMD_SUBMIT: hand it to the device, send what completed, run a command it made ready."""
        device = self.device
        if device is None or devid != self.devid:
            log.warning("usbip submit for unknown devid=0x%08x seq=%d peer=%s", devid, seqnum, self.peer)
            self.sock.sendall(conn.send(SubmitReturn(seqnum, -ENODEV, 0)))
            return
        with self.lock:
            self._conn = conn
            done = device.submit(seqnum, ep, bool(direction_in), length, setup, data)
            command = device.take_command()
            if command is not None and not self.server.claim_inline():
                self.server.submit_command(self, device, command)
                command = None
            if done:
                self._complete(conn, done)
        if command is not None:
            self._run_inline(device, command)

    def _run_inline(self, device: UsbipDevice, command: BotCommand) -> None:
        """Run `command` on this (the reading) thread, holding the server's run lock; `usbip-watch`
        moves the reading to another thread if it takes long."""
        try:
            # one store, no lock: `usbip-watch` sees None or this time. Clearing it takes the lock,
            # so that a hand-over decided before the clear is seen by this thread's next check
            self._busy_since = time.monotonic()
            try:
                self.finish(device, command, device.run(command))
            finally:
                with self._reader_lock:
                    self._busy_since = None
        finally:
            self.server.release_inline()

    def hand_over_if_busy(self, after: float) -> None:
        """From `usbip-watch`: if the reading thread has been running one command for more than
        `after` seconds, a new thread reads the connection from now on (the busy one ends once its
        command is completed)."""
        with self._reader_lock:
            since = self._busy_since
            if since is None or time.monotonic() - since < after or self._conn is None:
                return
            self._busy_since = None  # the busy thread is no longer the reader
            log.debug("usbip command still running after %.2f s, reading the connection on a new thread peer=%s",
                     after, self.peer)
            self.server.start_reader(self, self._conn)

    def finish(self, device: UsbipDevice, command: BotCommand, result: CommandResult | None) -> None:
        """On the executor, after `device.run(command)`: complete the command and send the replies
        it made ready (none if the importer reset the device or left meanwhile)."""
        with self.lock:
            done = device.complete(command, result)
            conn = self._conn
            if not done or device is not self.device or conn is None:
                return
            try:
                self._complete(conn, done)
            except (OSError, UsbipProtocolError) as exc:
                # The connection thread sees the same failure on its socket and ends the session.
                log.info("usbip reply after a command failed peer=%s error=%s", self.peer, exc)

    def deliver(self, device: object, produce: Callable[[], list[Completion]]) -> None:
        """From a device's own thread: `produce()` (the device records what finished) under the
        session lock, then send the transfers it completed (none if the importer left)."""
        with self.lock:
            done = produce()
            conn = self._conn
            if not done or device is not self.device or conn is None:
                return
            try:
                self._complete(conn, done)
            except (OSError, UsbipProtocolError) as exc:
                log.info("usbip reply from a device thread failed peer=%s error=%s", self.peer, exc)

    def _complete(self, conn: UsbipConnection, done: list[Completion]) -> None:
        """Send the RET_SUBMITs of `done`, in order, with one `sendmsg`: each header and its IN
        data go as separate buffers, so no payload is copied to join them."""
        if len(done) == 1:  # the usual case: one transfer, one system call
            tag, status, actual, data = done[0]
            head = pack_ret_submit(_RET_SUBMIT_CODE, tag, 0, 0, 0, status, actual, 0, 0, 0)
            if not data:
                self.sock.sendall(head)
                return
            if len(data) != actual:
                raise ValueError("IN data length must equal actual_length")
            sent = self.sock.sendmsg((head, data))
            if sent != URB_HEADER_SIZE + actual:  # a partial send (a signal, a timeout): the rest
                self.sock.sendall(memoryview(head + data)[sent:])
            return
        buffers: list[bytes] = []
        for c in done:
            if c.data and len(c.data) != c.actual_length:
                raise ValueError("IN data length must equal actual_length")
            buffers.append(ret_submit_header(c.tag, c.status, c.actual_length))
            if c.data:
                buffers.append(c.data)
        _send_buffers(self.sock, buffers)

    def _unlink(self, conn: UsbipConnection, cmd: UnlinkCommand) -> None:
        with self.lock:
            unlinked = self.device is not None and self.device.cancel(cmd.unlink_seqnum)
            status = -ECONNRESET if unlinked else 0
            log.debug("usbip unlink seq=%d target=%d unlinked=%s", cmd.seqnum, cmd.unlink_seqnum, unlinked)
            self.sock.sendall(conn.send(UnlinkReturn(cmd.seqnum, status)))

    def end(self) -> None:
        with self.lock:
            device, self.device, self._conn = self.device, None, None
            if device is not None:
                log.info("usbip detach peer=%s", self.peer)
                self.server._release(device, self.peer)
