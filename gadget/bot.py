"""USB Mass Storage Bulk-Only Transport (BOT 1.0), sans-IO: CBW in, data both ways, CSW out.

The transports (`gadget/mass_storage.py` over USB/IP, `gadget/functionfs.py` on a board) feed bulk
transfers and endpoint requests in; `BulkOnlyTransport` answers with bytes, "nothing yet" (None) or
`STALL`, and calls the `LogicalUnit` (the SCSI target) to plan and run each command. It owns:

* the stage machine (COMMAND, DATA_OUT, DATA_IN, STATUS, NEED_RESET) and the endpoint halts;
* CBW validity (6.2.1) and meaningfulness (6.2.2) checks, and the 6.6.1 "stall until reset
  recovery" rule for invalid CBWs;
* the thirteen host/device cases (6.7): which side's length wins, the residue, phase errors and
  which endpoint to stall, using `LogicalUnit.plan()` as the device's intent;
* reassembly of DATA-OUT and segmentation of DATA-IN across arbitrarily sized bulk transfers.

What it does not do: decode SCSI (the logical unit's job: `LogicalUnit.plan()` is all the transport
knows of a command), keep sense data (the logical unit keeps it for REQUEST SENSE), touch a socket or
an endpoint file, or time anything out (the host does).

Running a command is split from the transfers so that an adapter can keep answering ep0 while a
command waits (a durable write, a `sync` remote): with `deferred=True`, once a command's data phase
is complete the transport enters the EXECUTING stage and `take_command()` hands the adapter a
`BotCommand`. The adapter calls `run(command)` (the logical unit's `execute()`, which may block) on
its command executor, outside any lock, then `complete(command, result)` under its lock. Bulk-IN
requests stay pending meanwhile; control requests and resets are answered at once. Without
`deferred` (sans-IO callers, tests) `bulk_out()` runs the same three steps before it returns.

Resets while a command runs: the Bulk-Only Mass Storage Reset and a USB reset (`bus_reset()`) return
the transport to the COMMAND stage at once. A command whose data phase had completed still runs to
its end exactly once (a write lands once, not zero or two times); its result is dropped by
`complete()` and its CSW is never sent, since the host abandoned it. Commands are executed in the
order they were received, so one that arrives after the reset runs after the abandoned one. After a
USB reset, the logical unit's `reset_event()` is called on the executor just before the next
command runs (never during one), so that command, not an abandoned one, reports the unit attention.

Choices the spec leaves open, and what this transport does:

* Not-meaningful CBW (6.2.2; the response is unspecified, 6.4): the command is not run; the
  endpoint of the data phase the host announced is stalled and the CSW reports a phase error with
  the whole length as residue, which makes any host run reset recovery without waiting for a timeout.
* Cases 2 and 3 (host expects no data, device would move some): phase error, command not run, no
  stall (6.7.1 allows one, nothing needs it).
* Case 7 (host wants less than the device has): the command runs, the first dCBWDataTransferLength
  bytes are sent, phase error.
* Cases 9 and 11 (host sends more than the device wants): the excess is accepted and discarded,
  the residue says how much (6.7.3, the recommended choice). Case 13: the host's bytes are accepted
  and discarded, the command is not run, phase error. Cases 8 and 10: the host's data endpoint is
  stalled at once, command not run, phase error.
* DATA-IN shorter than the host asked (cases 4 and 5): the IN endpoint is stalled after the last
  byte, as 6.7.2 requires. `stall_short_in=False` instead stalls only when the host's transfer
  would otherwise not end (the last piece fills the request or is a multiple of `max_packet`).
* Bulk-Only Mass Storage Reset also clears both halts. BOT 3.1 says the halts survive the class
  reset; every host follows it with CLEAR_FEATURE(HALT) on both endpoints anyway (reset recovery,
  5.3.4), so clearing here changes nothing for them and unsticks a host that forgets.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, NamedTuple

from firmware.logical_unit import CommandResult, Direction, LogicalUnit, Status
from gadget.descriptors import EP_IN, EP_OUT

__all__ = [
    "CBW_LENGTH",
    "CBW_SIGNATURE",
    "CSW_LENGTH",
    "CSW_SIGNATURE",
    "EP_IN",
    "EP_OUT",
    "STALL",
    "BotCommand",
    "BulkOnlyTransport",
    "BytesLike",
    "Case",
    "Cbw",
    "ClassRequest",
    "Csw",
    "CswStatus",
    "InvalidCbw",
    "InvalidCsw",
    "Stage",
    "Stall",
    "classify",
]

log = logging.getLogger(__name__)

CBW_SIGNATURE: Final = 0x43425355  # "USBC" little-endian (BOT 5.1)
CSW_SIGNATURE: Final = 0x53425355  # "USBS" little-endian (BOT 5.2)
CBW_LENGTH: Final = 31
CSW_LENGTH: Final = 13
MAX_CB_LENGTH: Final = 16
MAX_LUN_LIMIT: Final = 15  # BOT 3.2: LUNs 0..15
FLAG_DATA_IN: Final = 0x80  # bmCBWFlags bit 7: 1 = device to host
# bmRequestType of the class requests: class, recipient interface, host-to-device / device-to-host.
_REQUEST_TYPE_CLASS_OUT: Final = 0x21
_REQUEST_TYPE_CLASS_IN: Final = 0xA1
BytesLike = bytes | bytearray | memoryview  # what adapters may hand to bulk_out()

# Per-command wire formats use struct (one C-level call per CBW/CSW), not construct.
# CBW (BOT 5.1): 0 dCBWSignature, 4 dCBWTag, 8 dCBWDataTransferLength, 12 bmCBWFlags, 13 bCBWLUN,
# 14 bCBWCBLength, 15 CBWCB[16].  CSW (BOT 5.2): 0 dCSWSignature, 4 dCSWTag, 8 dCSWDataResidue,
# 12 bCSWStatus.
_CBW = struct.Struct("<IIIBBB16s")
_CSW = struct.Struct("<IIIB")
_unpack_cbw = _CBW.unpack
_pack_csw = _CSW.pack
_tuple_new = tuple.__new__  # a named tuple without its Python-level __new__ (hot path)


class Stall:
    """The endpoint is halted: the transport completes the request with STALL (-EPIPE)."""

    _instance: ClassVar[Stall | None] = None

    def __new__(cls) -> Stall:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "STALL"


STALL: Final = Stall()


class Stage(enum.IntEnum):
    """Where the transport is in the command/data/status cycle (BOT 5.3, figure 1)."""

    COMMAND = 0  # waiting for a CBW on bulk OUT
    DATA_OUT = 1  # receiving the host's data on bulk OUT
    DATA_IN = 2  # handing data to the host on bulk IN
    STATUS = 3  # CSW ready for the next bulk IN
    NEED_RESET = 4  # invalid CBW seen: both endpoints stalled until reset recovery (6.6.1)
    EXECUTING = 5  # the logical unit runs the command; bulk IN waits for its data or CSW


class CswStatus(enum.IntEnum):
    """bCSWStatus (BOT 5.2 table 5.3)."""

    PASSED = 0x00
    FAILED = 0x01
    PHASE_ERROR = 0x02


class ClassRequest(enum.IntEnum):
    """bRequest of the Bulk-Only class requests on the default pipe (BOT 3.1, 3.2)."""

    GET_MAX_LUN = 0xFE
    BULK_ONLY_RESET = 0xFF


class Case(enum.IntEnum):
    """The thirteen host-expectation/device-intent cases of BOT 6.7 (table 6.1)."""

    HN_DN = 1
    HN_DI = 2
    HN_DO = 3
    HI_DN = 4
    HI_GT_DI = 5
    HI_EQ_DI = 6
    HI_LT_DI = 7
    HI_DO = 8
    HO_DN = 9
    HO_DI = 10
    HO_GT_DO = 11
    HO_EQ_DO = 12
    HO_LT_DO = 13


class InvalidCbw(ValueError):
    """A bulk OUT transfer in the COMMAND stage that is not a valid CBW (BOT 6.2.1)."""


class InvalidCsw(ValueError):
    """Bytes that are not a valid CSW (BOT 6.3.1); raised only by the host-side parser."""


class Cbw(NamedTuple):
    """A Command Block Wrapper with every field as sent, reserved bits included (BOT 5.1). A named
    tuple: one is made per command, and a tuple is the cheapest record Python builds."""

    tag: int
    data_transfer_length: int
    flags: int
    lun: int  # the raw bCBWLUN byte (bits 7..4 reserved)
    cb_length: int  # the raw bCBWCBLength byte (bits 7..5 reserved)
    cb: bytes  # all 16 CBWCB bytes

    @classmethod
    def for_command(
        cls, tag: int, cdb: bytes, data_transfer_length: int = 0, *, data_in: bool = False, lun: int = 0
    ) -> Cbw:
        """A well-formed CBW as a host would send it (tests, tools)."""
        if not 1 <= len(cdb) <= MAX_CB_LENGTH:
            raise ValueError(f"CDB length {len(cdb)} not in 1..16")
        return cls(
            tag=tag,
            data_transfer_length=data_transfer_length,
            flags=FLAG_DATA_IN if data_in else 0,
            lun=lun,
            cb_length=len(cdb),
            cb=cdb.ljust(MAX_CB_LENGTH, b"\0"),
        )

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Cbw:
        """Parse one bulk OUT transfer; `InvalidCbw` unless it is a valid CBW (BOT 6.2.1)."""
        # BOT 6.2.1: valid = received after a CSW or reset, exactly 31 bytes, signature "USBC".
        if len(data) != CBW_LENGTH:
            raise InvalidCbw(f"transfer of {len(data)} bytes, a CBW is {CBW_LENGTH}")
        signature, tag, length, flags, lun, cb_length, cb = _CBW.unpack(data)
        if signature != CBW_SIGNATURE:
            raise InvalidCbw(f"signature {signature:#010x}")
        return cls(tag, length, flags, lun, cb_length, cb)

    def build(self) -> bytes:
        return _CBW.pack(
            CBW_SIGNATURE, self.tag, self.data_transfer_length, self.flags, self.lun, self.cb_length, self.cb
        )

    @property
    def data_in(self) -> bool:
        return bool(self.flags & FLAG_DATA_IN)

    @property
    def cdb(self) -> bytes:
        """CBWCB cut to bCBWCBLength (meaningful CBWs only)."""
        return self.cb[: self.cb_length]

    def meaningless_reason(self, max_lun: int) -> str | None:
        """Why this valid CBW is not meaningful (BOT 6.2.2), or None if it is."""
        if self.flags & ~FLAG_DATA_IN & 0xFF:
            return f"reserved bmCBWFlags bits set ({self.flags:#04x})"
        if self.lun & 0xF0:
            return f"reserved bCBWLUN bits set ({self.lun:#04x})"
        if self.lun > max_lun:
            return f"LUN {self.lun} > max LUN {max_lun}"
        if self.cb_length & 0xE0:
            return f"reserved bCBWCBLength bits set ({self.cb_length:#04x})"
        if not 1 <= self.cb_length <= MAX_CB_LENGTH:
            return f"bCBWCBLength {self.cb_length} not in 1..16"
        return None


@dataclass(frozen=True, slots=True)
class Csw:
    """A Command Status Wrapper (BOT 5.2)."""

    tag: int
    residue: int
    status: int

    def build(self) -> bytes:
        return _CSW.pack(CSW_SIGNATURE, self.tag, self.residue, self.status)

    @classmethod
    def parse(cls, data: bytes) -> Csw:
        """Host-side check (BOT 6.3.1): 13 bytes with signature "USBS", else `InvalidCsw`."""
        if len(data) != CSW_LENGTH:
            raise InvalidCsw(f"{len(data)} bytes, a CSW is {CSW_LENGTH}")
        signature, tag, residue, status = _CSW.unpack(data)
        if signature != CSW_SIGNATURE:
            raise InvalidCsw(f"signature {signature:#010x}")
        return cls(tag, residue, status)


def classify(cbw: Cbw, direction: Direction, device_length: int) -> Case:
    """Which of the thirteen cases (BOT 6.7) a command falls in."""
    host_length = cbw.data_transfer_length
    device_none = direction is Direction.NONE or device_length == 0
    # BOT 5.1: the direction bit is ignored when dCBWDataTransferLength is zero.
    if host_length == 0:
        if device_none:
            return Case.HN_DN
        return Case.HN_DI if direction is Direction.IN else Case.HN_DO
    if cbw.data_in:
        if device_none:
            return Case.HI_DN
        if direction is Direction.OUT:
            return Case.HI_DO
        if host_length > device_length:
            return Case.HI_GT_DI
        return Case.HI_EQ_DI if host_length == device_length else Case.HI_LT_DI
    if device_none:
        return Case.HO_DN
    if direction is Direction.IN:
        return Case.HO_DI
    if host_length > device_length:
        return Case.HO_GT_DO
    return Case.HO_EQ_DO if host_length == device_length else Case.HO_LT_DO


# How loudly each case is logged: the thin diagonal is silent; a device that has less data than
# the host's allocation (4, 5: INQUIRY, MODE SENSE, VPD pages) is routine; a host sending more than
# needed (9, 11) is worth a note; phase errors mean a host or unit bug.
_CASE_LOG_LEVEL: Final[dict[Case, int]] = {
    Case.HN_DN: 0,
    Case.HI_EQ_DI: 0,
    Case.HO_EQ_DO: 0,
    Case.HI_DN: logging.DEBUG,
    Case.HI_GT_DI: logging.DEBUG,
    Case.HO_DN: logging.INFO,
    Case.HO_GT_DO: logging.INFO,
    Case.HN_DI: logging.WARNING,
    Case.HN_DO: logging.WARNING,
    Case.HI_LT_DI: logging.WARNING,
    Case.HI_DO: logging.WARNING,
    Case.HO_DI: logging.WARNING,
    Case.HO_LT_DO: logging.WARNING,
}


@dataclass(slots=True, eq=False)
class BotCommand:
    """Everything about the command in flight: one record, as tinyusb and Linux keep it. An adapter
    holds one only between `take_command()` and `complete()` and reads nothing from it."""

    cbw: Cbw
    case: Case | None  # None when the CBW was not meaningful or planning failed
    run: bool  # whether execute() is (still) to be called
    device_length: int = 0
    data_out: bytes = b""  # the DATA-OUT payload handed to execute()
    unit_reset: bool = False  # call the unit's reset_event() before executing (a USB reset came first)
    # what complete() does with the result: one of the *_done methods of the transport
    on_result: Callable[[BulkOnlyTransport, BotCommand, CommandResult | None], None] | None = None
    status: CswStatus = CswStatus.PASSED
    residue: int = 0
    # DATA-OUT: bytes of the host's transfer received so far, and the first `keep` of them
    received: int = 0
    keep: int = 0
    out_chunks: list[bytes] = field(default_factory=list)  # joined once, when the phase ends
    # DATA-IN: the payload, how much of it the host gets, and how much it got already
    in_data: bytes = b""
    in_view: memoryview | None = None
    in_limit: int = 0
    sent: int = 0


_SIZE_LABELS: dict[int, str] = {}  # length -> label, for the few lengths a host uses


def _size_bucket(length: int) -> str:
    """Histogram label for a data transfer length: 0, then powers of two ('<=4096')."""
    label = _SIZE_LABELS.get(length)
    if label is None:
        label = "0" if length == 0 else f"<={1 << (length - 1).bit_length()}"
        if len(_SIZE_LABELS) < 4096:  # every CBW may name another length: keep the cache bounded
            _SIZE_LABELS[length] = label
    return label


def _check_endpoint(endpoint: int) -> int:
    if endpoint not in (EP_IN, EP_OUT):
        raise ValueError(f"endpoint {endpoint:#04x} is not a Bulk-Only endpoint ({EP_IN:#04x}/{EP_OUT:#04x})")
    return endpoint


class BulkOnlyTransport:
    """One Bulk-Only Mass Storage interface, sans-IO.

    Errors: the methods raise only `ValueError` for arguments the transport adapter got wrong
    (an endpoint other than 0x81/0x01, a negative length, a non-positive packet size). Whatever
    the host sends is answered on the wire (stall, phase error) and logged, never raised.
    Exceptions from the logical unit are treated as internal device errors (BOT 6.6.2): logged,
    answered with a phase error.

    `max_lun` is what Get Max LUN reports and the highest bCBWLUN accepted; every LUN reaches the
    same `lu` (this transport does not multiplex units). `max_packet` is the bulk wMaxPacketSize
    at the current speed; only `stall_short_in=False` uses it. `deferred=True` leaves running
    each command to the adapter (`take_command`, `run`, `complete`; module docstring).
    """

    def __init__(
        self,
        lu: LogicalUnit,
        *,
        max_lun: int = 0,
        max_packet: int = 512,
        stall_short_in: bool = True,
        deferred: bool = False,
    ) -> None:
        if not 0 <= max_lun <= MAX_LUN_LIMIT:
            raise ValueError(f"max_lun must be 0..15 (BOT 3.2), got {max_lun}")
        self._lu = lu
        self._max_lun = max_lun
        self._max_packet = 0
        self.max_packet = max_packet
        self._stall_short_in = stall_short_in
        self._stage = Stage.COMMAND
        self._in_halted = False
        self._out_halted = False
        self._command: BotCommand | None = None
        self._deferred = deferred
        self._ready: BotCommand | None = None  # entered EXECUTING, not yet taken by the adapter
        self._unit_reset_pending = False  # a USB reset the logical unit has not been told of yet
        self._counters: Counter[str] = Counter()
        self._by_case: Counter[int] = Counter()
        self._sizes: Counter[str] = Counter()

    # --- public surface ---------------------------------------------------------------------

    @property
    def max_packet(self) -> int:
        """wMaxPacketSize of the bulk endpoints at the current speed (the transport sets it)."""
        return self._max_packet

    @max_packet.setter
    def max_packet(self, value: int) -> None:
        if value <= 0:
            raise ValueError(f"max_packet must be positive, got {value}")
        self._max_packet = value

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def deferred(self) -> bool:
        """Whether the adapter runs commands (`take_command`/`run`/`complete`)."""
        return self._deferred

    @property
    def in_halted(self) -> bool:
        return self._in_halted

    @property
    def out_halted(self) -> bool:
        return self._out_halted

    def bulk_out(self, data: BytesLike) -> bool:
        """One bulk OUT transfer from the host. False: the OUT endpoint is halted, complete the
        transfer with STALL and ignore the data. May run a command."""
        if self._out_halted:
            # USB 2.0 8.4.5 / 9.4.5: a halted endpoint answers STALL whatever the stage.
            self._counters["stalled_out_transfers"] += 1
            return False
        self._counters["bytes_out"] += len(data)
        return self._ON_BULK_OUT[self._stage](self, data)

    def bulk_in(self, max_length: int) -> bytes | Stall | None:
        """The host asks for up to `max_length` bytes on bulk IN: bytes to send (fewer than
        max_length is a short transfer), None (nothing yet: keep the request pending and ask
        again after the next event) or STALL (the IN endpoint is halted)."""
        if max_length < 0:
            raise ValueError(f"negative transfer length {max_length}")
        if self._in_halted:
            self._counters["stalled_in_transfers"] += 1
            return STALL
        return self._ON_BULK_IN[self._stage](self, max_length)

    def clear_halt(self, endpoint: int) -> None:
        """CLEAR_FEATURE(ENDPOINT_HALT). No effect while reset recovery is required (6.6.1)."""
        _check_endpoint(endpoint)
        self._ON_CLEAR_HALT[self._stage](self, endpoint)

    def set_halt(self, endpoint: int) -> None:
        """SET_FEATURE(ENDPOINT_HALT) from the host, or a stall the adapter needs."""
        self._halt(_check_endpoint(endpoint))

    def reset(self) -> None:
        """Bulk-Only Mass Storage Reset (class request 0xFF, BOT 3.1): ready for the next CBW. A
        command being executed finishes on its own; its CSW is not sent (module docstring)."""
        self._abandon("BOT reset")
        self._counters["resets"] += 1

    def bus_reset(self) -> None:
        """A USB reset, a (re)configuration or the host going away: the same as the class reset for
        the transport, and the logical unit hears of it (`reset_event()`, a unit attention) just
        before the next command runs."""
        self._abandon("USB reset")
        self._unit_reset_pending = True
        self._counters["bus_resets"] += 1

    def _abandon(self, why: str) -> None:
        if self._command is not None:
            log.info("%s drops command in flight tag=%#x stage=%s", why, self._command.cbw.tag,
                     self._stage.name)
        self._command = None
        self._stage = Stage.COMMAND
        # BOT 3.1 keeps halts across this request; see the module docstring for why we clear them.
        self._in_halted = False
        self._out_halted = False

    def get_max_lun(self) -> int:
        """Get Max LUN (class request 0xFE, BOT 3.2): the highest LUN number."""
        return self._max_lun

    def class_request(self, request_type: int, request: int, value: int, length: int) -> bytes | None:
        """A class request the adapter found addressed to this interface (it checks wIndex).

        Returns the data stage (b"" for Bulk-Only Mass Storage Reset, which it performs) or None:
        a request error, the adapter stalls ep0. BOT 3.1: reset is 21h/FFh, wValue 0, wLength 0;
        BOT 3.2: Get Max LUN is A1h/FEh, wValue 0, wLength 1 (a longer request gets the one byte).
        """
        if value != 0:
            return None
        if request_type == _REQUEST_TYPE_CLASS_OUT and request == ClassRequest.BULK_ONLY_RESET and length == 0:
            self.reset()
            return b""
        if request_type == _REQUEST_TYPE_CLASS_IN and request == ClassRequest.GET_MAX_LUN and length >= 1:
            return bytes([self._max_lun])
        return None

    def status(self) -> dict[str, object]:
        """Counters for the status socket and the install self-test."""
        counters = self._counters
        return {
            "stage": self._stage.name,
            "in_halted": self._in_halted,
            "out_halted": self._out_halted,
            "max_lun": self._max_lun,
            "max_packet": self._max_packet,
            "commands": counters["commands"],
            "completed": counters["completed"],
            "phase_errors": counters["phase_errors"],
            "failed": counters["failed"],
            "resets": counters["resets"],
            "bus_resets": counters["bus_resets"],
            "completed_after_reset": counters["completed_after_reset"],
            "invalid_cbws": counters["invalid_cbws"],
            "meaningless_cbws": counters["meaningless_cbws"],
            "internal_errors": counters["internal_errors"],
            "stalls_in": counters["stalls_in"],
            "stalls_out": counters["stalls_out"],
            "stalled_in_transfers": counters["stalled_in_transfers"],
            "stalled_out_transfers": counters["stalled_out_transfers"],
            "clear_halts_ignored": counters["clear_halts_ignored"],
            "unexpected_out": counters["unexpected_out"],
            "short_csw_requests": counters["short_csw_requests"],
            "bytes_in": counters["bytes_in"],
            "bytes_out": counters["bytes_out"],
            "discarded_out_bytes": counters["discarded_out_bytes"],
            "by_case": {int(k): v for k, v in sorted(self._by_case.items())},
            "transfer_sizes": dict(self._sizes),
        }

    # --- endpoint halts ------------------------------------------------------------------------

    def _halt(self, endpoint: int) -> None:
        if endpoint == EP_IN:
            if not self._in_halted:
                self._counters["stalls_in"] += 1
            self._in_halted = True
        else:
            if not self._out_halted:
                self._counters["stalls_out"] += 1
            self._out_halted = True

    def _clear(self, endpoint: int) -> None:
        if endpoint == EP_IN:
            self._in_halted = False
        else:
            self._out_halted = False

    def _keep_halted(self, endpoint: int) -> None:
        # BOT 6.6.1: after an invalid CBW the device keeps both endpoints stalled until a Reset
        # Recovery; CLEAR_FEATURE(HALT) alone does not end it (5.3.4: the class reset comes first).
        self._counters["clear_halts_ignored"] += 1
        log.debug("clear halt ignored until reset recovery endpoint=%#04x", endpoint)

    # --- COMMAND stage -------------------------------------------------------------------------

    def _receive_cbw(self, data: BytesLike) -> bool:
        try:
            # Cbw.parse() inlined (once per command): the checks of BOT 6.2.1, then the tuple
            if len(data) != CBW_LENGTH:
                raise InvalidCbw(f"transfer of {len(data)} bytes, a CBW is {CBW_LENGTH}")
            signature, tag, length, flags, lun, cb_length, cb = _unpack_cbw(data)
            if signature != CBW_SIGNATURE:
                raise InvalidCbw(f"signature {signature:#010x}")
            cbw = _tuple_new(Cbw, (tag, length, flags, lun, cb_length, cb))
        except InvalidCbw as exc:
            # BOT 6.6.1: not valid -> stall IN, stall OUT (we choose stall over accept-and-discard)
            # and stay so until reset recovery.
            self._counters["invalid_cbws"] += 1
            log.warning("invalid CBW, stalling both endpoints until reset recovery: %s", exc)
            self._command = None
            self._halt(EP_IN)
            self._halt(EP_OUT)
            self._stage = Stage.NEED_RESET
            return True

        self._sizes[_SIZE_LABELS.get(length) or _size_bucket(length)] += 1
        # the checks of meaningless_reason() in one expression (lun > max_lun covers its reserved
        # bits, cb_length > 16 its reserved bits): the method only says why
        if flags & 0x7F or lun > self._max_lun or not 1 <= cb_length <= MAX_CB_LENGTH:
            # BOT 6.2.2 / 6.4: response unspecified; we refuse with a phase error (module docstring).
            self._counters["meaningless_cbws"] += 1
            log.warning("CBW not meaningful tag=%#x: %s", cbw.tag, cbw.meaningless_reason(self._max_lun))
            self._refuse_command(cbw)
            return True

        cdb = cb[:cb_length]
        self._counters["commands"] += 1
        try:
            plan = self._lu.plan(cdb)
        except Exception:
            log.exception("logical unit failed to plan cdb=%s tag=%#x", cdb.hex(), cbw.tag)
            self._counters["internal_errors"] += 1
            self._refuse_command(cbw)
            return True
        device_length = plan.length if plan.direction is not Direction.NONE else 0
        if device_length < 0:
            log.error("logical unit planned a negative length %d cdb=%s tag=%#x", device_length,
                      cdb.hex(), cbw.tag)
            self._counters["internal_errors"] += 1
            self._refuse_command(cbw)
            return True
        case = classify(cbw, plan.direction, device_length)
        self._by_case[case] += 1
        command = BotCommand(cbw=cbw, case=case, run=True, device_length=device_length)
        self._command = command
        level = _CASE_LOG_LEVEL[case]
        if level and log.isEnabledFor(level):
            log.log(level, "BOT case %d (%s) cdb=%s host_length=%d device_length=%d tag=%#x",
                    case, case.name, cdb.hex(), cbw.data_transfer_length, device_length, cbw.tag)
        self._ON_CASE[case](self, command)
        return True

    def _refuse_command(self, cbw: Cbw) -> None:
        """Do not run the command: stall the data endpoint the host announced, phase error."""
        command = BotCommand(cbw=cbw, case=None, run=False)
        self._command = command
        if cbw.data_transfer_length:
            self._halt(EP_IN if cbw.data_in else EP_OUT)
        self._to_status(command, CswStatus.PHASE_ERROR, cbw.data_transfer_length)

    # --- the thirteen cases (BOT 6.7), entered once the CBW is accepted --------------------------

    def _case_no_data(self, command: BotCommand) -> None:
        # Case 1, Hn = Dn (6.7.1): run it; status from the unit, residue 0.
        self._to_executing(command, BulkOnlyTransport._no_data_done)

    def _no_data_done(self, command: BotCommand, result: CommandResult | None) -> None:
        if result is None:
            self._to_status(command, CswStatus.PHASE_ERROR, 0)
            return
        self._to_status(command, self._status_of(result), 0)

    def _case_host_expects_nothing(self, command: BotCommand) -> None:
        # Cases 2 and 3, Hn < Di / Hn < Do (6.7.1): phase error, residue 0; the command is not run
        # because the host gave it no room for its data.
        self._to_status(command, CswStatus.PHASE_ERROR, 0)

    def _case_data_in(self, command: BotCommand) -> None:
        # Cases 4, 5, 6, 7 (6.7.2): run, then hand out min(device data, Hi) bytes.
        self._to_executing(command, BulkOnlyTransport._data_in_done)

    def _data_in_done(self, command: BotCommand, result: CommandResult | None) -> None:
        host_length = command.cbw.data_transfer_length
        if result is None:
            self._halt(EP_IN)
            self._to_status(command, CswStatus.PHASE_ERROR, host_length)
            return
        data = result.data
        if len(data) > command.device_length:
            log.error("logical unit returned %d bytes, planned %d cdb=%s; truncating",
                      len(data), command.device_length, command.cbw.cdb.hex())
        limit = min(len(data), command.device_length, host_length)
        # Case 7 (Hi < Di): the device sends what the host allows and reports a phase error.
        status = CswStatus.PHASE_ERROR if command.case is Case.HI_LT_DI else self._status_of(result)
        command.status = status
        command.residue = host_length - limit  # 6.7.2: Hi minus the relevant data actually sent
        if limit == 0:
            # Case 4 (Hi > Dn) or nothing to send: 6.7.2 says stall Bulk-In so the host's data
            # transfer ends, then the CSW.
            self._halt(EP_IN)
            self._to_status(command, status, host_length)
            return
        command.in_data = data
        command.in_limit = limit
        command.sent = 0
        self._stage = Stage.DATA_IN

    def _case_wrong_direction(self, command: BotCommand) -> None:
        # Case 8 (Hi <> Do): stall Bulk-In; case 10 (Ho <> Di): stall Bulk-Out (6.7.2, 6.7.3).
        # Phase error, command not run.
        host_length = command.cbw.data_transfer_length
        self._halt(EP_IN if command.case is Case.HI_DO else EP_OUT)
        self._to_status(command, CswStatus.PHASE_ERROR, host_length)

    def _case_data_out(self, command: BotCommand) -> None:
        # Cases 9, 11, 12, 13 (6.7.3): accept all Ho bytes; keep the first Do for the unit.
        case = command.case
        if case is Case.HO_LT_DO:
            # Case 13: the host sends less than the command needs; the unit never sees a short
            # buffer (logical_unit contract), so accept and discard, then report a phase error.
            command.run = False
            command.keep = 0
        else:
            command.keep = command.device_length  # 0 for case 9
        command.received = 0
        self._stage = Stage.DATA_OUT

    _ON_CASE: ClassVar[dict[Case, Callable[[BulkOnlyTransport, BotCommand], None]]] = {
        Case.HN_DN: _case_no_data,
        Case.HN_DI: _case_host_expects_nothing,
        Case.HN_DO: _case_host_expects_nothing,
        Case.HI_DN: _case_data_in,
        Case.HI_GT_DI: _case_data_in,
        Case.HI_EQ_DI: _case_data_in,
        Case.HI_LT_DI: _case_data_in,
        Case.HI_DO: _case_wrong_direction,
        Case.HO_DN: _case_data_out,
        Case.HO_DI: _case_wrong_direction,
        Case.HO_GT_DO: _case_data_out,
        Case.HO_EQ_DO: _case_data_out,
        Case.HO_LT_DO: _case_data_out,
    }

    # --- DATA_OUT stage ------------------------------------------------------------------------

    def _receive_data(self, data: BytesLike) -> bool:
        command = self._command
        assert command is not None
        host_length = command.cbw.data_transfer_length
        start = command.received
        take = min(len(data), host_length - start)
        if take < len(data):
            # The host sent more than dCBWDataTransferLength in one transfer: not BOT; drop it.
            log.warning("bulk OUT overran the data phase by %d bytes tag=%#x", len(data) - take,
                        command.cbw.tag)
        keep = command.keep
        wanted = min(take, max(0, keep - start))  # bytes of this transfer the unit will get
        if wanted:
            # Keep references, copy once at the end (b"".join): no quadratic growth, no zeroed
            # staging buffer. bytes() of a bytes object is that object; a bytearray/memoryview
            # the adapter may refill after we return is copied here.
            command.out_chunks.append(bytes(data if wanted == len(data) else memoryview(data)[:wanted]))
        if len(data) > wanted:
            self._counters["discarded_out_bytes"] += len(data) - wanted
        command.received = start + take
        if command.received >= host_length:
            self._finish_data_out(command)
        return True

    def _finish_data_out(self, command: BotCommand) -> None:
        host_length = command.cbw.data_transfer_length
        if not command.run:
            # Case 13 (Ho < Do): phase error; nothing ran.
            self._to_status(command, CswStatus.PHASE_ERROR, host_length)
            return
        # One transfer (the usual USB/IP case): join returns that very object, no copy.
        command.data_out = b"".join(command.out_chunks)
        command.out_chunks = []
        self._to_executing(command, BulkOnlyTransport._data_out_done)

    def _data_out_done(self, command: BotCommand, result: CommandResult | None) -> None:
        host_length = command.cbw.data_transfer_length
        if result is None:
            self._to_status(command, CswStatus.PHASE_ERROR, host_length)
            return
        # 6.7.3: residue = Ho minus what the device processed (Do; 0 in case 9).
        self._to_status(command, self._status_of(result), host_length - command.keep)

    # --- DATA_IN stage -------------------------------------------------------------------------

    def _send_data(self, max_length: int) -> bytes:
        command = self._command
        assert command is not None
        start = command.sent
        count = min(max_length, command.in_limit - start)
        if start == 0 and count == len(command.in_data):
            chunk = command.in_data  # whole payload in one transfer: no copy
        else:
            if command.in_view is None:
                command.in_view = memoryview(command.in_data)
            chunk = bytes(command.in_view[start : start + count])
        command.sent = start + count
        self._counters["bytes_in"] += count
        if command.sent >= command.in_limit:
            if command.in_limit < command.cbw.data_transfer_length and self._must_stall_short(
                count, max_length
            ):
                # 6.7.2 cases 4/5: the device sent less than the host asked -> STALL Bulk-In, so
                # the host's data phase ends and it goes on to read the CSW.
                self._halt(EP_IN)
            command.in_view = None
            command.in_data = b""
            self._stage = Stage.STATUS
        return chunk

    def _must_stall_short(self, count: int, max_length: int) -> bool:
        if self._stall_short_in:
            return True
        # Without the stall, the transfer only ends if this piece is a short packet.
        return count == max_length or count % self._max_packet == 0

    # --- STATUS stage --------------------------------------------------------------------------

    def _to_status(self, command: BotCommand, status: CswStatus, residue: int) -> None:
        command.status = status
        command.residue = residue
        self._stage = Stage.STATUS

    def _send_csw(self, max_length: int) -> bytes | Stall:
        command = self._command
        assert command is not None
        if max_length < CSW_LENGTH:
            # A CSW is 13 bytes (5.2); sending it into a smaller request would babble. Stall and
            # keep it for the next, proper request.
            self._counters["short_csw_requests"] += 1
            log.warning("host asked %d bytes for the CSW tag=%#x", max_length, command.cbw.tag)
            self._halt(EP_IN)
            return STALL
        # BOT 5.2: dCSWTag echoes dCBWTag.
        csw = _pack_csw(CSW_SIGNATURE, command.cbw.tag, command.residue, command.status)
        self._counters["completed"] += 1
        if command.status is CswStatus.PHASE_ERROR:
            self._counters["phase_errors"] += 1
        elif command.status is CswStatus.FAILED:
            self._counters["failed"] += 1
        self._counters["bytes_in"] += CSW_LENGTH
        self._command = None
        self._stage = Stage.COMMAND
        return csw

    def _send_nothing(self, max_length: int) -> None:
        # BOT 5.3: the host may request Data-In or the CSW before sending the associated CBW (or
        # while it still sends Data-Out); the request stays pending.
        return None

    # --- transfers that make no sense in a stage --------------------------------------------------

    def _unexpected_out(self, data: BytesLike) -> bool:
        # The device owes data or a CSW and the host sends on bulk OUT, e.g. a second CBW before
        # reading the CSW (BOT 5.3: the response is indeterminate). Refuse it with a stall so the
        # host notices and runs reset recovery instead of losing the bytes silently.
        self._counters["unexpected_out"] += 1
        log.warning("unexpected bulk OUT of %d bytes in stage %s", len(data), self._stage.name)
        self._halt(EP_OUT)
        return False

    def _refuse_out(self, data: BytesLike) -> bool:
        # NEED_RESET keeps OUT halted (6.6.1); reached only if an adapter cleared it behind our back.
        self._halt(EP_OUT)
        return False

    def _refuse_in(self, max_length: int) -> Stall:
        self._halt(EP_IN)
        return STALL

    # --- the stage machine: everything that changes stage is reached from these tables -----------
    # A halted endpoint answers STALL before the table is consulted (bulk_out/bulk_in);
    # reset() and set_halt() act the same in every stage.

    _ON_BULK_OUT: ClassVar[dict[Stage, Callable[[BulkOnlyTransport, BytesLike], bool]]] = {
        Stage.COMMAND: _receive_cbw,
        Stage.DATA_OUT: _receive_data,
        Stage.DATA_IN: _unexpected_out,
        Stage.STATUS: _unexpected_out,
        Stage.NEED_RESET: _refuse_out,
        Stage.EXECUTING: _unexpected_out,
    }
    _ON_BULK_IN: ClassVar[dict[Stage, Callable[[BulkOnlyTransport, int], bytes | Stall | None]]] = {
        Stage.COMMAND: _send_nothing,
        Stage.DATA_OUT: _send_nothing,
        Stage.DATA_IN: _send_data,
        Stage.STATUS: _send_csw,
        Stage.NEED_RESET: _refuse_in,
        Stage.EXECUTING: _send_nothing,
    }
    _ON_CLEAR_HALT: ClassVar[dict[Stage, Callable[[BulkOnlyTransport, int], None]]] = {
        Stage.COMMAND: _clear,
        Stage.DATA_OUT: _clear,
        Stage.DATA_IN: _clear,
        Stage.STATUS: _clear,
        Stage.NEED_RESET: _keep_halted,
        Stage.EXECUTING: _clear,
    }

    # --- calling the logical unit ----------------------------------------------------------------

    def _to_executing(
        self, command: BotCommand, on_result: Callable[[BulkOnlyTransport, BotCommand, CommandResult | None], None]
    ) -> None:
        command.run = False
        command.on_result = on_result
        if self._unit_reset_pending:
            command.unit_reset = True
            self._unit_reset_pending = False
        self._stage = Stage.EXECUTING
        if self._deferred:
            self._ready = command
        else:
            self.complete(command, self.run(command))

    def take_command(self) -> BotCommand | None:
        """The command that entered EXECUTING, once (deferred mode): the adapter passes it to `run()`
        on its executor and then to `complete()`. None when there is nothing new to run."""
        command, self._ready = self._ready, None
        return command

    def run(self, command: BotCommand) -> CommandResult | None:
        """Execute `command` on the logical unit (may block). Touches no transport state, so the
        adapter calls it without its lock; it must not call it for two commands at once. None
        (logged) if the unit raised: an internal device error (6.6.2), a phase error for the host."""
        cdb = command.cbw.cdb
        try:
            if command.unit_reset:
                self._lu.reset_event()
            return self._lu.execute(cdb, command.data_out)
        except Exception:
            log.exception("logical unit failed cdb=%s tag=%#x", cdb.hex(), command.cbw.tag)
            return None

    def complete(self, command: BotCommand, result: CommandResult | None) -> bool:
        """The result of `run(command)`: the data phase or the CSW follows. False when a reset came
        while it ran: the host abandoned the command and gets neither its data nor its CSW."""
        if result is None:
            self._counters["internal_errors"] += 1
        if command is not self._command or self._stage is not Stage.EXECUTING:
            self._counters["completed_after_reset"] += 1
            log.info("command finished after a reset, no CSW sent tag=%#x cdb=%s", command.cbw.tag,
                     command.cbw.cdb.hex())
            return False
        on_result = command.on_result
        assert on_result is not None
        command.on_result = None
        command.data_out = b""
        on_result(self, command, result)
        return True

    @staticmethod
    def _status_of(result: CommandResult) -> CswStatus:
        return CswStatus.PASSED if result.status == Status.GOOD else CswStatus.FAILED
