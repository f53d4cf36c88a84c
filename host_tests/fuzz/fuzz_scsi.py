"""Fuzz the SCSI block target (firmware/scsi) with sequences of arbitrary CDBs and DATA-OUT bytes.

Invariant: for any sequence of CDBs (random bytes, often with a real opcode in front) on a
512- or 4096-byte-block disk larger than 2 TiB, `plan()` and `execute()` never raise; every result
is GOOD or CHECK CONDITION; a GOOD data-in command returns exactly `plan().length` bytes (at most
that many for PERSISTENT RESERVE IN, whose reply depends on the registrations when it runs: the
transport reports the rest as residue); every
CHECK CONDITION leaves valid fixed-format sense that is never HARDWARE ERROR (which would mean an
exception inside the target) unless the store was told to fail; and every store call is in range
(the in-memory store asserts it).

Run: python host_tests/fuzz/fuzz_scsi.py -atheris_runs=100000   (or -max_total_time=60)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from host_tests.fuzz.runner import run_fuzzer

with atheris.instrument_imports():
    from firmware.logical_unit import Direction, Status
    from firmware.scsi import ScsiTarget
    from firmware.scsi.cdb import CDB_SIZE
    from firmware.scsi.opcodes import Opcode
    from firmware.scsi.sense import Sense, SenseKey
    from firmware.storage import ReadError
    from host_tests.scsi_fakes import MemoryBlockStore

_OPCODES = sorted(CDB_SIZE)
logging.disable(logging.CRITICAL)  # the target logs injected store failures; keep the fuzzer quiet


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    block_size = 4096 if fdp.ConsumeBool() else 512
    store = MemoryBlockStore(
        block_size=block_size,
        num_blocks=(1 << 33) + fdp.ConsumeIntInRange(1, 100),
        write_cache=fdp.ConsumeBool(),
        read_only=fdp.ConsumeIntInRange(0, 7) == 0,
    )
    failing = fdp.ConsumeIntInRange(0, 7) == 0
    if failing:
        store.fail["read"] = ReadError("injected")
    target = ScsiTarget(
        store,
        serial="FUZZ1",
        device_id=bytes(range(16)),
        max_transfer_blocks=fdp.ConsumeIntInRange(1, 32),
        max_write_same_blocks=fdp.ConsumeIntInRange(1, 64),
        max_unmap_descriptors=fdp.ConsumeIntInRange(1, 8),
        max_unmap_blocks=fdp.ConsumeIntInRange(1, 1 << 20),
    )
    if fdp.ConsumeIntInRange(0, 15) == 0:
        target.reset_event()
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        if fdp.remaining_bytes() == 0:
            break
        cdb = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
        if cdb and fdp.ConsumeBool():
            cdb = bytes([_OPCODES[cdb[0] % len(_OPCODES)]]) + cdb[1:]
        plan = target.plan(cdb)
        assert plan.length >= 0
        data_out = b""
        if plan.direction == Direction.OUT:
            data_out = fdp.ConsumeBytes(plan.length).ljust(plan.length, b"\0")
        result = target.execute(cdb, data_out)
        assert result.status in (Status.GOOD, Status.CHECK_CONDITION)
        if result.status == Status.GOOD and plan.direction == Direction.IN:
            if cdb[0] == Opcode.PERSISTENT_RESERVE_IN:
                assert len(result.data) <= plan.length, (cdb.hex(), plan, len(result.data))
            else:
                assert len(result.data) == plan.length, (cdb.hex(), plan, len(result.data))
        if result.status == Status.CHECK_CONDITION:
            sense = target.sense
            raw = sense.to_fixed()
            assert Sense.from_fixed(raw) == sense
            if sense.key == SenseKey.HARDWARE_ERROR:
                raise AssertionError(f"internal failure on {cdb.hex()}")
            if sense.key == SenseKey.MEDIUM_ERROR:
                assert failing, f"medium error without an injected failure on {cdb.hex()}"


def main() -> None:
    run_fuzzer(__file__, test_one_input)


if __name__ == "__main__":
    main()
