"""Fuzz the Bulk-Only Transport (gadget/bot.py) with arbitrary host behaviour.

Invariant: any sequence of bulk_out / bulk_in / clear_halt / set_halt / reset / max_packet changes
returns the documented kinds (bulk_out -> bool; bulk_in -> bytes no longer than asked, None or
STALL) and raises nothing but `ValueError` for arguments outside the contract (a non-BOT endpoint,
a negative length, a non-positive packet size); never a hang (every call is bounded by its
input). Also checked on every step: a CSW echoes the tag of the CBW it answers, the logical unit
never gets a DATA-OUT buffer of another size than it planned, an invalid CBW keeps both endpoints
halted until reset(), and reset() always returns to the COMMAND stage with no halts.

Run: python host_tests/fuzz/fuzz_bot.py -atheris_runs=100000   (or -max_total_time=60)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status
    from gadget.bot import (
        CSW_LENGTH,
        EP_IN,
        EP_OUT,
        STALL,
        BotCommand,
        BulkOnlyTransport,
        Cbw,
        Csw,
        Stage,
    )

_MAX_LENGTH = 1 << 17


class FuzzUnit:
    """A logical unit whose plan and result are read from the CDB bytes, so the fuzzer reaches
    every one of the thirteen cases, CHECK CONDITION, short data and internal errors."""

    def plan(self, cdb: bytes) -> CommandPlan:
        cdb = cdb.ljust(6, b"\0")
        if cdb[5] == 0xEE:
            raise RuntimeError("unit failure while planning")
        direction = Direction(cdb[0] % 3)
        length = int.from_bytes(cdb[1:3], "little") if direction is not Direction.NONE else 0
        return CommandPlan(direction, length)

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        plan = self.plan(cdb)
        padded = cdb.ljust(6, b"\0")
        if plan.direction is Direction.OUT:
            # logical_unit contract: exactly plan.length bytes, or no data for a case-9 command
            assert len(data_out) == plan.length, (len(data_out), plan.length)
        else:
            assert data_out == b""
        if padded[5] == 0xEF:
            raise RuntimeError("unit failure while executing")
        status = Status.CHECK_CONDITION if padded[4] & 1 else Status.GOOD
        data = b""
        if plan.direction is Direction.IN:
            # sometimes shorter than planned, sometimes (a unit bug) longer
            data = bytes([padded[3]]) * ((plan.length * padded[3]) // 128)
        return CommandResult(status, data)

    def reset_event(self) -> None:
        pass


def _cbw(fdp: atheris.FuzzedDataProvider) -> bytes:
    cdb = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16)) or b"\0"
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        length = 0  # Hn cases
    elif mode == 1:
        length = int.from_bytes(cdb.ljust(3, b"\0")[1:3], "little")  # what FuzzUnit will plan
    else:
        length = fdp.ConsumeIntInRange(0, 70000)
    cbw = Cbw.for_command(
        fdp.ConsumeIntInRange(0, 2**32 - 1),
        cdb,
        length,
        data_in=fdp.ConsumeBool(),
        lun=fdp.ConsumeIntInRange(0, 2),
    )
    raw = bytearray(cbw.build())
    if fdp.ConsumeIntInRange(0, 7) == 0:  # now and then a reserved bit or a bad length field
        raw[fdp.ConsumeIntInRange(12, 14)] |= 1 << fdp.ConsumeIntInRange(0, 7)
    return bytes(raw)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    deferred = fdp.ConsumeBool()
    bot = BulkOnlyTransport(FuzzUnit(), max_lun=fdp.ConsumeIntInRange(0, 1),
                            max_packet=fdp.ConsumeIntInRange(1, 1024), stall_short_in=fdp.ConsumeBool(),
                            deferred=deferred)
    last_tag: int | None = None
    executor: list[BotCommand] = []  # commands taken and not yet completed, in arrival order
    for _ in range(fdp.ConsumeIntInRange(0, 64)):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 10)
        stage = bot.stage
        if op == 0:
            raw = _cbw(fdp)
            accepted = bot.bulk_out(raw)
            assert isinstance(accepted, bool)
            if accepted and stage is Stage.COMMAND and bot.stage is not Stage.NEED_RESET:
                last_tag = int.from_bytes(raw[4:8], "little")
        elif op == 1:
            assert isinstance(bot.bulk_out(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))), bool)
        elif op == 2:
            assert isinstance(bot.bulk_out(bytes(fdp.ConsumeIntInRange(0, _MAX_LENGTH))), bool)
        elif op == 3:
            max_length = fdp.ConsumeIntInRange(-1, _MAX_LENGTH)
            try:
                answer = bot.bulk_in(max_length)
            except ValueError:
                assert max_length < 0
                continue
            assert answer is None or answer is STALL or isinstance(answer, bytes)
            if isinstance(answer, bytes):
                assert len(answer) <= max_length
                if stage is Stage.STATUS:
                    assert len(answer) == CSW_LENGTH
                    assert Csw.parse(answer).tag == last_tag
                    assert bot.stage is Stage.COMMAND
        elif op in (4, 5):
            endpoint = fdp.PickValueInList([EP_IN, EP_OUT, 0x82, 0x00])
            try:
                if op == 4:
                    bot.clear_halt(endpoint)
                else:
                    bot.set_halt(endpoint)
            except ValueError:
                assert endpoint not in (EP_IN, EP_OUT)
        elif op == 6:
            bot.reset()
            assert bot.stage is Stage.COMMAND and not bot.in_halted and not bot.out_halted
        elif op == 9:
            bot.bus_reset()
            assert bot.stage is Stage.COMMAND and not bot.in_halted and not bot.out_halted
        elif op == 10:
            if executor:  # the executor finishes the oldest command
                command = executor.pop(0)
                current = not executor and bot.stage is Stage.EXECUTING
                assert isinstance(bot.complete(command, bot.run(command)), bool)
                if not current:
                    assert bot.stage is not Stage.EXECUTING or executor
        elif op == 7:
            value = fdp.ConsumeIntInRange(-1, 2048)
            try:
                bot.max_packet = value
            except ValueError:
                assert value <= 0
        else:
            assert bot.get_max_lun() in (0, 1)
            assert isinstance(bot.status(), dict)
        taken = bot.take_command()
        assert taken is None or deferred
        if taken is not None:
            assert bot.stage is Stage.EXECUTING
            executor.append(taken)
        if not deferred:
            assert bot.stage is not Stage.EXECUTING
        if stage is Stage.NEED_RESET and op not in (6, 9):
            # BOT 6.6.1: only reset recovery leaves this state
            assert bot.stage is Stage.NEED_RESET and bot.in_halted and bot.out_halted


def main() -> None:
    logging.disable(logging.CRITICAL)  # the transport logs every bad CBW; keep the fuzzer quiet
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
