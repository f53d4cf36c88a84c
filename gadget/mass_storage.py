"""The USB mass-storage device as a USB host sees it through a host controller: ep0 and two bulk pipes.

`MassStorageDevice` is sans-IO. A transport (today `gadget/usbip_server.py`) hands it each
transfer the host submits and receives completions: descriptors and standard requests on ep0
(chapter 9 of USB 2.0), the two Bulk-Only class requests, and bulk transfers passed to
`gadget.bot.BulkOnlyTransport`. A bulk-IN transfer the BOT cannot answer yet stays pending here,
in submission order, and completes after a later transfer, a control request or a command's
completion gives it data.

Commands are not run inside `submit()`: once a command is ready, `take_command()` hands it to the
transport, which runs it on its command executor (`run()`, may block, no lock needed) and reports
with `complete()`; control transfers keep being answered meanwhile (see `gadget/bot.py`). A
SET_CONFIGURATION or a disconnect is a USB reset for the BOT and the logical unit (unit attention).

What it does not do: SCSI (the `LogicalUnit` behind the BOT), the USB/IP wire format, sockets or
threads. Transfer status uses the Linux URB convention: 0, or a negative errno (-EPIPE = stall).
"""

from __future__ import annotations

import collections
import enum
import logging
from typing import Final, NamedTuple

from firmware.logical_unit import CommandResult, LogicalUnit
from gadget.bot import STALL, BotCommand, BulkOnlyTransport, ClassRequest, Stall
from gadget.descriptors import (
    EP_IN,
    EP_OUT,
    INTERFACE_CLASS_MASS_STORAGE,
    INTERFACE_PROTOCOL_BULK_ONLY,
    INTERFACE_SUBCLASS_SCSI,
    MAX_PACKET,
    DescriptorType,
    DescriptorUnavailable,
    DeviceIdentity,
    Speed,
    bos_descriptor,
    configuration_descriptor,
    device_descriptor,
    device_qualifier,
    string_descriptor,
)

log = logging.getLogger(__name__)

_tuple_new = tuple.__new__

EPIPE: Final = 32  # URB status -EPIPE: the endpoint stalled

INTERFACE_NUMBER: Final = 0
CONFIGURATION_VALUE: Final = 1
BULK_EP_NUMBER: Final = 1  # both bulk endpoints: 0x81 (IN) and 0x01 (OUT)


class Request(enum.IntEnum):
    """bRequest of the standard requests (USB 2.0 table 9-4, USB 3.2 table 9-5)."""

    GET_STATUS = 0x00
    CLEAR_FEATURE = 0x01
    SET_FEATURE = 0x03
    SET_ADDRESS = 0x05
    GET_DESCRIPTOR = 0x06
    SET_DESCRIPTOR = 0x07
    GET_CONFIGURATION = 0x08
    SET_CONFIGURATION = 0x09
    GET_INTERFACE = 0x0A
    SET_INTERFACE = 0x0B
    SYNCH_FRAME = 0x0C
    SET_SEL = 0x30
    SET_ISOCH_DELAY = 0x31


class FeatureSelector(enum.IntEnum):
    ENDPOINT_HALT = 0
    DEVICE_REMOTE_WAKEUP = 1
    TEST_MODE = 2
    U1_ENABLE = 48
    U2_ENABLE = 49
    LTM_ENABLE = 50


class Recipient(enum.IntEnum):
    DEVICE = 0
    INTERFACE = 1
    ENDPOINT = 2
    OTHER = 3


class Completion(NamedTuple):
    """A finished transfer. `tag` is the transport's name for it (the USB/IP seqnum). A named
    tuple: one is made for every transfer, and a tuple is the cheapest record Python builds."""

    tag: int
    status: int  # 0 or a negative errno
    actual_length: int
    data: bytes = b""  # IN data (len == actual_length)


class _PendingIn(NamedTuple):
    tag: int
    length: int


class _Stalled(Exception):
    """A control request this device refuses: the transfer completes with -EPIPE."""


class MassStorageDevice:
    """One USB mass-storage device (one interface, bulk IN 0x81, bulk OUT 0x01) at one speed."""

    def __init__(
        self,
        lu: LogicalUnit,
        identity: DeviceIdentity,
        speed: Speed = Speed.HIGH,
    ) -> None:
        self.lu = lu
        self.identity = identity
        self.speed = Speed(speed)
        self.bot = BulkOnlyTransport(lu, max_packet=MAX_PACKET[self.speed], deferred=True)
        self._device_desc = device_descriptor(identity, self.speed)
        self._config_desc = configuration_descriptor(identity, self.speed)
        self.configuration = 0
        self.address = 0
        self._pending_in: collections.deque[_PendingIn] = collections.deque()
        self.stats: dict[str, int] = collections.Counter()

    # -- identity for USB/IP ---------------------------------------------------------------------
    @property
    def device_descriptor(self) -> bytes:
        return self._device_desc

    @property
    def configuration_descriptor(self) -> bytes:
        return self._config_desc

    @property
    def interface_triples(self) -> tuple[tuple[int, int, int], ...]:
        return ((INTERFACE_CLASS_MASS_STORAGE, INTERFACE_SUBCLASS_SCSI, INTERFACE_PROTOCOL_BULK_ONLY),)

    @property
    def bcd_usb(self) -> int:
        return int.from_bytes(self._device_desc[2:4], "little")

    # -- transfers -------------------------------------------------------------------------------
    def submit(
        self, tag: int, endpoint: int, direction_in: bool, length: int, setup: bytes = b"", data: bytes = b""
    ) -> list[Completion]:
        """Handle one transfer the host submitted on `endpoint` (number 0..15, direction apart).

        Returns the completions it produced, in order: possibly none (a bulk IN waiting for data),
        possibly several (earlier pending bulk INs that this transfer made ready).
        """
        if endpoint == 0:
            self.stats["control"] += 1
            done = [self._control(tag, setup, data, length, direction_in)]
            done.extend(self._retry_pending())  # a clear-halt or reset may unblock a pending IN
            return done
        if endpoint != BULK_EP_NUMBER or self.configuration == 0:
            # no such endpoint in the current configuration: what a host controller reports as a stall
            log.warning("transfer to missing endpoint ep=%d in=%s configured=%d", endpoint, direction_in,
                        self.configuration)  # fmt: skip
            return [Completion(tag, -EPIPE, 0)]
        stats = self.stats
        # The completions of the usual cases are built with tuple.__new__, without the named
        # tuple's Python-level __new__ (one transfer after another goes through here).
        if direction_in:
            stats["bulk_in"] += 1
            if not self._pending_in:  # the usual case: the host asks for data or the CSW that is ready
                result = self.bot.bulk_in(length)
                if result is None:
                    self._pending_in.append(_PendingIn(tag, length))
                    return []
                if result is STALL:
                    return [Completion(tag, -EPIPE, 0)]
                return [_tuple_new(Completion, (tag, 0, len(result), result))]  # type: ignore[arg-type]
            self._pending_in.append(_PendingIn(tag, length))
            return self._retry_pending()
        stats["bulk_out"] += 1
        if not self.bot.bulk_out(data):
            return [Completion(tag, -EPIPE, 0), *self._retry_pending()]
        if not self._pending_in:  # the usual case: nothing waits on bulk IN
            return [_tuple_new(Completion, (tag, 0, len(data), b""))]
        return [Completion(tag, 0, len(data)), *self._retry_pending()]

    def take_command(self) -> BotCommand | None:
        """The command a transfer just made ready to run, once; None if there is none."""
        return self.bot.take_command()

    def run(self, command: BotCommand) -> CommandResult | None:
        """Execute `command` on the logical unit (may block; call it without the device's lock)."""
        return self.bot.run(command)

    def complete(self, command: BotCommand, result: CommandResult | None) -> list[Completion]:
        """The result of `run()`: the bulk-IN transfers it made ready (none if a reset came first)."""
        if not self.bot.complete(command, result) or not self._pending_in:
            return []
        return self._retry_pending()

    def cancel(self, tag: int) -> bool:
        """Unlink: True when `tag` was a pending bulk IN and is now gone without completing."""
        for item in self._pending_in:
            if item.tag == tag:
                self._pending_in.remove(item)
                return True
        return False

    @property
    def pending(self) -> tuple[int, ...]:
        """Tags of bulk-IN transfers waiting for data, oldest first."""
        return tuple(p.tag for p in self._pending_in)

    def disconnect(self) -> None:
        """The host went away (detach, or its connection dropped mid-transfer): forget pending
        transfers and return to the unconfigured, freshly-reset state for the next host."""
        dropped = len(self._pending_in)
        self._pending_in.clear()
        self.bot.bus_reset()  # back to waiting for a CBW, halts cleared; the next host hears of it
        self.configuration = 0
        self.address = 0
        log.info("device disconnected dropped_pending=%d", dropped)

    def _retry_pending(self) -> list[Completion]:
        done: list[Completion] = []
        while self._pending_in:
            item = self._pending_in[0]
            result = self.bot.bulk_in(item.length)
            if result is None:
                break
            self._pending_in.popleft()
            if isinstance(result, Stall):  # gadget.bot.STALL: the IN endpoint is halted
                done.append(Completion(item.tag, -EPIPE, 0))
            else:
                done.append(_tuple_new(Completion, (item.tag, 0, len(result), result)))
        return done

    # -- ep0 -------------------------------------------------------------------------------------
    def _control(self, tag: int, setup: bytes, data: bytes, length: int, direction_in: bool) -> Completion:
        if len(setup) != 8:
            log.warning("control transfer without an 8-byte setup packet tag=%d", tag)
            return Completion(tag, -EPIPE, 0)
        request_type, request = setup[0], setup[1]
        value = int.from_bytes(setup[2:4], "little")
        index = int.from_bytes(setup[4:6], "little")
        w_length = int.from_bytes(setup[6:8], "little")
        try:
            reply = self._dispatch(request_type, request, value, index, w_length, data)
        except (_Stalled, DescriptorUnavailable) as exc:
            log.debug("control stall bmRequestType=0x%02x bRequest=0x%02x wValue=0x%04x wIndex=0x%04x "
                      "reason=%s", request_type, request, value, index, exc)  # fmt: skip
            self.stats["control_stall"] += 1
            return Completion(tag, -EPIPE, 0)
        if request_type & 0x80:
            reply = reply[: min(w_length, length)]
            return Completion(tag, 0, len(reply), reply)
        return Completion(tag, 0, len(data))

    def _dispatch(self, rtype: int, request: int, value: int, index: int, w_length: int, data: bytes) -> bytes:
        kind = (rtype >> 5) & 3
        recipient = rtype & 0x1F
        device_to_host = bool(rtype & 0x80)
        if kind == 1:  # class
            return self._class_request(rtype, request, value, index, w_length)
        if kind != 0:
            raise _Stalled("vendor request")
        if request == Request.GET_DESCRIPTOR and device_to_host and recipient == Recipient.DEVICE:
            return self._get_descriptor(value >> 8, value & 0xFF, index)
        if request == Request.GET_STATUS and device_to_host:
            return self._get_status(recipient, index)
        if request == Request.GET_CONFIGURATION and device_to_host and recipient == Recipient.DEVICE:
            return bytes([self.configuration])
        if request == Request.GET_INTERFACE and device_to_host and recipient == Recipient.INTERFACE:
            if self.configuration == 0 or index != INTERFACE_NUMBER:
                raise _Stalled("GET_INTERFACE of a missing interface")
            return b"\x00"
        if device_to_host:
            raise _Stalled(f"unsupported IN request 0x{request:02x}")
        if request == Request.SET_ADDRESS and recipient == Recipient.DEVICE:
            # vhci-hcd answers SET_ADDRESS itself; a client that sends it anyway gets an ack
            self.address = value & 0x7F
            return b""
        if request == Request.SET_CONFIGURATION and recipient == Recipient.DEVICE:
            if value not in (0, CONFIGURATION_VALUE):
                raise _Stalled(f"no configuration {value}")
            self._configure(value)
            return b""
        if request == Request.SET_INTERFACE and recipient == Recipient.INTERFACE:
            if self.configuration == 0 or index != INTERFACE_NUMBER or value != 0:
                raise _Stalled("SET_INTERFACE to a missing interface or alternate setting")
            return b""
        if request in (Request.CLEAR_FEATURE, Request.SET_FEATURE):
            self._feature(request == Request.SET_FEATURE, recipient, value, index)
            return b""
        if request in (Request.SET_SEL, Request.SET_ISOCH_DELAY) and recipient == Recipient.DEVICE:
            # USB 3.2 9.4.12/9.4.11: link power timing; a device without isochronous endpoints and
            # without LPM of its own only acknowledges them (Linux sends both while enumerating)
            if self.speed != Speed.SUPER:
                raise _Stalled("SET_SEL/SET_ISOCH_DELAY on a non-SuperSpeed device")
            return b""
        raise _Stalled(f"unsupported OUT request 0x{request:02x}")

    def _configure(self, value: int) -> None:
        # USB 2.0 9.1.1.5 / 9.4.5: (re)configuring puts the endpoints in their initial state, and
        # the function with them (Linux f_mass_storage resets on a config change too). It matters
        # here because vhci-hcd performs a port reset locally: after usb-storage resets the
        # device, the SET_CONFIGURATION that follows is all this side ever sees of it.
        # Pending transfers stay: the host's core unlinks them when it disables the endpoints.
        # For the logical unit it is a reset too: the next command gets UNIT ATTENTION 29h/00.
        self.configuration = value
        self.bot.bus_reset()
        log.info("set configuration value=%d speed=%s", value, self.speed.name)

    def _get_descriptor(self, dtype: int, dindex: int, langid: int) -> bytes:
        if dtype == DescriptorType.DEVICE:
            return self._device_desc
        if dtype == DescriptorType.CONFIGURATION:
            if dindex != 0:
                raise _Stalled(f"no configuration index {dindex}")
            return self._config_desc
        if dtype == DescriptorType.STRING:
            desc = string_descriptor(self.identity, dindex, langid)
            if desc is None:
                raise _Stalled(f"no string {dindex}")
            return desc
        if dtype in (DescriptorType.DEVICE_QUALIFIER, DescriptorType.OTHER_SPEED_CONFIGURATION):
            # USB 3.2 9.6.2: a SuperSpeed device stalls these; a full-speed-only device would too,
            # but ours is dual-speed (full and high) like every high-speed device
            if self.speed == Speed.SUPER:
                raise _Stalled("qualifier/other-speed of a SuperSpeed device")
            if dtype == DescriptorType.DEVICE_QUALIFIER:
                return device_qualifier(self.identity, self.speed)
            if dindex != 0:
                raise _Stalled(f"no other-speed configuration index {dindex}")
            return configuration_descriptor(self.identity, self.speed, other_speed=True)
        if dtype == DescriptorType.BOS:
            if self.bcd_usb < 0x0201:
                raise _Stalled("BOS of a USB 2.0 device")
            return bos_descriptor()
        raise _Stalled(f"no descriptor type {dtype}")

    def _get_status(self, recipient: int, index: int) -> bytes:
        if recipient == Recipient.DEVICE:
            return bytes([1 if self.identity.self_powered else 0, 0])
        if recipient == Recipient.INTERFACE:
            if self.configuration == 0 or index != INTERFACE_NUMBER:
                raise _Stalled("GET_STATUS of a missing interface")
            return b"\x00\x00"
        if recipient == Recipient.ENDPOINT:
            return bytes([1 if self._endpoint_halted(index & 0xFF) else 0, 0])
        raise _Stalled("GET_STATUS of an unknown recipient")

    def _endpoint_halted(self, address: int) -> bool:
        if address in (0x00, 0x80):
            return False
        if self.configuration == 0:
            raise _Stalled(f"endpoint 0x{address:02x} does not exist while unconfigured")
        if address == EP_IN:
            return self.bot.in_halted
        if address == EP_OUT:
            return self.bot.out_halted
        raise _Stalled(f"no endpoint 0x{address:02x}")

    def _feature(self, set_it: bool, recipient: int, feature: int, index: int) -> None:
        if recipient == Recipient.ENDPOINT and feature == FeatureSelector.ENDPOINT_HALT:
            address = index & 0xFF
            self._endpoint_halted(address)  # stalls for an endpoint that does not exist
            if address in (EP_IN, EP_OUT):
                if set_it:
                    self.bot.set_halt(address)
                else:
                    # BOT 6.6.1: no effect while reset recovery is required (the BOT decides)
                    self.bot.clear_halt(address)
                log.debug("%s ENDPOINT_HALT ep=0x%02x", "set" if set_it else "clear", address)
            return
        if recipient == Recipient.DEVICE and feature == FeatureSelector.DEVICE_REMOTE_WAKEUP and not set_it:
            return  # we never wake the host; clearing the permission is harmless
        if recipient == Recipient.DEVICE and feature in (FeatureSelector.U1_ENABLE, FeatureSelector.U2_ENABLE,
                                                         FeatureSelector.LTM_ENABLE):
            if self.speed != Speed.SUPER:
                raise _Stalled("link power features on a non-SuperSpeed device")
            return  # no link to manage behind a virtual host controller
        if recipient == Recipient.INTERFACE and feature == 0:
            return  # USB 3.2 FUNCTION_SUSPEND: nothing to suspend
        raise _Stalled(f"feature {feature} recipient {recipient}")

    def _class_request(self, rtype: int, request: int, value: int, index: int, w_length: int) -> bytes:
        if rtype & 0x1F != Recipient.INTERFACE or index != INTERFACE_NUMBER:
            raise _Stalled("class request not addressed to the mass-storage interface")
        # BOT 3.1/3.2, decided by the BOT. After a reset a pending bulk IN stays queued (the host
        # unlinks it, or it receives the next command's data).
        reply = self.bot.class_request(rtype, request, value, w_length)
        if reply is None:
            raise _Stalled(f"class request 0x{request:02x}")
        if request == ClassRequest.BULK_ONLY_RESET:
            log.info("bulk-only mass storage reset")
        return reply

    def status(self) -> dict[str, object]:
        return {
            "speed": self.speed.name.lower(),
            "configuration": self.configuration,
            "pending_in": len(self._pending_in),
            "transfers": dict(self.stats),
            "bot": self.bot.status(),
        }
