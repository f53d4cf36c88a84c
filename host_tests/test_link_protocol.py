"""The journey protocol (sans-IO): round trips of every frame, streams whole and byte by byte,
corruption and truncation detected, bounded lengths, turn-taking enforced, lz4 only where it pays."""

from __future__ import annotations

import os
import struct

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.link import protocol as jp

UUID = bytes(range(16))


def hello(features: jp.Feature = jp.Feature.LZ4, purpose: jp.Purpose = jp.Purpose.REPLICATE) -> jp.Hello:
    return jp.Hello("src-a", UUID, 1 << 30, 512, 3, 41, features, purpose)


def open_pair(features: jp.Feature = jp.Feature.LZ4) -> tuple[jp.JourneyConnection, jp.JourneyConnection]:
    src = jp.JourneyConnection(jp.Role.SOURCE)
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    rem.receive_data(src.send(hello(features)))
    h = rem.next_event()
    assert h == hello(features)
    src.receive_data(rem.send(jp.HelloReply("r1", UUID, 40, 3, features, jp.ReplyFlag.NONE)))
    r = src.next_event()
    assert isinstance(r, jp.HelloReply) and r.applied_seq == 40
    assert src.state is rem.state is jp.ConnState.OPEN
    return src, rem


def drain(conn: jp.JourneyConnection) -> list[jp.Event]:
    out: list[jp.Event] = []
    while True:
        ev = conn.next_event()
        if ev is jp.NEED_DATA:
            return out
        assert not isinstance(ev, jp._NeedData)
        out.append(ev)


@st.composite
def records(draw: st.DrawFn, prev: int = 0) -> tuple[jp.Record, ...]:
    n = draw(st.integers(0, 12))
    seq = prev
    out = []
    for _ in range(n):
        seq += draw(st.integers(1, 3))
        kind = draw(st.sampled_from(list(jp.RecordKind)))
        lba = draw(st.integers(0, 2**40))
        ts = draw(st.integers(0, 2**63))
        if kind is jp.RecordKind.WRITE:
            count = draw(st.integers(1, 4))
            fill = draw(st.sampled_from(["zero", "random", "text"]))
            size = count * 512
            payload = bytes(size) if fill == "zero" else draw(st.randoms()).randbytes(size) if fill == "random" else \
                (b"usbmirror " * size)[:size]
            out.append(jp.Record(seq, kind, lba, count, ts, payload))
        elif kind is jp.RecordKind.UNMAP:
            out.append(jp.Record(seq, kind, lba, draw(st.integers(1, 2**20)), ts))
        elif kind is jp.RecordKind.MARK:
            out.append(jp.Record(seq, kind, 0, 0, ts, draw(st.text(min_size=1, max_size=40)).encode()[:200] or b"m"))
        else:
            out.append(jp.Record(seq, kind, 0, 0, ts))
    return tuple(out)


source_events = st.one_of(
    st.builds(lambda p, r: jp.Batch(p, r), st.just(40), records(40)),
    st.builds(jp.Heartbeat, st.integers(0, 2**64 - 1)),
    st.builds(jp.ResyncBegin, st.integers(0, 2**64 - 1), st.integers(1, 1 << 20), st.integers(0, 2**64 - 1)),
    st.builds(jp.DigestRequest, st.integers(0, 2**64 - 1), st.integers(0, 1 << 14), st.integers(1, 1 << 20)),
    st.builds(jp.RegionData, st.integers(0, 2**64 - 1),
              st.sampled_from([bytes(4096), b"ab" * 2048, os.urandom(1024), b""])),
    st.builds(jp.ResyncEnd, st.integers(0, 2**64 - 1)),
)
remote_events = st.one_of(
    st.builds(jp.Ack, st.integers(0, 2**64 - 1)),
    st.builds(jp.Heartbeat, st.integers(0, 2**64 - 1)),
    st.builds(lambda f, n, ds: jp.RegionDigests(f, n, tuple(ds)), st.integers(0, 2**64 - 1),
              st.integers(1, 1 << 20), st.lists(st.binary(min_size=16, max_size=16), max_size=20)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(source_events, min_size=1, max_size=8), st.booleans(), st.booleans())
def test_source_events_round_trip_whole_and_byte_by_byte(events: list[jp.Event], lz4: bool,
                                                          bytewise: bool) -> None:
    src, rem = open_pair(jp.Feature.LZ4 if lz4 else jp.Feature.NONE)
    wire = b"".join(src.send(e) for e in events)
    got: list[jp.Event] = []
    if bytewise:
        for i in range(len(wire)):
            rem.receive_data(wire[i:i + 1])
            got += drain(rem)
    else:
        rem.receive_data(wire)
        got = drain(rem)
    assert got == events


@settings(max_examples=100, deadline=None)
@given(st.lists(remote_events, min_size=1, max_size=8))
def test_remote_events_round_trip(events: list[jp.Event]) -> None:
    src, rem = open_pair()
    wire = b"".join(rem.send(e) for e in events)
    for i in range(0, len(wire), 7):
        src.receive_data(wire[i:i + 7])
    assert drain(src) == events


def test_error_frame_round_trip_and_closes() -> None:
    src, rem = open_pair()
    src.receive_data(rem.send(jp.Error(jp.ErrorCode.TARGET_FULL, "no space left on /dev/md0")))
    assert drain(src) == [jp.Error(jp.ErrorCode.TARGET_FULL, "no space left on /dev/md0")]
    assert src.state is jp.ConnState.CLOSED
    with pytest.raises(jp.ProtocolError):
        src.receive_data(b"x")


@settings(max_examples=200, deadline=None)
@given(records(40), st.data())
def test_any_corrupted_byte_is_detected_never_misread(recs: tuple[jp.Record, ...], data: st.DataObject) -> None:
    src, rem = open_pair()
    ev = jp.Batch(40, recs)
    frame = bytearray(src.send(ev))
    pos = data.draw(st.integers(0, len(frame) - 1))
    bit = data.draw(st.integers(0, 7))
    frame[pos] ^= 1 << bit
    rem.receive_data(bytes(frame))
    try:
        got = rem.next_event()
    except jp.ProtocolError:
        assert rem.state is jp.ConnState.CLOSED
        return
    # only a longer length field can make it wait; it never yields a (wrong) event
    assert got is jp.NEED_DATA and 4 <= pos < 8


def test_truncated_stream_waits_then_oversized_length_refused_early() -> None:
    src, rem = open_pair()
    frame = src.send(jp.Heartbeat(7))
    rem.receive_data(frame[:-1])
    assert rem.next_event() is jp.NEED_DATA
    rem.receive_data(frame[-1:])
    assert rem.next_event() == jp.Heartbeat(7)
    # a header announcing more than max_payload is refused before anything is buffered
    rem.receive_data(struct.pack(">2sBBI", b"UJ", 1, jp.FrameType.BATCH, jp.DEFAULT_MAX_PAYLOAD + 1))
    with pytest.raises(jp.ProtocolError, match="exceeds"):
        rem.next_event()


def test_stream_cut_inside_a_frame_is_a_protocol_error() -> None:
    src, rem = open_pair()
    frame = src.send(jp.Batch(40, (jp.Record(41, jp.RecordKind.WRITE, 0, 1, 0, os.urandom(512)),)))
    rem.receive_data(frame[:100])
    assert rem.next_event() is jp.NEED_DATA
    with pytest.raises(jp.ProtocolError, match="closed inside a frame"):
        rem.receive_eof()
    assert rem.state is jp.ConnState.CLOSED
    _src2, rem2 = open_pair()
    rem2.receive_eof()  # a clean close between frames is no error
    assert rem2.state is jp.ConnState.CLOSED


def _frame(ftype: int, payload: bytes, version: int = 1) -> bytes:
    head = struct.pack(">2sBBI", b"UJ", version, ftype, len(payload))
    return head + payload + struct.pack(">I", google_crc32c.value(head + payload))


def test_bad_magic_version_type_and_turns() -> None:
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    rem.receive_data(b"HTTP/1.1 200")
    with pytest.raises(jp.ProtocolError, match="magic"):
        rem.next_event()
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    rem.receive_data(_frame(jp.FrameType.HEARTBEAT, bytes(8), version=2))
    with pytest.raises(jp.ProtocolError) as ei:
        rem.next_event()
    assert ei.value.code is jp.ErrorCode.VERSION
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    rem.receive_data(_frame(99, b""))
    with pytest.raises(jp.ProtocolError, match="unknown frame type"):
        rem.next_event()
    # records before HELLO
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    rem.receive_data(_frame(jp.FrameType.BATCH, struct.pack(">QIIB", 0, 0, 0, 0)))
    with pytest.raises(jp.ProtocolError, match="not allowed"):
        rem.next_event()
    assert rem.state is jp.ConnState.CLOSED
    # a remote may not send batches
    src, _ = open_pair()
    src.receive_data(_frame(jp.FrameType.BATCH, struct.pack(">QIIB", 0, 0, 0, 0)))
    with pytest.raises(jp.ProtocolError):
        src.next_event()


def test_hello_version_range_and_bounds() -> None:
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    bad = jp.Hello("s", UUID, 4096, 512, 1, 0, jp.Feature.NONE, jp.Purpose.REPLICATE, min_version=2, max_version=5)
    rem.receive_data(jp.JourneyConnection(jp.Role.SOURCE).send(bad))
    with pytest.raises(jp.ProtocolError) as ei:
        rem.next_event()
    assert ei.value.code is jp.ErrorCode.VERSION
    with pytest.raises(ValueError):
        jp.JourneyConnection(jp.Role.SOURCE).send(jp.Hello("x" * 65, UUID, 4096, 512, 1, 0))


def test_batch_semantics_checked() -> None:
    body = jp.encode_records([jp.Record(5, jp.RecordKind.WRITE, 0, 1, 0, bytes(512)),
                              jp.Record(5, jp.RecordKind.FLUSH, 0, 0, 0)])
    _src, rem = open_pair(jp.Feature.NONE)
    rem.receive_data(_frame(jp.FrameType.BATCH, struct.pack(">QIIB", 4, 2, len(body), 0) + body))
    with pytest.raises(jp.ProtocolError, match="does not follow"):
        rem.next_event()
    body = jp.encode_records([jp.Record(5, jp.RecordKind.WRITE, 0, 2, 0, bytes(512 * 2 + 1))])
    _src, rem = open_pair(jp.Feature.NONE)
    rem.receive_data(_frame(jp.FrameType.BATCH, struct.pack(">QIIB", 4, 1, len(body), 0) + body))
    with pytest.raises(jp.ProtocolError, match="bytes for 2 blocks"):
        rem.next_event()
    _src, rem = open_pair(jp.Feature.NONE)  # lz4 flag on a connection without lz4
    rem.receive_data(_frame(jp.FrameType.BATCH, struct.pack(">QIIB", 4, 0, 0, 1)))
    with pytest.raises(jp.ProtocolError, match="lz4"):
        rem.next_event()
    _src, rem = open_pair()  # lz4 garbage
    rem.receive_data(_frame(jp.FrameType.BATCH, struct.pack(">QIIB", 4, 1, 1000, 1) + b"\xff" * 40))
    with pytest.raises(jp.ProtocolError):
        rem.next_event()


def test_lz4_used_only_where_it_pays() -> None:
    src, _ = open_pair()
    text = jp.Batch(40, (jp.Record(41, jp.RecordKind.WRITE, 0, 64, 1, b"log line 12345\n" * 2184 + bytes(8)),))
    noise = jp.Batch(41, (jp.Record(42, jp.RecordKind.WRITE, 0, 64, 1, os.urandom(64 * 512)),))
    small = src.send(text)
    big = src.send(noise)
    assert len(small) < 64 * 512 // 4
    assert len(big) > 64 * 512 and big[8 + 16] == 0  # sent raw (flag byte clear)
    src2, _ = open_pair(jp.Feature.NONE)
    assert len(src2.send(text)) > 64 * 512


FRAME_TYPES = list(jp.FrameType)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([jp.Role.SOURCE, jp.Role.REMOTE]), st.lists(st.sampled_from(FRAME_TYPES), max_size=6))
def test_state_table_every_sequence_valid_or_protocol_error(role: jp.Role, seq: list[jp.FrameType]) -> None:
    """Any sequence of well-formed frames is either allowed or ends in ProtocolError and CLOSED."""
    samples: dict[jp.FrameType, jp.Event] = {
        jp.FrameType.HELLO: hello(), jp.FrameType.HELLO_REPLY: jp.HelloReply("r", UUID, 0, 0, jp.Feature.NONE),
        jp.FrameType.BATCH: jp.Batch(0, ()), jp.FrameType.ACK: jp.Ack(1), jp.FrameType.HEARTBEAT: jp.Heartbeat(1),
        jp.FrameType.ERROR: jp.Error(jp.ErrorCode.BUSY, "x"), jp.FrameType.RESYNC_BEGIN: jp.ResyncBegin(1, 8, 1),
        jp.FrameType.DIGEST_REQUEST: jp.DigestRequest(0, 1, 8),
        jp.FrameType.REGION_DIGESTS: jp.RegionDigests(0, 8, (bytes(16),)),
        jp.FrameType.REGION_DATA: jp.RegionData(0, bytes(512)), jp.FrameType.RESYNC_END: jp.ResyncEnd(2),
        jp.FrameType.GENERATIONS: jp.Generations(((5, 1, 2, 3),), jp.GenerationsFlag.PRIMARY, 0),
        jp.FrameType.REGION_READ: jp.RegionRead(8, 16),
        jp.FrameType.DIRTY_REQUEST: jp.DirtyRequest(),
        jp.FrameType.DIRTY_REGIONS: jp.DirtyRegions(jp.DirtyFlag.TRUSTED | jp.DirtyFlag.LAST, 8, 16, 8, b"\x05"),
    }
    peer_role = jp.Role.REMOTE if role is jp.Role.SOURCE else jp.Role.SOURCE
    me = jp.JourneyConnection(role)
    for ft in seq:
        # build the frame as the peer would, bypassing the peer's own state checks
        enc = jp.JourneyConnection(peer_role)
        payload = enc._encode(samples[ft])
        try:
            me.receive_data(_frame(ft, payload))
            ev = me.next_event()
        except jp.ProtocolError:
            assert me.state is jp.ConnState.CLOSED
            return
        assert ev == samples[ft]


GENS = ((0xA1, 1, 100, 0), (0xB2, 2, 200, 41))


def test_generations_round_trip_and_their_turns() -> None:
    # the source offers the feature and sends its generations right after HELLO
    src = jp.JourneyConnection(jp.Role.SOURCE)
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    h = hello(jp.Feature.LZ4 | jp.Feature.GENERATIONS)
    rem.receive_data(src.send(h) + src.send(jp.Generations(GENS, jp.GenerationsFlag.PRIMARY, 0)))
    got = rem.next_event()
    assert isinstance(got, jp.Hello) and jp.Feature.GENERATIONS in got.features
    assert rem.next_event() == jp.Generations(GENS, jp.GenerationsFlag.PRIMARY, 0)
    # a promoted remote answers with its own generations, then the refusal
    src.receive_data(rem.send(jp.Generations(GENS, jp.GenerationsFlag.PRIMARY | jp.GenerationsFlag.DIRTY, 4096))
                     + rem.send(jp.Error(jp.ErrorCode.PRIMARY, "primary now")))
    assert src.next_event() == jp.Generations(GENS, jp.GenerationsFlag.PRIMARY | jp.GenerationsFlag.DIRTY, 4096)
    assert src.next_event() == jp.Error(jp.ErrorCode.PRIMARY, "primary now")
    # the source's generations may also arrive once the remote answered; the remote never sends them then
    s2, r2 = open_pair()
    r2.receive_data(s2.send(jp.Generations(GENS)))
    assert r2.next_event() == jp.Generations(GENS)
    with pytest.raises(ValueError, match="cannot send"):
        r2.send(jp.Generations(GENS))


@pytest.mark.parametrize(("gens", "flags", "message"), [
    (((0, 1, 0, 0),), 0, "id or counter 0"),
    (((5, 0, 0, 0),), 0, "id or counter 0"),
    (((5, 2, 0, 0), (6, 2, 0, 0)), 0, "do not increase"),
    (tuple((i + 1, i + 1, 0, 0) for i in range(33)), 0, "33 generations"),
    (((5, 1, 0, 0),), 8, "flags 8"),
])
def test_bad_generations_are_protocol_errors(gens: tuple[tuple[int, int, int, int], ...], flags: int,
                                             message: str) -> None:
    _s, r = open_pair()
    payload = struct.pack(">BQB", flags, 0, len(gens)) + b"".join(struct.pack(">QQQQ", *g) for g in gens)
    r.receive_data(_frame(jp.FrameType.GENERATIONS, payload))
    with pytest.raises(jp.ProtocolError, match=message):
        r.next_event()
    assert r.state is jp.ConnState.CLOSED


def test_a_failback_negotiates_the_dirty_map_and_gets_the_promoted_copys_regions() -> None:
    src = jp.JourneyConnection(jp.Role.SOURCE)
    rem = jp.JourneyConnection(jp.Role.REMOTE)
    rem.receive_data(src.send(hello(jp.Feature.LZ4 | jp.Feature.DIRTY_MAP)))
    got = rem.next_event()
    assert isinstance(got, jp.Hello) and jp.Feature.DIRTY_MAP in got.features
    src.receive_data(rem.send(jp.HelloReply("r", UUID, 0, 0, jp.Feature.LZ4 | jp.Feature.DIRTY_MAP)))
    reply = src.next_event()
    assert isinstance(reply, jp.HelloReply) and jp.Feature.DIRTY_MAP in reply.features
    rem.receive_data(src.send(jp.DirtyRequest()))
    assert rem.next_event() == jp.DirtyRequest()
    frames = [jp.DirtyRegions(jp.DirtyFlag.TRUSTED, 2048, 20, 0, b"\x09\x00"),
              jp.DirtyRegions(jp.DirtyFlag.TRUSTED | jp.DirtyFlag.LAST, 2048, 20, 16, b"\x08"),
              jp.DirtyRegions(jp.DirtyFlag.LAST, 2048, 20, 0, b"", "the bitmap is missing")]
    for f in frames:
        src.receive_data(rem.send(f))
        assert src.next_event() == f


def test_dirty_request_without_the_feature_and_dirty_regions_out_of_bounds_are_protocol_errors() -> None:
    _, r1 = open_pair()  # the HELLO offered no DIRTY_MAP
    r1.receive_data(_frame(jp.FrameType.DIRTY_REQUEST, b""))
    with pytest.raises(jp.ProtocolError, match="did not negotiate"):
        r1.next_event()
    bad = [
        (1 << 2, 8, 16, 0, 1, 0, b"\x01"),  # unknown flag
        (1, 0, 16, 0, 1, 0, b"\x01"),  # regions of 0 blocks
        (1, 8, 16, 3, 1, 0, b"\x01"),  # first region not a multiple of 8
        (1, 8, 16, 8, 2, 0, b"\x01\x01"),  # bits for regions 8..23 of a volume of 16
        (1, 8, 16, 0, 2, 0, b"\x01"),  # shorter than it says
    ]
    for flags, rb, total, first, nbits, nreason, body in bad:
        src, _ = open_pair()
        payload = struct.pack(">BIQQIH", flags, rb, total, first, nbits, nreason) + body
        src.receive_data(_frame(jp.FrameType.DIRTY_REGIONS, payload))
        with pytest.raises(jp.ProtocolError):
            src.next_event()
        assert src.state is jp.ConnState.CLOSED
