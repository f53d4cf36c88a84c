"""Serve the disk through the kernel's USB gadget stack: the Bulk-Only Transport over FunctionFS.

On a real board the host talks to a UDC (dwc2, dwc3; `dummy_hcd` in the QEMU test guest). The kernel's
libcomposite gadget (composed by `gadget.configfs`) carries one FunctionFS function whose endpoints
are files under a `functionfs` mount. This module is the thin adapter between those files and the
sans-IO cores: `gadget.bot.BulkOnlyTransport` (CBW/CSW, the thirteen cases, reset recovery) over a
`LogicalUnit` (`firmware.scsi.ScsiTarget`).

Kernel facts this adapter is built around (linux/drivers/usb/gadget/function/f_fs.c, each measured
with Debian's kernel and dummy_hcd in the QEMU test guest, `host_tests/realkernel/test_gadget_realkernel.py`):

- Order is fixed: descriptors (v2) then strings are written to `ep0`; only then do the endpoint
  files `ep1`, `ep2` appear (numbered in descriptor order, not by address); only then may the
  gadget be bound to a UDC.
- `select()` always reports bulk endpoint files ready, so each bulk endpoint has its own thread
  doing blocking I/O; `ep0` polls correctly and is read by a third thread.
- The kernel's composite layer answers the standard requests (GET_DESCRIPTOR, SET_CONFIGURATION,
  ...) itself; only the class requests reach `ep0` as SETUP events, and a USB reset or a new
  configuration reaches it as DISABLE then ENABLE (f_fs has no event of its own for a reset).
- I/O in the wrong direction halts an endpoint (EBADMSG; on ep0 it stalls the control request,
  EL2HLT). `os.read(ep0, 0)` acknowledges a zero-length status stage.
- CLEAR_FEATURE(ENDPOINT_HALT) is answered by the UDC driver itself and never reaches us, so an
  endpoint we halt is cleared by the host whenever it likes. BOT 6.6.1 ("stall until reset
  recovery") is kept by halting the endpoint again every 50 ms while the core still requires
  reset recovery (`FunctionFsServer._halt`).
- A bulk OUT read completes on a short packet or when its buffer is full. A read larger than the
  host's transfer whose last packet is full-sized would wait for the next CBW, which the host only
  sends after our CSW: a deadlock. So reads are sized from the CBW's dCBWDataTransferLength
  (`_OutPhaseTracker`), and a CBW is read with a one-packet buffer.

Threads: `ffs-ep0` reads events and answers class requests; `ffs-bulk-out` reads CBWs and data
and is also the command executor: it runs each command (`LogicalUnit.execute()`, which may wait for
a durable write) *without* the adapter lock, so ep0 is answered while it waits, then completes it
under the lock, then writes its data phase and CSW itself (a hand-off to another thread costs two
thread switches per command, which a board's CPU feels); `ffs-bulk-in` sends whatever else the BOT
core has for bulk IN (stalls after a refused CBW), never at the same time. A Bulk-Only reset
or a DISABLE/ENABLE while a command runs abandons it (it still lands once; no CSW is sent), and
after ENABLE the logical unit raises UNIT ATTENTION 29h/00 on the next command.

Public API: `FunctionFsServer(lu, identity, mountpoint, ...)` (context manager, needs a mounted and
not yet bound FunctionFS instance) and `serve_gadget(lu, identity, udc=...)` which composes the
configfs gadget, mounts FunctionFS, serves, binds and tears all of it down in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import functionfs
from functionfs import ch9
from functionfs import functionfs as ffs_h

from firmware.logical_unit import LogicalUnit
from gadget.bot import (
    CBW_LENGTH,
    CBW_SIGNATURE,
    EP_IN,
    EP_OUT,
    FLAG_DATA_IN,
    BulkOnlyTransport,
    ClassRequest,
    Stall,
)
from gadget.descriptors import DeviceIdentity, Speed, interface_block

log = logging.getLogger(__name__)

_CBW_HEAD = struct.Struct("<IIIB")  # dCBWSignature, dCBWTag, dCBWDataTransferLength, bmCBWFlags
EVENT_SIZE = ctypes.sizeof(ffs_h.Event)
# Bytes per bulk read/write on an endpoint file. f_fs copies each into one kernel buffer (kmalloc
# unless the UDC does scatter-gather), so bigger is faster but needs contiguous kernel memory.
DEFAULT_CHUNK = 64 * 1024

# Errors a bulk endpoint file returns when the host went away or the function was disabled.
_DISCONNECT_ERRNOS = (errno.ESHUTDOWN, errno.ECONNRESET, errno.ENODEV, errno.EIO, errno.EPIPE,
                      errno.EINTR)


class FfsEvent(enum.IntEnum):
    """`enum usb_functionfs_event_type` (linux/usb/functionfs.h)."""

    BIND = ffs_h.BIND
    UNBIND = ffs_h.UNBIND
    ENABLE = ffs_h.ENABLE
    DISABLE = ffs_h.DISABLE
    SETUP = ffs_h.SETUP
    SUSPEND = ffs_h.SUSPEND
    RESUME = ffs_h.RESUME


class FunctionFsError(Exception):
    """FunctionFS refused our descriptors/strings or its files are missing (message says which)."""


@dataclass(frozen=True)
class SetupRequest:
    """One control request forwarded to the function (USB 2.0 9.3)."""

    request_type: int
    request: int
    value: int
    index: int
    length: int

    @property
    def is_in(self) -> bool:
        return bool(self.request_type & ch9.USB_DIR_IN)


class ControlReply(enum.Enum):
    """What the function answers on ep0 for a setup request."""

    ACK = "ack"  # zero-length status stage
    DATA = "data"  # data stage IN
    STALL = "stall"


@dataclass(frozen=True)
class ControlAnswer:
    reply: ControlReply
    data: bytes = b""


def answer_setup(bot: BulkOnlyTransport, req: SetupRequest) -> ControlAnswer:
    """Decide the ep0 answer for a request forwarded by FunctionFS (sans-IO; runs the BOT request).

    FunctionFS forwards only requests for this function's interface; `BulkOnlyTransport.class_request`
    knows Bulk-Only Mass Storage Reset and Get Max LUN (BOT 3.1, 3.2). Anything else: stall.
    """
    data = bot.class_request(req.request_type, req.request, req.value, req.length)
    if data is None:
        return ControlAnswer(ControlReply.STALL)
    return ControlAnswer(ControlReply.DATA, data) if req.is_in else ControlAnswer(ControlReply.ACK)


def parse_events(buf: bytes) -> Iterator[tuple[FfsEvent, SetupRequest | None]]:
    """Split what `read(ep0)` returned into events (12 bytes each: setup packet, type, padding)."""
    for off in range(0, len(buf) - EVENT_SIZE + 1, EVENT_SIZE):
        ev = ffs_h.Event.from_buffer_copy(buf, off)
        try:
            kind = FfsEvent(ev.type)
        except ValueError:
            log.warning("unknown functionfs event type=%d", ev.type)
            continue
        setup = None
        if kind is FfsEvent.SETUP:
            s = ev.u.setup
            setup = SetupRequest(s.bRequestType, s.bRequest, s.wValue, s.wIndex, s.wLength)
        yield kind, setup


# -- descriptors ---------------------------------------------------------------------------------
def _as_ctypes(raw: bytes) -> Any:
    """A raw descriptor from gadget.descriptors as the functionfs package's ctypes structure."""
    kind = raw[1]
    if kind == ch9.USB_DT_INTERFACE:
        desc = ch9.USBInterfaceDescriptor.from_buffer_copy(raw)
        desc.bInterfaceNumber = 0  # FunctionFS numbers interfaces within the function
        desc.iInterface = 1  # the function's own string table (`function_strings`)
        return desc
    if kind == ch9.USB_DT_ENDPOINT:
        return ch9.USBEndpointDescriptorNoAudio.from_buffer_copy(raw[:7])
    if kind == ch9.USB_DT_SS_ENDPOINT_COMP:
        return ch9.USBSSEPCompDescriptor.from_buffer_copy(raw)
    raise FunctionFsError(f"unexpected descriptor type {kind:#04x} in the interface pieces")


def _speed_list(speed: Speed) -> list[Any]:
    """Interface, then the IN endpoint (ep1 file), then OUT (ep2), each followed by its SuperSpeed
    companion at super speed: the wire order of `gadget.descriptors.interface_block`."""
    return [_as_ctypes(raw) for raw in interface_block(speed)]


def function_descriptors(speeds: tuple[Speed, ...] = (Speed.FULL, Speed.HIGH, Speed.SUPER)) -> bytes:
    """The FunctionFS v2 descriptor blob for the mass-storage interface at the given speeds."""
    lists = {s: _speed_list(s) for s in speeds}
    blob = functionfs.getDescsV2(
        0,
        fs_list=lists.get(Speed.FULL, ()),
        hs_list=lists.get(Speed.HIGH, ()),
        ss_list=lists.get(Speed.SUPER, ()),
    )
    return bytes(functionfs.serialise(blob))


def function_strings(interface_name: str) -> bytes:
    """The FunctionFS strings blob: one string (the interface's name) in US English."""
    return bytes(functionfs.serialise(functionfs.getStrings({0x0409: [interface_name]})))


class _OutPhaseTracker:
    """How many bytes the next bulk OUT read may ask for without swallowing a later CBW.

    Mirrors just enough of the CBW (signature, length, direction) to know whether a DATA-OUT phase
    follows; the BOT core remains the judge of validity. Uncertain states fall back to one-packet
    reads, which are always safe.
    """

    def __init__(self, chunk: int = DEFAULT_CHUNK) -> None:
        self.data_out_left = 0
        self.chunk = chunk

    def reset(self) -> None:
        self.data_out_left = 0

    def next_read_size(self, max_packet: int) -> int:
        if self.data_out_left <= 0:
            return max_packet  # a CBW is one short packet (31 bytes)
        want = min(self.data_out_left, self.chunk)
        return -(-want // max_packet) * max_packet  # some UDCs (dwc3) need packet-aligned OUT buffers

    def feed(self, data: bytes, asked: int) -> None:
        if self.data_out_left > 0:
            self.data_out_left -= len(data)
            if len(data) < asked:  # short packet: the host ended the data phase
                self.data_out_left = 0
            return
        if len(data) == CBW_LENGTH:
            sig, _tag, length, flags = _CBW_HEAD.unpack_from(data)
            if sig == CBW_SIGNATURE and not flags & FLAG_DATA_IN and length > 0:
                self.data_out_left = length


class FunctionFsServer:
    """The mass-storage function on a mounted FunctionFS instance.

    `__enter__` writes descriptors and strings, opens the endpoint files and starts the threads; the
    caller binds the gadget to a UDC afterwards. `__exit__` stops the threads and closes ep0 (the
    host sees the device go away if it is still bound).
    """

    def __init__(
        self,
        lu: LogicalUnit,
        identity: DeviceIdentity,
        mountpoint: str | os.PathLike[str],
        *,
        max_lun: int = 0,
        speeds: tuple[Speed, ...] = (Speed.FULL, Speed.HIGH, Speed.SUPER),
        bot: BulkOnlyTransport | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if chunk < 4096 or chunk % 1024:
            raise ValueError(f"chunk must be a multiple of 1024 and at least 4096, not {chunk}")
        self.chunk = chunk
        self.mountpoint = Path(mountpoint)
        self.identity = identity
        self.speeds = speeds
        self.bot = bot if bot is not None else BulkOnlyTransport(lu, max_lun=max_lun, deferred=True)
        if not self.bot.deferred:
            raise ValueError("the FunctionFS adapter runs commands itself: give it a deferred BulkOnlyTransport")
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._out = _OutPhaseTracker(chunk)
        self._generation = 0  # bumped by reset/disable: a read begun before it belongs to no CBW
        self._in_busy = False  # a thread owns the bulk IN endpoint: sending a reply or halting it
        self._ep0: int | None = None
        self._ep_in: int | None = None
        self._ep_out: int | None = None
        self._threads: list[threading.Thread] = []
        self.enabled = False
        self._enabled = threading.Event()
        self.counters: dict[str, int] = {e.name.lower(): 0 for e in FfsEvent}
        self.counters.update(bot_resets=0, get_max_lun=0, ep0_stalls=0, in_stalls=0, out_stalls=0,
                             disconnects_in_io=0, bytes_in=0, bytes_out=0)

    @property
    def max_packet(self) -> int:
        """wMaxPacketSize of the bulk endpoints: the BOT's, set from the UDC's choice at ENABLE."""
        return self.bot.max_packet

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> FunctionFsServer:
        ep0_path = self.mountpoint / "ep0"
        try:
            self._ep0 = os.open(ep0_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise FunctionFsError(f"cannot open {ep0_path}: {exc.strerror} (is functionfs mounted?)") from exc
        try:
            try:
                os.write(self._ep0, function_descriptors(self.speeds))
            except OSError as exc:
                raise FunctionFsError(f"functionfs refused the descriptors: {exc.strerror}") from exc
            try:
                os.write(self._ep0, function_strings(self.identity.product))
            except OSError as exc:
                raise FunctionFsError(f"functionfs refused the strings: {exc.strerror}") from exc
            # Endpoint files exist only now, numbered in descriptor order: ep1 = IN, ep2 = OUT.
            # O_NONBLOCK only changes what happens while the host has not configured us: f_fs then
            # answers EAGAIN instead of sleeping uninterruptibly-for-us until ENABLE, so the threads
            # can still notice a stop. Transfers themselves stay blocking.
            flags = os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK
            self._ep_in = os.open(self.mountpoint / "ep1", flags)
            self._ep_out = os.open(self.mountpoint / "ep2", flags)
        except BaseException:
            self._close_fds()
            raise
        for name, target in (("ffs-ep0", self._ep0_loop), ("ffs-bulk-in", self._in_loop),
                             ("ffs-bulk-out", self._out_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("functionfs function ready mountpoint=%s speeds=%s", self.mountpoint,
                 ",".join(s.name for s in self.speeds))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def request_stop(self) -> None:
        """Tell the threads to finish; they leave as soon as their current I/O returns (unbinding
        the UDC makes every pending endpoint I/O return)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()

    def close(self) -> None:
        self.request_stop()
        for t in self._threads:
            if t.name == "ffs-ep0":
                t.join(timeout=2)
        # Bulk threads blocked in an endpoint read that never gets enabled cannot be woken from
        # user space; they are daemon threads and hold nothing but their file descriptor.
        for t in self._threads:
            if t.name != "ffs-ep0":
                t.join(timeout=1)
        self._close_fds()
        log.info("functionfs function closed mountpoint=%s", self.mountpoint)

    def _close_fds(self) -> None:
        for attr in ("_ep_in", "_ep_out", "_ep0"):
            fd = getattr(self, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)

    def status(self) -> dict[str, object]:
        with self._lock:
            bot_status = self.bot.status()
        return {
            "transport": "functionfs",
            "mountpoint": str(self.mountpoint),
            "enabled": self.enabled,
            "max_packet": self.max_packet,
            "events": dict(self.counters),
            "bot": bot_status,
        }

    # -- ep0 --------------------------------------------------------------------------------
    def _ep0_loop(self) -> None:
        fd = self._ep0
        assert fd is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            try:
                buf = os.read(fd, EVENT_SIZE * 4)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                log.warning("ep0 read failed error=%s", exc.strerror)
                self._stop.wait(0.2)
                continue
            for kind, setup in parse_events(buf):
                self.counters[kind.name.lower()] += 1
                self._on_event(kind, setup)

    def _on_event(self, kind: FfsEvent, setup: SetupRequest | None) -> None:
        if kind is FfsEvent.SETUP and setup is not None:
            self._on_setup(setup)
        elif kind is FfsEvent.ENABLE:
            self._on_enable()
        elif kind in (FfsEvent.DISABLE, FfsEvent.UNBIND):
            # The host went away (unplug, bus reset, unbind): everything in flight is lost.
            with self._lock:
                self.enabled = False
                self._enabled.clear()
                self.bot.bus_reset()
                self._out.reset()
                self._generation += 1
                self._lock.notify_all()
            log.info("function %s", kind.name.lower())
        else:
            log.info("function %s", kind.name.lower())

    def _on_enable(self) -> None:
        max_packet = self.max_packet
        if self._ep_in is not None:
            try:
                raw = fcntl.ioctl(self._ep_in, ffs_h.ENDPOINT_DESC, bytes(ctypes.sizeof(ch9.USBEndpointDescriptor)))
                max_packet = struct.unpack_from("<H", raw, 4)[0] & 0x7FF or max_packet
            except OSError as exc:
                log.warning("cannot read the active endpoint descriptor error=%s", exc.strerror)
        with self._lock:
            self.bot.max_packet = max_packet
            self.bot.bus_reset()  # configured (again): the next command gets the unit attention
            self._out.reset()
            self._generation += 1
            self.enabled = True
            self._enabled.set()
            self._lock.notify_all()
        log.info("function enabled max_packet=%d", max_packet)

    def _on_setup(self, req: SetupRequest) -> None:
        fd = self._ep0
        assert fd is not None
        with self._lock:
            answer = answer_setup(self.bot, req)
            if answer.reply is ControlReply.ACK and req.request == ClassRequest.BULK_ONLY_RESET:
                self.counters["bot_resets"] += 1
                self._out.reset()
                self._generation += 1
                self._lock.notify_all()
        try:
            if answer.reply is ControlReply.ACK:
                os.read(fd, 0)
            elif answer.reply is ControlReply.DATA:
                self.counters["get_max_lun"] += 1
                os.write(fd, answer.data[: req.length])
            else:
                self.counters["ep0_stalls"] += 1
                log.info("stalling control request type=%#04x request=%#04x value=%#06x length=%d",
                         req.request_type, req.request, req.value, req.length)
                # Wrong-direction I/O on ep0 makes f_fs stall the request (it returns EL2HLT).
                if req.is_in:
                    os.read(fd, 0)
                else:
                    os.write(fd, b"")
        except OSError as exc:
            if exc.errno != errno.EL2HLT:
                log.warning("ep0 reply failed request=%#04x error=%s", req.request, exc.strerror)

    # -- bulk endpoints ---------------------------------------------------------------------
    @staticmethod
    def _set_halt(fd: int, endpoint: int) -> None:
        """Halt a bulk endpoint by I/O in the wrong direction (f_fs: usb_ep_set_halt, EBADMSG)."""
        try:
            if endpoint == EP_IN:
                os.read(fd, 0)
            else:
                os.write(fd, b"")
        except OSError as exc:
            if exc.errno != errno.EBADMSG:
                log.info("halt failed endpoint=%#04x error=%s", endpoint, exc.strerror)

    def _halt(self, fd: int, endpoint: int) -> None:
        self._set_halt(fd, endpoint)
        self.counters["in_stalls" if endpoint == EP_IN else "out_stalls"] += 1
        # The UDC clears the halt whenever the host asks and never tells us; the core's halt follows
        # it. While the core requires reset recovery (BOT 6.6.1) a CLEAR_FEATURE alone must not end
        # the stall: halt again every 50 ms until the class reset (which bumps the generation under
        # this lock before the host can see its status stage, so no re-halt lands after the reset).
        with self._lock:
            gen = self._generation
            self.bot.clear_halt(endpoint)
            while self._halted_in_core(endpoint) and gen == self._generation and not self._stop.is_set():
                self._lock.wait(0.05)
                if self._halted_in_core(endpoint) and gen == self._generation and not self._stop.is_set():
                    self._set_halt(fd, endpoint)

    def _halted_in_core(self, endpoint: int) -> bool:
        return self.bot.in_halted if endpoint == EP_IN else self.bot.out_halted

    def _out_loop(self) -> None:
        fd = self._ep_out
        assert fd is not None
        while not self._stop.is_set():
            with self._lock:
                gen = self._generation
                asked = self._out.next_read_size(self.max_packet)
            try:
                data = os.read(fd, asked)
            except OSError as exc:
                if self._io_error("out", exc):
                    return
                continue
            if self._stop.is_set():
                return
            with self._lock:
                if gen != self._generation:
                    self._out.reset()
                self._out.feed(data, asked)
                self.counters["bytes_out"] += len(data)
                accepted = self.bot.bulk_out(data)
                halted = self.bot.out_halted
                command = self.bot.take_command()
                self._lock.notify_all()
            if command is not None:
                # This thread is the command executor: ep0 and bulk IN keep the lock meanwhile.
                # Nothing else arrives on bulk OUT before the CSW, and after a reset the next
                # CBW waits in the kernel until this command has finished: one at a time, in order.
                result = self.bot.run(command)
                with self._lock:
                    self.bot.complete(command, result)
                # The data phase and the CSW go out from this thread: waking the bulk IN thread
                # for them would cost two thread switches per command, and nothing can arrive on
                # bulk OUT before the host has read the CSW anyway.
                self._drain_in()
            if not accepted or halted:
                # Halt now (cases 8/10, invalid CBW), before the host sends what we refuse.
                self._halt(fd, EP_OUT)

    def _take_in(self) -> bytes | bytearray | Stall | None:
        """Under the lock: the next bulk IN reply, which the caller then owns (it is the only
        sender until it calls `_in_done`), or None when there is none or another thread is sending."""
        if self._in_busy:
            return None
        reply = self.bot.bulk_in(self.chunk)
        if reply is not None:
            self._in_busy = True
        return reply

    def _in_done(self) -> None:
        with self._lock:
            self._in_busy = False
            self._lock.notify_all()

    def _send_in(self, fd: int, reply: bytes | bytearray | Stall) -> bool:
        """Send one bulk IN reply (or halt the endpoint). False when the sending thread should end."""
        try:
            if not isinstance(reply, bytes | bytearray):  # gadget.bot.STALL
                self._halt(fd, EP_IN)
                return True
            try:
                os.write(fd, reply)
                self.counters["bytes_in"] += len(reply)
            except OSError as exc:
                if self._io_error("in", exc):
                    return False
            return True
        finally:
            self._in_done()

    def _drain_in(self) -> None:
        """On the bulk OUT thread, right after a command completed: send what the core has for bulk
        IN (data phase, CSW) until it has nothing more; the bulk IN thread takes what is left when
        it is already sending."""
        fd = self._ep_in
        assert fd is not None
        while not self._stop.is_set():
            with self._lock:
                reply = self._take_in()
                if reply is None:
                    self._lock.notify_all()
                    return
            if not self._send_in(fd, reply):
                return

    def _in_loop(self) -> None:
        fd = self._ep_in
        assert fd is not None
        while not self._stop.is_set():
            with self._lock:
                reply = self._take_in()
                while reply is None and not self._stop.is_set():
                    self._lock.wait(0.5)
                    reply = self._take_in()
            if reply is None or self._stop.is_set():
                if reply is not None:
                    self._in_done()
                return
            if not self._send_in(fd, reply):
                return

    def _io_error(self, which: str, exc: OSError) -> bool:
        """Handle a failed bulk I/O. True when the thread should end."""
        if self._stop.is_set() or exc.errno == errno.EBADF:
            return True
        if exc.errno == errno.EAGAIN:  # not configured by a host (yet): wait for ENABLE or a stop
            if self._enabled.is_set():
                self._stop.wait(0.01)  # ENABLE seen, f_fs about to enable the endpoint
            else:
                self._enabled.wait(0.2)
            return False
        if exc.errno in _DISCONNECT_ERRNOS:
            self.counters["disconnects_in_io"] += 1
            log.info("bulk %s interrupted by disconnect error=%s", which, exc.strerror)
        else:
            log.warning("bulk %s failed error=%s", which, exc.strerror)
        self._stop.wait(0.05)
        return False


# -- the whole gadget ------------------------------------------------------------------------------
class GadgetSession:
    """What `serve_gadget` yields: the bound UDC and a status for the control socket."""

    def __init__(self, server: FunctionFsServer, gadget: Any, udc: str, console: Any) -> None:
        self.server = server
        self.gadget = gadget
        self.udc = udc
        self.console = console

    def status(self) -> dict[str, object]:
        from gadget.configfs import udc_speed, udc_state

        st = self.server.status()
        st.update(udc=self.udc, udc_state=udc_state(self.udc, self.gadget.udc_class),
                  speed=udc_speed(self.udc, self.gadget.udc_class), gadget=str(self.gadget.path),
                  acm_console=str(self.console.tty) if self.console is not None else None)
        return st


@contextlib.contextmanager
def serve_gadget(
    lu: LogicalUnit,
    identity: DeviceIdentity,
    *,
    udc: str | None = None,
    acm_console: bool = False,
    status_text: Callable[[], str] | None = None,
    name: str = "usbmirror",
    configfs_root: Path | None = None,
    udc_class: Path | None = None,
    mountpoint: Path = Path("/run/usbmirror/ffs"),
    speeds: tuple[Speed, ...] = (Speed.FULL, Speed.HIGH, Speed.SUPER),
    dev_dir: Path = Path("/dev"),
    chunk: int = DEFAULT_CHUNK,
) -> Iterator[GadgetSession]:
    """Compose the gadget, mount FunctionFS, serve `lu`, bind to `udc` (or the first UDC); on exit
    unbind, stop serving, unmount and remove the gadget. A stale gadget or mount is cleaned first."""
    from gadget import configfs as cfs

    root = configfs_root or cfs.DEFAULT_CONFIGFS
    cls_dir = udc_class or cfs.DEFAULT_UDC_CLASS
    if configfs_root is None:
        cfs.ensure_configfs_mounted(root)
    config = cfs.GadgetConfig(
        name=name, vendor_id=identity.vendor_id, product_id=identity.product_id,
        bcd_device=identity.bcd_device, manufacturer=identity.manufacturer, product=identity.product,
        serial=identity.serial, max_power_ma=max(identity.max_power_ma, 100), ffs_instance=name,
        acm=acm_console, acm_instance=name,
    )
    gadget = cfs.ConfigFsGadget(config, configfs_root=root, udc_class=cls_dir)
    with contextlib.ExitStack() as stack:
        cfs.pick_udc(udc, cls_dir)  # fail early, before touching anything
        stack.enter_context(gadget)
        stack.enter_context(cfs.FunctionFsMount(config.ffs_instance, mountpoint))
        server = stack.enter_context(FunctionFsServer(lu, identity, mountpoint, speeds=speeds, chunk=chunk))
        bound = gadget.bind(udc)
        stack.callback(gadget.unbind)
        stack.callback(server.request_stop)  # runs before unbind: threads see the stop flag
        console = None
        if acm_console:
            tty = gadget.acm_tty(dev_dir)
            assert tty is not None
            if status_text is None:
                render: Callable[[], str] = lambda: cfs.render_status_text(server.status())  # noqa: E731
            else:
                text_fn = status_text

                def render() -> str:  # the same markers as render_status_text, so readers can split
                    return f"--- usbmirror status ---\n{text_fn().rstrip()}\n--- end ---\n"

            console = stack.enter_context(cfs.AcmStatusConsole(tty, render))
        yield GadgetSession(server, gadget, bound, console)
