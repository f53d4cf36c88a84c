"""On-flash format of the journal: every structure round-trips, and any flipped bit is caught."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.journal.format import (
    HEADER_SIZE,
    SLOT_SIZE,
    WRAP_KIND,
    Checkpoint,
    JournalCorrupt,
    RecordKind,
    Superblock,
    crc32c,
    decode_header,
    encode_record,
    record_length,
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283


@given(kind=st.sampled_from([1, 2, 3, WRAP_KIND]), epoch=u32, inc=u32, seq=u64, db=u64, lba=u64, count=u32,
       ts=u64, payload=st.binary(max_size=2000))
def test_record_header_round_trips(kind: int, epoch: int, inc: int, seq: int, db: int, lba: int, count: int,
                                   ts: int, payload: bytes) -> None:
    raw = encode_record(kind=kind, epoch=epoch, incarnation=inc, seq=seq, durable_before=db, lba=lba,
                        count=count, timestamp_ns=ts, payload=payload)
    assert len(raw) == record_length(len(payload)) and len(raw) % 512 == 0
    h = decode_header(raw)
    assert h is not None
    assert (h.kind, h.epoch, h.incarnation, h.seq, h.durable_before, h.lba, h.count, h.payload_len,
            h.timestamp_ns) == (kind, epoch, inc, seq, db, lba, count, len(payload), ts)
    assert h.payload_crc == crc32c(payload)
    assert raw[HEADER_SIZE:HEADER_SIZE + len(payload)] == payload


def test_every_flipped_header_bit_is_detected() -> None:
    raw = bytearray(encode_record(kind=RecordKind.WRITE, epoch=7, incarnation=1, seq=42, durable_before=41,
                                  lba=100, count=1, timestamp_ns=123, payload=b"x" * 512))
    assert decode_header(raw) is not None
    for bit in range(HEADER_SIZE * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert decode_header(bad) is None, f"flip of header bit {bit} went unnoticed"


def test_decode_header_never_raises_on_garbage() -> None:
    for data in (b"", b"\0" * 64, b"\xff" * 64, b"UJR1" + b"\0" * 60, bytes(range(64))):
        assert decode_header(data) is None


@given(bs=st.sampled_from([512, 4096]), ring=st.integers(16, 1 << 20).map(lambda n: n * 4096), epoch=u32,
       created=u64, max_batch=st.integers(512, 1 << 30))
def test_superblock_round_trips(bs: int, ring: int, epoch: int, created: int, max_batch: int) -> None:
    sb = Superblock(block_size=bs, unit_uuid=uuid.uuid4(), device_size=ring + 16384, ring_size=ring,
                    epoch=epoch, created_ns=created, max_batch=max_batch)
    raw = sb.encode()
    assert len(raw) == 4096
    assert Superblock.decode(raw) == sb


def test_superblock_bit_flips_are_detected() -> None:
    sb = Superblock(block_size=512, unit_uuid=uuid.uuid4(), device_size=1 << 20, ring_size=(1 << 20) - 16384,
                    epoch=5, created_ns=1)
    raw = sb.encode()
    for bit in range(80 * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(JournalCorrupt):
            Superblock.decode(bytes(bad))


names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=16)


@given(gen=u64, tail=st.integers(1, 2**62), n=st.integers(0, 2**20), tail_pos=u64, head_pos=u64, applied=u64,
       epoch=u32, inc=u32, consumers=st.dictionaries(names, u64, max_size=32))
def test_checkpoint_round_trips(gen: int, tail: int, n: int, tail_pos: int, head_pos: int, applied: int,
                                epoch: int, inc: int, consumers: dict[str, int]) -> None:
    ck = Checkpoint(generation=gen, tail_seq=tail, tail_pos=tail_pos, head_seq=tail - 1 + n, head_pos=head_pos,
                    applied_seq=applied, written_ns=9, epoch=epoch, incarnation=inc,
                    consumers=tuple(consumers.items()))
    raw = ck.encode()
    assert len(raw) == SLOT_SIZE
    assert Checkpoint.decode(raw) == ck


def test_checkpoint_bit_flips_are_detected() -> None:
    ck = Checkpoint(generation=3, tail_seq=10, tail_pos=4096, head_seq=20, head_pos=9000, applied_seq=15,
                    written_ns=1, epoch=2, incarnation=4, consumers=(("remote-a", 12), ("remote-b", 19)))
    raw = ck.encode()
    for byte in [*range(0, 120), 2000, 4091, 4092, 4095]:
        for bit in (0, 5):
            bad = bytearray(raw)
            bad[byte] ^= 1 << bit
            with pytest.raises(JournalCorrupt):
                Checkpoint.decode(bytes(bad))
