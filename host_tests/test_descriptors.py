"""USB descriptors (gadget/descriptors.py) checked field by field against USB 2.0 ch. 9, USB 3.2
ch. 9 and the mass-storage class specs, plus build/parse round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gadget.descriptors import (
    EP_IN,
    EP_OUT,
    LANGID_EN_US,
    MAX_PACKET,
    USB_SPEED_FULL,
    USB_SPEED_HIGH,
    USB_SPEED_SUPER,
    DescriptorUnavailable,
    DeviceDescriptor,
    DeviceIdentity,
    EndpointDescriptor,
    Speed,
    SsEndpointCompanionDescriptor,
    StringIndex,
    bos_descriptor,
    configuration_descriptor,
    device_descriptor,
    device_qualifier,
    interface_block,
    interface_endpoints,
    normalize_serial,
    parse_descriptor,
    parse_descriptors,
    parse_langids,
    parse_string_descriptor,
    speed_from_usbip,
    split_descriptors,
    string_descriptor,
    usbip_speed,
)

SERIAL = "0123456789AB"
IDENT = DeviceIdentity(serial=SERIAL)


# --- device descriptor (USB 2.0 table 9-8) ------------------------------------------------------


@pytest.mark.parametrize(
    ("speed", "bcd_usb", "ep0"),
    [(Speed.FULL, 0x0200, 64), (Speed.HIGH, 0x0200, 64), (Speed.SUPER, 0x0320, 9)],
)
def test_device_descriptor_fields(speed: Speed, bcd_usb: int, ep0: int) -> None:
    raw = device_descriptor(IDENT, speed)
    assert len(raw) == 18 and raw[0] == 18 and raw[1] == 0x01
    (bcd, cls, sub, proto, mps0, vid, pid, bcd_dev, i_man, i_prod, i_ser, n_conf) = struct.unpack(
        "<HBBBBHHHBBBB", raw[2:]
    )
    assert bcd == bcd_usb
    assert (cls, sub, proto) == (0, 0, 0)  # class defined at interface level (BOT 4.1)
    assert mps0 == ep0  # SuperSpeed: exponent, 2**9 = 512 (USB 3.2 9.6.1)
    assert (vid, pid, bcd_dev) == (0x1209, 0x0001, 0x0100)
    assert (i_man, i_prod, i_ser) == (1, 2, 3)
    assert n_conf == 1
    assert i_ser != 0  # BOT 4.1.1: a mass-storage device shall have a serial number


@given(
    vendor=st.integers(0, 0xFFFF),
    product=st.integers(0, 0xFFFF),
    bcd=st.integers(0, 0xFFFF),
    speed=st.sampled_from(Speed),
)
def test_device_descriptor_round_trip(vendor: int, product: int, bcd: int, speed: Speed) -> None:
    ident = DeviceIdentity(serial=SERIAL, vendor_id=vendor, product_id=product, bcd_device=bcd)
    parsed = parse_descriptor(device_descriptor(ident, speed))
    assert (parsed.idVendor, parsed.idProduct, parsed.bcdDevice) == (vendor, product, bcd)
    assert DeviceDescriptor.build(parsed) == device_descriptor(ident, speed)


# --- configuration set (USB 2.0 9.6.3-9.6.6, USB 3.2 9.6.7) -------------------------------------


@pytest.mark.parametrize("speed", list(Speed))
def test_configuration_set(speed: Speed) -> None:
    blob = configuration_descriptor(IDENT, speed)
    parts = parse_descriptors(blob)
    config = parts[0]
    assert config.bDescriptorType == 0x02 and config.wTotalLength == len(blob)
    assert config.bNumInterfaces == 1 and config.bConfigurationValue == 1
    assert config.bmAttributes & 0x80  # D7 reserved, must be one
    # bMaxPower: 2 mA units at USB 2.0 speeds, 8 mA at SuperSpeed
    assert config.bMaxPower == (13 if speed is Speed.SUPER else 50)
    interface = parts[1]
    assert interface.bDescriptorType == 0x04 and interface.bNumEndpoints == 2
    assert (interface.bInterfaceClass, interface.bInterfaceSubClass, interface.bInterfaceProtocol) == (
        0x08, 0x06, 0x50)  # mass storage, SCSI transparent, Bulk-Only
    endpoints = [p for p in parts if p.bDescriptorType == 0x05]
    assert [e.bEndpointAddress for e in endpoints] == [EP_IN, EP_OUT]
    for e in endpoints:
        assert e.bmAttributes == 0x02  # bulk
        assert e.wMaxPacketSize == MAX_PACKET[speed]
    types = [p.bDescriptorType for p in parts]
    if speed is Speed.SUPER:
        assert types == [0x02, 0x04, 0x05, 0x30, 0x05, 0x30]  # each companion follows its endpoint
        assert len(blob) == 9 + 9 + 2 * (7 + 6)
    else:
        assert types == [0x02, 0x04, 0x05, 0x05]
        assert len(blob) == 9 + 9 + 2 * 7


def test_max_packet_sizes_match_usb_specs() -> None:
    # USB 2.0 5.8.3: full-speed bulk 8..64, high-speed bulk exactly 512; USB 3.2: 1024.
    assert MAX_PACKET == {Speed.FULL: 64, Speed.HIGH: 512, Speed.SUPER: 1024}


@pytest.mark.parametrize("burst", [0, 3, 15])
def test_superspeed_companion_max_burst(burst: int) -> None:
    parts = parse_descriptors(configuration_descriptor(IDENT, Speed.SUPER, max_burst=burst))
    companions = [p for p in parts if p.bDescriptorType == 0x30]
    assert [c.bMaxBurst for c in companions] == [burst, burst]
    assert all(c.bmAttributes == 0 and c.wBytesPerInterval == 0 for c in companions)


@pytest.mark.parametrize("burst", [-1, 16])
def test_max_burst_out_of_range(burst: int) -> None:
    with pytest.raises(ValueError):
        configuration_descriptor(IDENT, Speed.SUPER, max_burst=burst)


@pytest.mark.parametrize(("speed", "other_packet"), [(Speed.FULL, 512), (Speed.HIGH, 64)])
def test_other_speed_configuration(speed: Speed, other_packet: int) -> None:
    blob = configuration_descriptor(IDENT, speed, other_speed=True)
    parts = parse_descriptors(blob)
    assert parts[0].bDescriptorType == 0x07 and parts[0].wTotalLength == len(blob)
    assert [p.wMaxPacketSize for p in parts if p.bDescriptorType == 0x05] == [other_packet] * 2


def test_superspeed_has_no_qualifier_or_other_speed() -> None:
    with pytest.raises(DescriptorUnavailable):
        device_qualifier(IDENT, Speed.SUPER)
    with pytest.raises(DescriptorUnavailable):
        configuration_descriptor(IDENT, Speed.SUPER, other_speed=True)


@pytest.mark.parametrize("speed", [Speed.FULL, Speed.HIGH])
def test_device_qualifier(speed: Speed) -> None:
    raw = device_qualifier(IDENT, speed)
    assert len(raw) == 10 and raw[0] == 10 and raw[1] == 0x06
    q = parse_descriptor(raw)
    assert q.bcdUSB == 0x0200 and q.bMaxPacketSize0 == 64 and q.bNumConfigurations == 1


@pytest.mark.parametrize("speed", list(Speed))
def test_interface_block_is_the_configuration_body(speed: Speed) -> None:
    block = interface_block(speed, max_burst=2)
    assert b"".join(block) == configuration_descriptor(IDENT, speed, max_burst=2)[9:]
    assert sorted(block) == sorted(interface_endpoints(speed, max_burst=2))


def test_interface_endpoints_pieces() -> None:
    for speed in Speed:
        pieces = interface_endpoints(speed)
        assert len(pieces) == (5 if speed is Speed.SUPER else 3)
        assert [p[1] for p in pieces[:3]] == [0x04, 0x05, 0x05]
        assert EndpointDescriptor.parse(pieces[1]).bEndpointAddress == EP_IN
        assert EndpointDescriptor.parse(pieces[2]).bEndpointAddress == EP_OUT
        blob = configuration_descriptor(IDENT, speed)
        assert all(p in blob for p in pieces)
    ss = interface_endpoints(Speed.SUPER, max_burst=2)
    assert SsEndpointCompanionDescriptor.parse(ss[3]).bMaxBurst == 2


# --- BOS (USB 3.2 9.6.2) ------------------------------------------------------------------------


def test_bos_descriptor() -> None:
    blob = bos_descriptor()
    parts = parse_descriptors(blob)
    head = parts[0]
    assert head.bDescriptorType == 0x0F and head.wTotalLength == len(blob) and head.bNumDeviceCaps == 2
    usb2, ss = parts[1], parts[2]
    assert usb2.bDevCapabilityType == 0x02 and usb2.bmAttributes & 0x2  # LPM
    assert ss.bDevCapabilityType == 0x03
    assert ss.wSpeedsSupported == 0x0E  # full, high, 5 Gb/s
    assert ss.bFunctionalitySupport == 1
    assert len(blob) == 5 + 7 + 10


# --- strings (USB 2.0 9.6.7) --------------------------------------------------------------------


def test_string_zero_lists_us_english() -> None:
    raw = string_descriptor(IDENT, 0, 0)
    assert raw == bytes([4, 0x03, 0x09, 0x04])
    assert parse_langids(raw) == [LANGID_EN_US]


@pytest.mark.parametrize(
    ("index", "text"),
    [(StringIndex.MANUFACTURER, "usbmirror"), (StringIndex.PRODUCT, "usbmirror disk"),
     (StringIndex.SERIAL, SERIAL)],
)
def test_strings_are_utf16le(index: int, text: str) -> None:
    raw = string_descriptor(IDENT, index, LANGID_EN_US)
    assert raw is not None
    assert raw[0] == len(raw) == 2 + 2 * len(text) and raw[1] == 0x03
    assert raw[2:] == text.encode("utf-16-le")
    assert parse_string_descriptor(raw) == text


def test_unknown_string_or_language_is_none() -> None:
    assert string_descriptor(IDENT, 4, LANGID_EN_US) is None
    assert string_descriptor(IDENT, 1, 0x0407) is None
    assert string_descriptor(IDENT, 1, 0) is not None  # some hosts ask with language 0


@given(st.text(min_size=1, max_size=60))
def test_any_product_text_round_trips(text: str) -> None:
    try:
        ident = DeviceIdentity(serial=SERIAL, product=text)
    except ValueError:
        assert len(text.encode("utf-16-le")) // 2 > 126
        return
    raw = string_descriptor(ident, StringIndex.PRODUCT)
    assert raw is not None and raw[0] == len(raw) <= 255
    assert parse_string_descriptor(raw) == text


def test_overlong_product_rejected() -> None:
    with pytest.raises(ValueError):
        DeviceIdentity(serial=SERIAL, product="x" * 127)
    DeviceIdentity(serial=SERIAL, product="x" * 126)


# --- serial number (BOT 1.0 4.1.1) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_serial", "expected"),
    [
        ("0123456789AB", "0123456789AB"),
        ("0123456789ab", "0123456789AB"),
        ("1b4e28ba-2fa1-11d2-883f-0016d3cca427", "1B4E28BA2FA111D2883F0016D3CCA427"),
        ("b8:27:eb:12:34:56", "B827EB123456"),
    ],
)
def test_serial_normalised(given_serial: str, expected: str) -> None:
    assert normalize_serial(given_serial) == expected
    assert DeviceIdentity(serial=given_serial).serial == expected


@pytest.mark.parametrize("bad", ["", "0123456789A", "0123456789AG", "unit-one-serial", "Z" * 20, "0" * 127])
def test_serial_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        DeviceIdentity(serial=bad)


@given(st.text(alphabet="0123456789ABCDEFabcdef", min_size=12, max_size=126))
def test_hex_serials_accepted(serial: str) -> None:
    ident = DeviceIdentity(serial=serial)
    assert ident.serial == serial.upper()
    raw = string_descriptor(ident, StringIndex.SERIAL)
    assert raw is not None and parse_string_descriptor(raw) == serial.upper()


def test_identity_ids_must_fit_16_bits() -> None:
    with pytest.raises(ValueError):
        DeviceIdentity(serial=SERIAL, vendor_id=0x10000)
    with pytest.raises(ValueError):
        DeviceIdentity(serial=SERIAL, max_power_ma=501)


def test_self_powered_attribute() -> None:
    blob = configuration_descriptor(DeviceIdentity(serial=SERIAL, self_powered=True), Speed.HIGH)
    assert blob[7] == 0xC0


# --- USB/IP speed codes (linux/usb/ch9.h) -------------------------------------------------------


def test_usbip_speed_codes() -> None:
    assert (USB_SPEED_FULL, USB_SPEED_HIGH, USB_SPEED_SUPER) == (2, 3, 5)
    for speed in Speed:
        assert speed_from_usbip(usbip_speed(speed)) is speed
    for code in (0, 1, 4, 6):
        with pytest.raises(ValueError):
            speed_from_usbip(code)


# --- parsers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blob", [b"\x00\x02", b"\x09\x02\x00", b"\x01", b"\x07\x05\x81\x02"])
def test_split_rejects_impossible_lengths(blob: bytes) -> None:
    with pytest.raises(ValueError):
        split_descriptors(blob)


def test_parse_rejects_unknown_or_wrong_size() -> None:
    with pytest.raises(ValueError):
        parse_descriptor(b"\x03\x99\x00")
    with pytest.raises(ValueError):
        parse_descriptor(b"\x08\x05\x81\x02\x00\x02\x00\x00")  # endpoint descriptor is 7 bytes


@given(
    address=st.integers(0, 255), attributes=st.integers(0, 255), packet=st.integers(0, 0xFFFF),
    interval=st.integers(0, 255),
)
def test_endpoint_round_trip(address: int, attributes: int, packet: int, interval: int) -> None:
    raw = bytes(EndpointDescriptor.build(
        {"bEndpointAddress": address, "bmAttributes": attributes, "wMaxPacketSize": packet,
         "bInterval": interval}))
    assert raw == bytes([7, 5, address, attributes]) + packet.to_bytes(2, "little") + bytes([interval])
    parsed = parse_descriptor(raw)
    assert (parsed.bEndpointAddress, parsed.bmAttributes, parsed.wMaxPacketSize, parsed.bInterval) == (
        address, attributes, packet, interval)
