"""The USB/IP wire format: what vhci-hcd and `usbip` send parses, what we send is what they expect,
and hostile bytes end in UsbipProtocolError (never another exception, never a huge allocation)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gadget.usbip_protocol import (
    ECONNRESET,
    NEED_DATA,
    USBIP_VERSION,
    DevlistReply,
    DevlistRequest,
    Event,
    ExportedDevice,
    ImportReply,
    ImportRequest,
    InterfaceTriple,
    NeedData,
    OpStatus,
    SubmitCommand,
    SubmitReturn,
    UnlinkCommand,
    UnlinkReturn,
    UrbDirection,
    UsbDeviceInfo,
    UsbipConnection,
    UsbipProtocolError,
    UsbipRole,
    encode,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
s32 = st.integers(-(2**31), 2**31 - 1)
ascii_name = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=31)

INFO = UsbDeviceInfo(
    path="/sys/devices/usbmirror/usb1/1-1", busid="1-1", busnum=1, devnum=2, speed=3,
    id_vendor=0x1209, id_product=0x0001, bcd_device=0x0100, device_class=0, device_subclass=0,
    device_protocol=0, configuration_value=0, num_configurations=1, num_interfaces=1,
)  # fmt: skip


@st.composite
def device_infos(draw: st.DrawFn) -> UsbDeviceInfo:
    return UsbDeviceInfo(
        path=draw(st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=255)),
        busid=draw(ascii_name), busnum=draw(u32), devnum=draw(u32), speed=draw(u32),
        id_vendor=draw(u16), id_product=draw(u16), bcd_device=draw(u16), device_class=draw(u8),
        device_subclass=draw(u8), device_protocol=draw(u8), configuration_value=draw(u8),
        num_configurations=draw(u8), num_interfaces=draw(st.integers(0, 4)),
    )  # fmt: skip


@st.composite
def exported(draw: st.DrawFn) -> ExportedDevice:
    info = draw(device_infos())
    triples = tuple(InterfaceTriple(draw(u8), draw(u8), draw(u8)) for _ in range(info.num_interfaces))
    return ExportedDevice(info, triples)


@st.composite
def submits(draw: st.DrawFn) -> SubmitCommand:
    direction = draw(st.sampled_from(UrbDirection))
    data = draw(st.binary(max_size=600)) if direction == UrbDirection.OUT else b""
    length = len(data) if direction == UrbDirection.OUT else draw(st.integers(0, 1 << 20))
    return SubmitCommand(
        seqnum=draw(u32), devid=draw(u32), direction=direction, ep=draw(st.integers(0, 15)),
        transfer_flags=draw(u32), transfer_buffer_length=length, setup=draw(st.binary(min_size=8, max_size=8)),
        data=data, interval=draw(s32), start_frame=draw(s32), number_of_packets=draw(st.sampled_from([0, 0xFFFFFFFF])),
    )  # fmt: skip


def feed(conn: UsbipConnection, data: bytes, *, bytewise: bool) -> list[Event]:
    events: list[Event] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        conn.receive_data(chunk)
        while not isinstance(ev := conn.next_event(), NeedData):
            events.append(ev)
    return events


def imported_server() -> UsbipConnection:
    conn = UsbipConnection(UsbipRole.SERVER)
    assert feed(conn, encode(ImportRequest("1-1")), bytewise=False) == [ImportRequest("1-1")]
    conn.send(ImportReply(0, INFO))
    assert conn.imported
    return conn


def imported_client() -> UsbipConnection:
    conn = UsbipConnection(UsbipRole.CLIENT)
    conn.send(ImportRequest("1-1"))
    assert feed(conn, encode(ImportReply(0, INFO)), bytewise=False) == [ImportReply(0, INFO)]
    assert conn.imported
    return conn


# -- layouts a kernel peer depends on ------------------------------------------------------------
def test_header_layouts_match_the_kernel_documentation() -> None:
    assert encode(DevlistRequest()) == bytes.fromhex("0111 8005 00000000")
    assert encode(ImportRequest("3-2")) == bytes.fromhex("0111 8003 00000000") + b"3-2".ljust(32, b"\0")
    reply = encode(ImportReply(0, INFO))
    assert len(reply) == 8 + 312 and reply[:8] == bytes.fromhex("0111 0003 00000000")
    assert reply[8 + 0x100 : 8 + 0x104] == b"1-1\0"
    assert struct.unpack(">IIIHHH", reply[8 + 0x120 : 8 + 0x132]) == (1, 2, 3, 0x1209, 0x0001, 0x0100)
    assert encode(ImportReply(OpStatus.DEV_BUSY)) == bytes.fromhex("0111 0003 00000002")
    devlist = encode(DevlistReply((ExportedDevice(INFO, (InterfaceTriple(8, 6, 0x50),)),)))
    assert devlist[8:12] == b"\0\0\0\1" and devlist[12 + 312 :] == bytes([8, 6, 0x50, 0])


def test_ret_submit_matches_the_documented_capture() -> None:
    # RetIntrIn of usbip_protocol.rst, with the ISO fields of a non-ISO URB as vhci expects (0)
    raw = encode(SubmitReturn(seqnum=0xD05, status=0, actual_length=0x40, data=bytes(0x40)))
    assert raw[:0x28] == struct.pack(">IIIIIiiiii", 3, 0xD05, 0, 0, 0, 0, 0x40, 0, 0, 0)
    assert raw[0x28:0x30] == bytes(8) and len(raw) == 0x30 + 0x40
    assert encode(UnlinkReturn(7, -ECONNRESET)) == struct.pack(">IIIIIi24x", 4, 7, 0, 0, 0, -104)


def test_kernel_cmd_submit_from_the_documentation_parses() -> None:
    words = "00000001 00000d05 0001000f 00000001 00000001 00000200 00000040 ffffffff 00000000 00000004 0 0"
    raw = b"".join(int(w, 16).to_bytes(4, "big") for w in words.split())
    (ev,) = feed(imported_server(), raw, bytewise=False)
    # that capture carries start_frame -1 and number_of_packets 0 on an interrupt URB: accepted
    assert ev == SubmitCommand(0xD05, 0x1000F, UrbDirection.IN, 1, 0x200, 0x40, bytes(8), b"", 4, -1, 0)


# -- round trips -----------------------------------------------------------------------------------
@given(st.lists(submits(), max_size=5), st.booleans())
@settings(max_examples=60, deadline=None)
def test_commands_round_trip_whole_and_bytewise(cmds: list[SubmitCommand], bytewise: bool) -> None:
    unlink = UnlinkCommand(seqnum=1, devid=2, unlink_seqnum=3, direction=UrbDirection.IN, ep=1)
    wire = b"".join(encode(c) for c in cmds) + encode(unlink)
    assert feed(imported_server(), wire, bytewise=bytewise) == [*cmds, unlink]


@given(st.lists(exported(), max_size=3), u32, st.booleans())
@settings(max_examples=40, deadline=None)
def test_devlist_reply_round_trips(devices: list[ExportedDevice], status: int, bytewise: bool) -> None:
    reply = DevlistReply(tuple(devices), status)
    conn = UsbipConnection(UsbipRole.CLIENT)
    assert feed(conn, encode(reply), bytewise=bytewise) == [reply]
    assert not conn.imported


@given(device_infos(), st.booleans())
@settings(max_examples=40, deadline=None)
def test_import_reply_round_trips_and_enters_urb_phase(info: UsbDeviceInfo, bytewise: bool) -> None:
    conn = UsbipConnection(UsbipRole.CLIENT)
    assert feed(conn, encode(ImportReply(0, info)), bytewise=bytewise) == [ImportReply(0, info)]
    assert conn.imported


@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300), s32), min_size=1, max_size=6), st.booleans())
@settings(max_examples=60, deadline=None)
def test_returns_round_trip_on_the_client(urbs: list[tuple[bool, bytes, int]], bytewise: bool) -> None:
    client = imported_client()
    returns = []
    for seq, (is_in, payload, status) in enumerate(urbs):
        direction = UrbDirection.IN if is_in else UrbDirection.OUT
        client.send(SubmitCommand(seq, 1, direction, 1, 0, len(payload), data=b"" if is_in else payload))
        returns.append(SubmitReturn(seq, status, len(payload), payload if is_in else b""))
    assert feed(client, b"".join(encode(r) for r in returns), bytewise=bytewise) == returns


def test_unlink_return_of_a_pending_urb_forgets_it() -> None:
    client = imported_client()
    client.send(SubmitCommand(5, 1, UrbDirection.IN, 1, 0, 13))
    client.send(UnlinkCommand(6, 1, 5))
    assert feed(client, encode(UnlinkReturn(6, -ECONNRESET)), bytewise=True) == [UnlinkReturn(6, -ECONNRESET)]
    with pytest.raises(UsbipProtocolError, match="not in flight"):  # no RET_SUBMIT may follow
        feed(client, encode(SubmitReturn(5, 0, 13, bytes(13))), bytewise=False)


def test_server_waits_for_its_own_import_answer_before_parsing_urbs() -> None:
    conn = UsbipConnection(UsbipRole.SERVER)
    cmd = SubmitCommand(1, 0x10002, UrbDirection.IN, 0, 0, 18, bytes.fromhex("8006000100001200"))
    assert feed(conn, encode(ImportRequest("1-1")) + encode(cmd), bytewise=False) == [ImportRequest("1-1")]
    conn.send(ImportReply(0, INFO))
    assert conn.next_event() == cmd


def test_refused_import_stays_in_operation_phase() -> None:
    conn = UsbipConnection(UsbipRole.SERVER)
    feed(conn, encode(ImportRequest("9-9")), bytewise=False)
    conn.send(ImportReply(OpStatus.NODEV))
    assert not conn.imported
    assert feed(conn, encode(DevlistRequest()), bytewise=False) == [DevlistRequest()]


# -- hostile input ----------------------------------------------------------------------------------
def urb_header(command: int = 1, *, direction: int = 0, ep: int = 1, length: int = 0, npkts: int = 0) -> bytes:
    return struct.pack(">IIIIIIIiIi8s", command, 1, 0x10002, direction, ep, 0, length, 0, npkts, 0, bytes(8))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (urb_header(length=0x7FFFFFFF), "transfer length"),
        (urb_header(length=0xFFFFFFFF), "transfer length"),
        (urb_header(direction=1, length=(4 << 20) + 1), "transfer length"),
        (urb_header(command=3), "unknown USB/IP command"),
        (urb_header(command=0xDEADBEEF), "unknown USB/IP command"),
        (urb_header(direction=2), "direction"),
        (urb_header(ep=16), "endpoint"),
        (urb_header(npkts=3), "isochronous"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40), "unknown USB/IP command"),
    ],
)
def test_bad_urb_headers_raise_protocol_error(raw: bytes, message: str) -> None:
    conn = imported_server()
    with pytest.raises(UsbipProtocolError, match=message):
        feed(conn, raw, bytewise=False)
    assert conn.closed and conn.buffered == 0
    with pytest.raises(UsbipProtocolError):  # and it stays closed
        conn.next_event()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack(">HHI", 0x0106, 0x8005, 0), "version"),
        (struct.pack(">HHI", USBIP_VERSION, 0x8004, 0), "unknown operation"),
        (struct.pack(">HHI", USBIP_VERSION, 0x0005, 0), "unknown operation"),
        (struct.pack(">HHI", USBIP_VERSION, 0x8003, 0) + b"x" * 32, "NUL"),
        (struct.pack(">HHI", USBIP_VERSION, 0x8003, 0) + b"\xff\0".ljust(32, b"\0"), "ASCII"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "version"),  # a TLS ClientHello
    ],
)
def test_bad_operation_headers_raise_protocol_error(raw: bytes, message: str) -> None:
    with pytest.raises(UsbipProtocolError, match=message):
        feed(UsbipConnection(UsbipRole.SERVER), raw, bytewise=True)


def test_hostile_counts_in_replies_are_bounded() -> None:
    huge = struct.pack(">HHII", USBIP_VERSION, 0x0005, 0, 0xFFFFFFFF)
    with pytest.raises(UsbipProtocolError, match="devices"):
        feed(UsbipConnection(UsbipRole.CLIENT), huge, bytewise=False)
    many_ifaces = encode(ImportReply(0, INFO))[:-1] + b"\xff"
    with pytest.raises(UsbipProtocolError, match="interfaces"):
        feed(UsbipConnection(UsbipRole.CLIENT), many_ifaces, bytewise=False)
    client = imported_client()
    client.send(SubmitCommand(1, 1, UrbDirection.IN, 1, 0, 64))
    with pytest.raises(UsbipProtocolError, match="transfer length"):
        feed(client, struct.pack(">IIIIIiiiii8x", 3, 1, 0, 0, 0, 0, 0x7FFFFFFF, 0, 0, 0), bytewise=False)


def test_truncated_messages_only_ask_for_more_data() -> None:
    cmd = SubmitCommand(9, 0x10002, UrbDirection.OUT, 1, 0, 31, data=b"U" * 31)
    wire = encode(cmd)
    conn = imported_server()
    for cut in range(len(wire)):
        probe = imported_server()
        probe.receive_data(wire[:cut])
        assert probe.next_event() is NEED_DATA
    assert feed(conn, wire, bytewise=True) == [cmd]


def parse_all(conn: UsbipConnection, data: bytes, *, bytewise: bool) -> tuple[list[Event], bool]:
    """The events `data` yields and whether it ended in UsbipProtocolError; after one the connection must
    be closed, hold nothing and refuse every later call."""
    events: list[Event] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while not isinstance(ev := conn.next_event(), NeedData):
                events.append(ev)
    except UsbipProtocolError:
        assert conn.closed and conn.buffered == 0
        with pytest.raises(UsbipProtocolError):
            conn.receive_data(b"x")
        with pytest.raises(UsbipProtocolError):
            conn.next_event()
        return events, True
    assert not conn.closed
    return events, False


def fresh(kind: str) -> UsbipConnection:
    return {"server": lambda: UsbipConnection(UsbipRole.SERVER), "imported-server": imported_server,
            "imported-client": imported_client}[kind]()  # fmt: skip


@given(st.lists(submits(), max_size=3), st.binary(max_size=200),
       st.sampled_from(["server", "imported-server", "imported-client"]))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_parse_or_raise_protocol_error(valid: list[SubmitCommand], junk: bytes, kind: str) -> None:
    # Valid URBs followed by junk: whatever the split into reads, the same events come out and the
    # same verdict; what parsed encodes back to what parses the same; no other exception escapes.
    data = b"".join(encode(c) for c in valid) + junk
    whole = fresh(kind)
    events, failed = parse_all(whole, data, bytewise=False)
    bytewise = fresh(kind)
    assert parse_all(bytewise, data, bytewise=True) == (events, failed)
    if kind == "imported-server":
        n = len(valid)
        assert events[:n] == valid  # every valid URB before the junk parses as sent
    if not failed:
        assert bytewise.buffered == whole.buffered
        again = fresh(kind)
        assert parse_all(again, b"".join(encode(e) for e in events), bytewise=False) == (events, False)
        assert again.buffered == 0


def test_encoder_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError):
        encode(ImportRequest("x" * 32))
    with pytest.raises(ValueError):
        encode(ImportReply(0))  # a successful reply needs the device
    with pytest.raises(ValueError):
        encode(SubmitCommand(1, 1, UrbDirection.OUT, 1, 0, 10, data=b"short"))
    with pytest.raises(ValueError):
        encode(SubmitReturn(1, 0, 10, b"short"))
