"""USB descriptors of the usbmirror disk: one mass-storage interface (SCSI transparent, Bulk-Only).

Every standard descriptor the device hands to a host is declared here once, with `construct`, so
the same declaration builds the bytes and parses them back (tests check `parse(build(x)) == x`).
Descriptors are built at enumeration time, never per I/O, so construct's speed does not matter.

What the device looks like (USB 2.0 ch. 9, USB 3.2 ch. 9, MSC BOT 1.0 section 4):

    device           class 0 (defined by the interface), one configuration
    configuration 1  one interface, bus powered
      interface 0    class 0x08 mass storage, subclass 0x06 SCSI transparent, protocol 0x50 BOT
        EP 0x81      bulk IN   max packet 64 (full) / 512 (high) / 1024 (super, + companion)
        EP 0x01      bulk OUT  same
    strings          1 manufacturer, 2 product, 3 serial number (UTF-16LE, language 0x0409)
    qualifier        device qualifier + other-speed configuration at full and high speed
    BOS              USB 2.0 extension + SuperSpeed device capability (SuperSpeed only)

What this module does not do: answer control requests (that is `gadget/mass_storage.py` for USB/IP
and the kernel's composite driver for FunctionFS) or pick the speed (the transport knows it).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Final

from construct import (
    Bytes,
    Const,
    Container,
    GreedyRange,
    Int8ul,
    Int16ul,
    Int32ul,
    Struct,
    this,
)

__all__ = [
    "DEFAULT_MAX_BURST",
    "EP_IN",
    "EP_OUT",
    "INTERFACE_CLASS_MASS_STORAGE",
    "INTERFACE_PROTOCOL_BULK_ONLY",
    "INTERFACE_SUBCLASS_SCSI",
    "LANGID_EN_US",
    "MAX_PACKET",
    "USBIP_SPEED",
    "USB_SPEED_FULL",
    "USB_SPEED_HIGH",
    "USB_SPEED_SUPER",
    "DescriptorType",
    "DescriptorUnavailable",
    "DeviceIdentity",
    "Speed",
    "StringIndex",
    "bos_descriptor",
    "configuration_descriptor",
    "device_descriptor",
    "device_qualifier",
    "interface_block",
    "interface_endpoints",
    "normalize_serial",
    "parse_descriptor",
    "parse_descriptors",
    "parse_langids",
    "parse_string_descriptor",
    "speed_from_usbip",
    "split_descriptors",
    "string_descriptor",
    "usbip_speed",
]


class Speed(enum.IntEnum):
    """Bus speed the device operates at (our own numbering; see `USBIP_SPEED` for the wire codes)."""

    FULL = 1
    HIGH = 2
    SUPER = 3


# linux/usb/ch9.h `enum usb_device_speed`: the codes USB/IP carries in OP_REP_DEVLIST/IMPORT.
USB_SPEED_FULL: Final = 2
USB_SPEED_HIGH: Final = 3
USB_SPEED_SUPER: Final = 5
USBIP_SPEED: Final[dict[Speed, int]] = {
    Speed.FULL: USB_SPEED_FULL,
    Speed.HIGH: USB_SPEED_HIGH,
    Speed.SUPER: USB_SPEED_SUPER,
}


def usbip_speed(speed: Speed) -> int:
    """The `enum usb_device_speed` value for `speed`."""
    return USBIP_SPEED[Speed(speed)]


def speed_from_usbip(code: int) -> Speed:
    """Inverse of `usbip_speed`; ValueError for speeds this device never runs at (low, wireless, SSP)."""
    for speed, value in USBIP_SPEED.items():
        if value == code:
            return speed
    raise ValueError(f"unsupported USB/IP speed code {code}")


class DescriptorType(enum.IntEnum):
    """bDescriptorType values (USB 2.0 table 9-5, USB 3.2 table 9-6)."""

    DEVICE = 0x01
    CONFIGURATION = 0x02
    STRING = 0x03
    INTERFACE = 0x04
    ENDPOINT = 0x05
    DEVICE_QUALIFIER = 0x06
    OTHER_SPEED_CONFIGURATION = 0x07
    BOS = 0x0F
    DEVICE_CAPABILITY = 0x10
    SS_ENDPOINT_COMPANION = 0x30


class DeviceCapability(enum.IntEnum):
    """bDevCapabilityType values (USB 3.2 table 9-14)."""

    USB20_EXTENSION = 0x02
    SUPERSPEED_USB = 0x03


class StringIndex(enum.IntEnum):
    """String descriptor indexes this device uses (0 is the language list)."""

    LANGUAGES = 0
    MANUFACTURER = 1
    PRODUCT = 2
    SERIAL = 3


LANGID_EN_US: Final = 0x0409
EP_IN: Final = 0x81
EP_OUT: Final = 0x01
INTERFACE_CLASS_MASS_STORAGE: Final = 0x08
INTERFACE_SUBCLASS_SCSI: Final = 0x06  # MSC overview 1.4 table 2.1: SCSI transparent command set
INTERFACE_PROTOCOL_BULK_ONLY: Final = 0x50  # MSC overview 1.4 table 3.1: Bulk-Only Transport
MAX_PACKET: Final[dict[Speed, int]] = {Speed.FULL: 64, Speed.HIGH: 512, Speed.SUPER: 1024}
DEFAULT_MAX_BURST: Final = 0  # packets beyond the first per burst (0..15); 0 is always valid
_EP0_MAX_PACKET: Final[dict[Speed, int]] = {
    Speed.FULL: 64,
    Speed.HIGH: 64,
    Speed.SUPER: 9,  # USB 3.2 9.6.1: exponent, 2**9 = 512 bytes
}
_ATTR_BULK: Final = 0x02
_CONFIG_ATTR_RESERVED: Final = 0x80  # USB 2.0 table 9-10: D7 must be set
_CONFIG_ATTR_SELF_POWERED: Final = 0x40
_MAX_STRING_UNITS: Final = 126  # bLength is one byte: 2 + 2*126 = 254
# USB 3.2 table 9-20; the Linux composite driver's defaults (U1 1 us, U2 500 us).
_U1_EXIT_LATENCY_US: Final = 0x01
_U2_EXIT_LATENCY_US: Final = 0x01F4

# --- wire formats -------------------------------------------------------------------------------

DeviceDescriptor = Struct(
    # offset 0 bLength, 1 bDescriptorType, 2 bcdUSB, 4 class, 5 subclass, 6 protocol,
    # 7 bMaxPacketSize0, 8 idVendor, 10 idProduct, 12 bcdDevice, 14 iManufacturer, 15 iProduct,
    # 16 iSerialNumber, 17 bNumConfigurations (USB 2.0 table 9-8)
    "bLength" / Const(18, Int8ul),
    "bDescriptorType" / Const(DescriptorType.DEVICE, Int8ul),
    "bcdUSB" / Int16ul,
    "bDeviceClass" / Int8ul,
    "bDeviceSubClass" / Int8ul,
    "bDeviceProtocol" / Int8ul,
    "bMaxPacketSize0" / Int8ul,
    "idVendor" / Int16ul,
    "idProduct" / Int16ul,
    "bcdDevice" / Int16ul,
    "iManufacturer" / Int8ul,
    "iProduct" / Int8ul,
    "iSerialNumber" / Int8ul,
    "bNumConfigurations" / Int8ul,
)

DeviceQualifierDescriptor = Struct(
    # offset 0 bLength, 1 type, 2 bcdUSB, 4 class, 5 subclass, 6 protocol, 7 bMaxPacketSize0,
    # 8 bNumConfigurations, 9 bReserved (USB 2.0 table 9-9)
    "bLength" / Const(10, Int8ul),
    "bDescriptorType" / Const(DescriptorType.DEVICE_QUALIFIER, Int8ul),
    "bcdUSB" / Int16ul,
    "bDeviceClass" / Int8ul,
    "bDeviceSubClass" / Int8ul,
    "bDeviceProtocol" / Int8ul,
    "bMaxPacketSize0" / Int8ul,
    "bNumConfigurations" / Int8ul,
    "bReserved" / Const(0, Int8ul),
)


def _configuration_struct(descriptor_type: DescriptorType) -> Struct:
    # offset 0 bLength, 1 type, 2 wTotalLength, 4 bNumInterfaces, 5 bConfigurationValue,
    # 6 iConfiguration, 7 bmAttributes, 8 bMaxPower (USB 2.0 tables 9-10 and 9-11)
    return Struct(
        "bLength" / Const(9, Int8ul),
        "bDescriptorType" / Const(descriptor_type, Int8ul),
        "wTotalLength" / Int16ul,
        "bNumInterfaces" / Int8ul,
        "bConfigurationValue" / Int8ul,
        "iConfiguration" / Int8ul,
        "bmAttributes" / Int8ul,
        "bMaxPower" / Int8ul,
    )


ConfigurationDescriptor = _configuration_struct(DescriptorType.CONFIGURATION)
OtherSpeedConfigurationDescriptor = _configuration_struct(DescriptorType.OTHER_SPEED_CONFIGURATION)

InterfaceDescriptor = Struct(
    # offset 0 bLength, 1 type, 2 bInterfaceNumber, 3 bAlternateSetting, 4 bNumEndpoints,
    # 5 class, 6 subclass, 7 protocol, 8 iInterface (USB 2.0 table 9-12)
    "bLength" / Const(9, Int8ul),
    "bDescriptorType" / Const(DescriptorType.INTERFACE, Int8ul),
    "bInterfaceNumber" / Int8ul,
    "bAlternateSetting" / Int8ul,
    "bNumEndpoints" / Int8ul,
    "bInterfaceClass" / Int8ul,
    "bInterfaceSubClass" / Int8ul,
    "bInterfaceProtocol" / Int8ul,
    "iInterface" / Int8ul,
)

EndpointDescriptor = Struct(
    # offset 0 bLength, 1 type, 2 bEndpointAddress, 3 bmAttributes, 4 wMaxPacketSize,
    # 6 bInterval (USB 2.0 table 9-13)
    "bLength" / Const(7, Int8ul),
    "bDescriptorType" / Const(DescriptorType.ENDPOINT, Int8ul),
    "bEndpointAddress" / Int8ul,
    "bmAttributes" / Int8ul,
    "wMaxPacketSize" / Int16ul,
    "bInterval" / Int8ul,
)

SsEndpointCompanionDescriptor = Struct(
    # offset 0 bLength, 1 type, 2 bMaxBurst, 3 bmAttributes (bulk: MaxStreams),
    # 4 wBytesPerInterval (0 for bulk) (USB 3.2 table 9-27)
    "bLength" / Const(6, Int8ul),
    "bDescriptorType" / Const(DescriptorType.SS_ENDPOINT_COMPANION, Int8ul),
    "bMaxBurst" / Int8ul,
    "bmAttributes" / Int8ul,
    "wBytesPerInterval" / Int16ul,
)

BosDescriptor = Struct(
    # offset 0 bLength, 1 type, 2 wTotalLength, 4 bNumDeviceCaps (USB 3.2 table 9-12)
    "bLength" / Const(5, Int8ul),
    "bDescriptorType" / Const(DescriptorType.BOS, Int8ul),
    "wTotalLength" / Int16ul,
    "bNumDeviceCaps" / Int8ul,
)

Usb20ExtensionCapability = Struct(
    # offset 0 bLength, 1 type, 2 capability type, 3 bmAttributes (bit 1 LPM) (USB 3.2 table 9-15)
    "bLength" / Const(7, Int8ul),
    "bDescriptorType" / Const(DescriptorType.DEVICE_CAPABILITY, Int8ul),
    "bDevCapabilityType" / Const(DeviceCapability.USB20_EXTENSION, Int8ul),
    "bmAttributes" / Int32ul,
)

SuperSpeedUsbCapability = Struct(
    # offset 0 bLength, 1 type, 2 capability type, 3 bmAttributes (bit 1 LTM), 4 wSpeedsSupported,
    # 6 bFunctionalitySupport, 7 bU1DevExitLat, 8 wU2DevExitLat (USB 3.2 table 9-16)
    "bLength" / Const(10, Int8ul),
    "bDescriptorType" / Const(DescriptorType.DEVICE_CAPABILITY, Int8ul),
    "bDevCapabilityType" / Const(DeviceCapability.SUPERSPEED_USB, Int8ul),
    "bmAttributes" / Int8ul,
    "wSpeedsSupported" / Int16ul,
    "bFunctionalitySupport" / Int8ul,
    "bU1DevExitLat" / Int8ul,
    "wU2DevExitLat" / Int16ul,
)

StringDescriptor = Struct(
    # offset 0 bLength, 1 type, 2.. UTF-16LE code units, or LANGIDs for index 0 (USB 2.0 9.6.7)
    "bLength" / Int8ul,
    "bDescriptorType" / Const(DescriptorType.STRING, Int8ul),
    "data" / Bytes(this.bLength - 2),
)

LangIdList = GreedyRange(Int16ul)

_BY_TYPE: Final[dict[int, Struct]] = {
    DescriptorType.DEVICE: DeviceDescriptor,
    DescriptorType.CONFIGURATION: ConfigurationDescriptor,
    DescriptorType.STRING: StringDescriptor,
    DescriptorType.INTERFACE: InterfaceDescriptor,
    DescriptorType.ENDPOINT: EndpointDescriptor,
    DescriptorType.DEVICE_QUALIFIER: DeviceQualifierDescriptor,
    DescriptorType.OTHER_SPEED_CONFIGURATION: OtherSpeedConfigurationDescriptor,
    DescriptorType.BOS: BosDescriptor,
    DescriptorType.SS_ENDPOINT_COMPANION: SsEndpointCompanionDescriptor,
}
_CAPABILITIES: Final[dict[int, Struct]] = {
    DeviceCapability.USB20_EXTENSION: Usb20ExtensionCapability,
    DeviceCapability.SUPERSPEED_USB: SuperSpeedUsbCapability,
}

# --- identity -----------------------------------------------------------------------------------

_SERIAL_SEPARATORS = re.compile(r"[-:\s]")
_SERIAL_CHARS = re.compile(r"[0-9A-F]{12,126}")


def normalize_serial(serial: str) -> str:
    """Return `serial` in the form BOT 1.0 section 4.1.1 requires, or raise ValueError.

    The spec asks for at least 12 characters from 0-9 and A-F (the last 12 unique per
    vendor/product pair). We accept lower case and the usual separators of UUIDs and MAC addresses
    ('-', ':', blanks) and drop them, so a unit can pass its UUID as it stores it; anything else is
    refused rather than silently rewritten, because the host keys its device identity on it.
    """
    cleaned = _SERIAL_SEPARATORS.sub("", serial).upper()
    if not _SERIAL_CHARS.fullmatch(cleaned):
        raise ValueError(
            f"USB serial {serial!r}: need 12..126 hex digits (BOT 1.0 4.1.1), got {len(cleaned)} "
            "characters after dropping separators"
        )
    return cleaned


def _check_string(name: str, value: str) -> None:
    units = len(value.encode("utf-16-le")) // 2
    if not 0 < units <= _MAX_STRING_UNITS:
        raise ValueError(f"{name} must be 1..{_MAX_STRING_UNITS} UTF-16 code units, got {units}")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who the device says it is. `serial` comes from the unit (stable across restarts) and is
    normalised by `normalize_serial` (upper-case hex, separators dropped)."""

    serial: str
    vendor_id: int = 0x1209  # pid.codes
    product_id: int = 0x0001  # pid.codes test PID; configurable for a real allocation
    bcd_device: int = 0x0100
    manufacturer: str = "usbmirror"
    product: str = "usbmirror disk"
    max_power_ma: int = 100
    self_powered: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "serial", normalize_serial(self.serial))
        for name in ("vendor_id", "product_id", "bcd_device"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"{name} must fit 16 bits, got {value:#x}")
        _check_string("manufacturer", self.manufacturer)
        _check_string("product", self.product)
        if not 0 <= self.max_power_ma <= 500:
            raise ValueError(f"max_power_ma must be 0..500, got {self.max_power_ma}")


class DescriptorUnavailable(ValueError):
    """The device has no such descriptor at this speed: the control request must be STALLed."""


# --- builders -----------------------------------------------------------------------------------


def _bcd_usb(speed: Speed) -> int:
    return 0x0320 if speed is Speed.SUPER else 0x0200


def device_descriptor(ident: DeviceIdentity, speed: Speed) -> bytes:
    """The 18-byte device descriptor (class is given per interface, so device class 0)."""
    speed = Speed(speed)
    return bytes(
        DeviceDescriptor.build(
            {
                "bcdUSB": _bcd_usb(speed),
                "bDeviceClass": 0,
                "bDeviceSubClass": 0,
                "bDeviceProtocol": 0,
                "bMaxPacketSize0": _EP0_MAX_PACKET[speed],
                "idVendor": ident.vendor_id,
                "idProduct": ident.product_id,
                "bcdDevice": ident.bcd_device,
                "iManufacturer": StringIndex.MANUFACTURER,
                "iProduct": StringIndex.PRODUCT,
                "iSerialNumber": StringIndex.SERIAL,
                "bNumConfigurations": 1,
            }
        )
    )


def _check_burst(max_burst: int) -> None:
    if not 0 <= max_burst <= 15:
        raise ValueError(f"max_burst must be 0..15 (USB 3.2 table 9-27), got {max_burst}")


def _endpoint(address: int, speed: Speed) -> bytes:
    return bytes(
        EndpointDescriptor.build(
            {
                "bEndpointAddress": address,
                "bmAttributes": _ATTR_BULK,
                "wMaxPacketSize": MAX_PACKET[speed],
                "bInterval": 0,  # bulk: ignored at full/super speed, "never NAKs" hint at high speed
            }
        )
    )


def _companion(max_burst: int) -> bytes:
    return bytes(
        SsEndpointCompanionDescriptor.build(
            {"bMaxBurst": max_burst, "bmAttributes": 0, "wBytesPerInterval": 0}  # no streams
        )
    )


def interface_endpoints(speed: Speed, *, max_burst: int = DEFAULT_MAX_BURST) -> tuple[bytes, ...]:
    """Raw pieces for assemblers that lay descriptors out themselves (FunctionFS v2 blobs).

    Returns `(interface, ep_in, ep_out)` at full and high speed and
    `(interface, ep_in, ep_out, companion_in, companion_out)` at SuperSpeed. On the wire each
    companion directly follows its endpoint (USB 3.2 9.6.7): `interface_block` gives that order.
    """
    speed = Speed(speed)
    _check_burst(max_burst)
    interface = bytes(
        InterfaceDescriptor.build(
            {
                "bInterfaceNumber": 0,
                "bAlternateSetting": 0,
                "bNumEndpoints": 2,
                "bInterfaceClass": INTERFACE_CLASS_MASS_STORAGE,
                "bInterfaceSubClass": INTERFACE_SUBCLASS_SCSI,
                "bInterfaceProtocol": INTERFACE_PROTOCOL_BULK_ONLY,
                "iInterface": 0,
            }
        )
    )
    pieces: tuple[bytes, ...] = (interface, _endpoint(EP_IN, speed), _endpoint(EP_OUT, speed))
    if speed is Speed.SUPER:
        pieces += (_companion(max_burst), _companion(max_burst))
    return pieces


def interface_block(speed: Speed, *, max_burst: int = DEFAULT_MAX_BURST) -> tuple[bytes, ...]:
    """The interface and its endpoints in wire order, as a configuration set carries them:
    `(interface, ep_in, ep_out)`, or `(interface, ep_in, companion_in, ep_out, companion_out)` at
    SuperSpeed (USB 3.2 9.6.7: each companion directly follows its endpoint)."""
    pieces = interface_endpoints(speed, max_burst=max_burst)
    if Speed(speed) is Speed.SUPER:
        interface, ep_in, ep_out, comp_in, comp_out = pieces
        return (interface, ep_in, comp_in, ep_out, comp_out)
    return pieces


def _max_power_units(ident: DeviceIdentity, speed: Speed) -> int:
    # USB 2.0 9.6.3: 2 mA units; USB 3.2 9.6.3: 8 mA units when operating at SuperSpeed.
    unit = 8 if speed is Speed.SUPER else 2
    return -(-ident.max_power_ma // unit)


def configuration_descriptor(
    ident: DeviceIdentity,
    speed: Speed,
    *,
    other_speed: bool = False,
    max_burst: int = DEFAULT_MAX_BURST,
) -> bytes:
    """The full configuration set (configuration, interface, endpoints[, companions]).

    With `other_speed=True`: the Other Speed Configuration (USB 2.0 9.6.4), i.e. the configuration
    the device would have at the other of full/high speed. Raises `DescriptorUnavailable` at
    SuperSpeed, where that request is an error (USB 3.2 9.6.2).
    """
    speed = Speed(speed)
    if other_speed:
        if speed is Speed.SUPER:
            raise DescriptorUnavailable("no other-speed configuration at SuperSpeed (USB 3.2 9.6.2)")
        body_speed = Speed.HIGH if speed is Speed.FULL else Speed.FULL
        header = OtherSpeedConfigurationDescriptor
    else:
        body_speed = speed
        header = ConfigurationDescriptor
    body = b"".join(interface_block(body_speed, max_burst=max_burst))
    attributes = _CONFIG_ATTR_RESERVED | (_CONFIG_ATTR_SELF_POWERED if ident.self_powered else 0)
    head = header.build(
        {
            "wTotalLength": 9 + len(body),
            "bNumInterfaces": 1,
            "bConfigurationValue": 1,
            "iConfiguration": 0,
            "bmAttributes": attributes,
            "bMaxPower": _max_power_units(ident, body_speed),
        }
    )
    return bytes(head) + body


def device_qualifier(ident: DeviceIdentity, speed: Speed) -> bytes:
    """The device qualifier (USB 2.0 9.6.2): how the device would look at the other USB 2.0 speed.

    Raises `DescriptorUnavailable` at SuperSpeed (USB 3.2 9.6.2: request error).
    """
    del ident  # the qualifier carries nothing identity-specific; kept for a uniform signature
    if Speed(speed) is Speed.SUPER:
        raise DescriptorUnavailable("no device qualifier at SuperSpeed (USB 3.2 9.6.2)")
    return bytes(
        DeviceQualifierDescriptor.build(
            {
                "bcdUSB": 0x0200,
                "bDeviceClass": 0,
                "bDeviceSubClass": 0,
                "bDeviceProtocol": 0,
                "bMaxPacketSize0": 64,
                "bNumConfigurations": 1,
            }
        )
    )


def bos_descriptor() -> bytes:
    """Binary Device Object Store for SuperSpeed operation (USB 3.2 9.6.2).

    USB 2.0 extension with LPM (required of SuperSpeed devices, 9.6.2.1) and the SuperSpeed USB
    capability: full, high and 5 Gb/s supported, full functionality from full speed, the Linux
    composite driver's default U1/U2 exit latencies, no LTM.
    """
    usb2 = Usb20ExtensionCapability.build({"bmAttributes": 0x00000002})
    superspeed = SuperSpeedUsbCapability.build(
        {
            "bmAttributes": 0,
            "wSpeedsSupported": 0x000E,  # bit 1 full, bit 2 high, bit 3 Gen 1 (5 Gb/s)
            "bFunctionalitySupport": 1,  # lowest speed with all functions: full speed
            "bU1DevExitLat": _U1_EXIT_LATENCY_US,
            "wU2DevExitLat": _U2_EXIT_LATENCY_US,
        }
    )
    caps = bytes(usb2) + bytes(superspeed)
    head = BosDescriptor.build({"wTotalLength": 5 + len(caps), "bNumDeviceCaps": 2})
    return bytes(head) + caps


def string_descriptor(ident: DeviceIdentity, index: int, langid: int = LANGID_EN_US) -> bytes | None:
    """String descriptor `index` in `langid`; index 0 is the list of languages (only en-US).

    Returns None when the device has no such string (the request must be STALLed). Language 0 is
    accepted as en-US too: some hosts ask for it.
    """
    if index == StringIndex.LANGUAGES:
        data = bytes(LangIdList.build([LANGID_EN_US]))
    else:
        if langid not in (LANGID_EN_US, 0):
            return None
        texts: dict[int, str] = {
            StringIndex.MANUFACTURER: ident.manufacturer,
            StringIndex.PRODUCT: ident.product,
            StringIndex.SERIAL: ident.serial,
        }
        text = texts.get(index)
        if text is None:
            return None
        data = text.encode("utf-16-le")
    return bytes(StringDescriptor.build({"bLength": 2 + len(data), "data": data}))


# --- parsers (tests, tools, the USB/IP client side) ---------------------------------------------


def split_descriptors(blob: bytes) -> list[bytes]:
    """Cut a concatenation of descriptors at their bLength; ValueError if a length is impossible."""
    out: list[bytes] = []
    offset = 0
    while offset < len(blob):
        length = blob[offset]
        if length < 2 or offset + length > len(blob):
            raise ValueError(f"bad descriptor length {length} at offset {offset}")
        out.append(blob[offset : offset + length])
        offset += length
    return out


def parse_descriptor(raw: bytes) -> Container[Any]:
    """Parse one descriptor by its bDescriptorType (device capabilities by capability type)."""
    if len(raw) < 2:
        raise ValueError("descriptor shorter than 2 bytes")
    kind = raw[1]
    if kind == DescriptorType.DEVICE_CAPABILITY:
        if len(raw) < 3 or raw[2] not in _CAPABILITIES:
            raise ValueError("unknown device capability")
        fmt = _CAPABILITIES[raw[2]]
    elif kind in _BY_TYPE:
        fmt = _BY_TYPE[kind]
    else:
        raise ValueError(f"unknown descriptor type {kind:#x}")
    if kind != DescriptorType.STRING and len(raw) != fmt.sizeof():
        raise ValueError(f"descriptor type {kind:#x}: length {len(raw)} != {fmt.sizeof()}")
    parsed: Container[Any] = fmt.parse(raw)
    return parsed


def parse_descriptors(blob: bytes) -> list[Container[Any]]:
    """Parse a configuration set or BOS: every descriptor in order."""
    return [parse_descriptor(raw) for raw in split_descriptors(blob)]


def parse_string_descriptor(raw: bytes) -> str:
    """Text of a string descriptor with index > 0."""
    parsed = StringDescriptor.parse(raw)
    if parsed.bLength != len(raw):
        raise ValueError("string descriptor bLength does not match its size")
    text: str = parsed.data.decode("utf-16-le")
    return text


def parse_langids(raw: bytes) -> list[int]:
    """LANGIDs of string descriptor 0."""
    parsed = StringDescriptor.parse(raw)
    return list(LangIdList.parse(parsed.data))
