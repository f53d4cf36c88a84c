"""Fuzz journal recovery (firmware/journal) with damaged flash images.

Invariant: opening a journal device whose bytes were altered anywhere (superblock, checkpoints,
records) either raises `JournalError` (JournalCorrupt included) or opens; an opened journal serves
only records identical to the ones written with those seqs, never anything else, and never raises
anything but `JournalError` while reading them. Every call is bounded by the device size.

Input: pairs of (4-byte offset, 1-byte value) XORed into a reference image that wrapped around the
ring several times.

Run: python host_tests/fuzz/fuzz_journal.py -atheris_runs=20000   (or -max_total_time=60)
"""

from __future__ import annotations

import logging
import random
import sys
import uuid
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from host_tests.fuzz.runner import run_fuzzer

with atheris.instrument_imports():
    from firmware.journal import Journal, JournalError, JournalFull, RecordKind
    from firmware.journal.format import RING_OFFSET
    from firmware.journal.sim import SimulatedFlash

UNIT = uuid.UUID("f0220000-0000-4000-8000-00000000f022")
RING = 64 * 1024


def _reference() -> tuple[bytes, dict[int, bytes]]:
    f = SimulatedFlash(RING_OFFSET + RING)
    j = Journal.open(None, size=None, unit_uuid=UNIT, block_size=512, flash=f)
    held: dict[int, bytes] = {}
    rng = random.Random(5)
    for _ in range(120):
        blocks = rng.choice([1, 2, 8])
        data = rng.randbytes(512 * blocks)
        try:
            s = j.append(RecordKind.WRITE, rng.randrange(4096), blocks, data, 0)
        except JournalFull:
            j.sync()
            j.set_applied(j.durable_seq - 4)
            s = j.append(RecordKind.WRITE, rng.randrange(4096), blocks, data, 0)
        held[s] = data
        if rng.random() < 0.5:
            j.sync()
    j.sync()
    return bytes(f.durable), held


IMAGE, HELD = _reference()


def test_one_input(data: bytes) -> None:
    img = bytearray(IMAGE)
    for i in range(0, len(data) - 4, 5):
        off = int.from_bytes(data[i:i + 4], "little") % len(img)
        img[off] ^= data[i + 4] or 1
    try:
        j = Journal.open(None, size=None, unit_uuid=UNIT, block_size=512,
                         flash=SimulatedFlash(len(img), image=bytes(img)))
        recs = j.read_records(j.tail_seq - 1, 1 << 30)
    except JournalError:
        return
    for r in recs:
        if HELD.get(r.seq) != r.payload:
            raise AssertionError(f"seq {r.seq} served data that was never written with it")


def main() -> None:
    logging.disable(logging.CRITICAL)
    run_fuzzer(__file__, test_one_input)


if __name__ == "__main__":
    main()
