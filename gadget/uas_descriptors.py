"""Descriptors of the usbmirror disk with UAS: Bulk-Only as alternate setting 0, UAS as alternate setting 1.

The layout real UAS bridges use, so a host without a UAS driver still binds Bulk-Only (alternate
setting 0, the one every host selects first) and a host with one (Linux `uas`, Windows `uaspstor`)
selects alternate setting 1 with SET_INTERFACE:

    configuration 1   one interface, bus powered
      interface 0 alt 0   class 0x08, subclass 0x06, protocol 0x50 (BOT)
        EP 0x81 bulk IN, EP 0x01 bulk OUT                          (gadget.descriptors)
      interface 0 alt 1   class 0x08, subclass 0x06, protocol 0x62 (UAS)
        EP 0x01 bulk OUT  + pipe usage 1 (command)
        EP 0x82 bulk IN   + pipe usage 2 (status)
        EP 0x83 bulk IN   + pipe usage 3 (data-in)
        EP 0x04 bulk OUT  + pipe usage 4 (data-out)

The pipe usage descriptor (UAS-2 5.3.3.2, type 0x24) follows its endpoint; Linux's `uas` finds the
four pipes by it. Full and high speed only: UAS at SuperSpeed needs bulk streams, which this device
does not implement (and USB/IP's vhci-hcd does not offer).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from gadget.descriptors import (
    INTERFACE_CLASS_MASS_STORAGE,
    INTERFACE_SUBCLASS_SCSI,
    MAX_PACKET,
    ConfigurationDescriptor,
    DescriptorUnavailable,
    DeviceIdentity,
    EndpointDescriptor,
    InterfaceDescriptor,
    OtherSpeedConfigurationDescriptor,
    Speed,
    interface_block,
)

INTERFACE_PROTOCOL_UAS: Final = 0x62  # MSC overview 1.4 table 3.1: USB Attached SCSI
UAS_ALTERNATE_SETTING: Final = 1
PIPE_USAGE_DESCRIPTOR: Final = 0x24  # UAS-2 table 5


class Pipe(enum.IntEnum):
    """Pipe IDs of the pipe usage descriptor (UAS-2 table 6)."""

    COMMAND = 1
    STATUS = 2
    DATA_IN = 3
    DATA_OUT = 4


#: Endpoint address of each UAS pipe in alternate setting 1.
UAS_ENDPOINTS: Final[dict[Pipe, int]] = {
    Pipe.COMMAND: 0x01,
    Pipe.STATUS: 0x82,
    Pipe.DATA_IN: 0x83,
    Pipe.DATA_OUT: 0x04,
}
#: Pipe of each endpoint address (the inverse of `UAS_ENDPOINTS`).
PIPE_OF_ENDPOINT: Final[dict[int, Pipe]] = {address: pipe for pipe, address in UAS_ENDPOINTS.items()}


def pipe_usage(pipe: Pipe) -> bytes:
    """bLength 4, bDescriptorType 0x24, bPipeID, reserved."""
    return struct.pack("<BBBB", 4, PIPE_USAGE_DESCRIPTOR, pipe, 0)


def uas_interface_block(speed: Speed) -> tuple[bytes, ...]:
    """Alternate setting 1 in wire order: interface, then each endpoint followed by its pipe usage."""
    speed = Speed(speed)
    if speed is Speed.SUPER:
        raise ValueError("UAS at SuperSpeed needs bulk streams, which this device does not implement")
    pieces = [bytes(InterfaceDescriptor.build({
        "bInterfaceNumber": 0,
        "bAlternateSetting": UAS_ALTERNATE_SETTING,
        "bNumEndpoints": len(UAS_ENDPOINTS),
        "bInterfaceClass": INTERFACE_CLASS_MASS_STORAGE,
        "bInterfaceSubClass": INTERFACE_SUBCLASS_SCSI,
        "bInterfaceProtocol": INTERFACE_PROTOCOL_UAS,
        "iInterface": 0,
    }))]
    for pipe, address in UAS_ENDPOINTS.items():
        pieces.append(bytes(EndpointDescriptor.build({
            "bEndpointAddress": address, "bmAttributes": 0x02, "wMaxPacketSize": MAX_PACKET[speed], "bInterval": 0,
        })))
        pieces.append(pipe_usage(pipe))
    return tuple(pieces)


def uas_configuration_descriptor(ident: DeviceIdentity, speed: Speed, *, other_speed: bool = False) -> bytes:
    """The configuration set with both alternate settings (see the module docstring)."""
    speed = Speed(speed)
    if speed is Speed.SUPER:
        raise ValueError("UAS at SuperSpeed needs bulk streams, which this device does not implement")
    if other_speed:
        body_speed = Speed.HIGH if speed is Speed.FULL else Speed.FULL
        header = OtherSpeedConfigurationDescriptor
    else:
        body_speed = speed
        header = ConfigurationDescriptor
    body = b"".join(interface_block(body_speed)) + b"".join(uas_interface_block(body_speed))
    head = header.build({
        "wTotalLength": 9 + len(body),
        "bNumInterfaces": 1,
        "bConfigurationValue": 1,
        "iConfiguration": 0,
        "bmAttributes": 0x80 | (0x40 if ident.self_powered else 0),
        "bMaxPower": -(-ident.max_power_ma // 2),
    })
    return bytes(head) + body


__all__ = [
    "INTERFACE_PROTOCOL_UAS",
    "PIPE_OF_ENDPOINT",
    "PIPE_USAGE_DESCRIPTOR",
    "UAS_ALTERNATE_SETTING",
    "UAS_ENDPOINTS",
    "DescriptorUnavailable",
    "Pipe",
    "pipe_usage",
    "uas_configuration_descriptor",
    "uas_interface_block",
]
