"""Bulk-Only Transport (gadget/bot.py) as a host sees it: CBW/CSW formats, the stage machine,
the thirteen cases of BOT 1.0 section 6.7, reset recovery, and data streams split any way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status
from gadget.bot import (
    _CASE_LOG_LEVEL,
    CBW_LENGTH,
    CBW_SIGNATURE,
    CSW_LENGTH,
    EP_IN,
    EP_OUT,
    STALL,
    BulkOnlyTransport,
    Case,
    Cbw,
    Csw,
    CswStatus,
    InvalidCbw,
    InvalidCsw,
    Stage,
    Stall,
    classify,
)

# --- a fake logical unit ------------------------------------------------------------------------

TEST_UNIT_READY = bytes(6)
REQUEST_SENSE_6 = bytes([0x03, 0, 0, 0, 18, 0])
READ_10 = bytes([0x28]) + bytes(9)
WRITE_10 = bytes([0x2A]) + bytes(9)


@dataclass
class FakeUnit:
    """Plans every CDB the same way (direction, length) and answers with `data`/`status`.

    Records each plan(), execute() and reset_event() in `calls`, and each plan and execute in
    `planned`/`executed`, so tests can tell whether and in which order things ran, and with what.
    """

    direction: Direction = Direction.NONE
    length: int = 0
    data: bytes = b""
    status: Status = Status.GOOD
    raise_in: str = ""  # "plan" or "execute": raise RuntimeError there
    planned: list[bytes] = field(default_factory=list)
    executed: list[tuple[bytes, bytes]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    def plan(self, cdb: bytes) -> CommandPlan:
        self.planned.append(cdb)
        self.calls.append("plan")
        if self.raise_in == "plan":
            raise RuntimeError("plan failed")
        return CommandPlan(self.direction, self.length)

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        self.executed.append((cdb, bytes(data_out)))
        self.calls.append("execute")
        if self.raise_in == "execute":
            raise RuntimeError("execute failed")
        return CommandResult(self.status, self.data)

    def reset_event(self) -> None:
        self.calls.append("reset_event")


def payload(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


# --- a host that follows BOT 5.3 (what Linux usb-storage does) ----------------------------------


@dataclass
class Outcome:
    data: bytes
    csw: Csw
    stalled_in: int  # STALLs the host saw on bulk IN (each followed by CLEAR_FEATURE)
    stalled_out: int
    accepted_out: int  # bytes of data-out the device accepted


def host_command(
    bot: BulkOnlyTransport,
    cbw: Cbw,
    out_data: bytes = b"",
    *,
    out_pieces: list[int] | None = None,
    in_request: int = 65536,
    in_pieces: list[int] | None = None,
) -> Outcome:
    """Send `cbw`, run the data phase it announces, read the CSW; clear halts like a host does."""
    assert bot.bulk_out(cbw.build()) is True
    stalled_in = stalled_out = accepted = 0
    if cbw.data_transfer_length and not cbw.data_in:
        sizes = iter(out_pieces or [])
        offset = 0
        while offset < len(out_data):
            size = next(sizes, 4096) or 1
            piece = out_data[offset : offset + size]
            if not bot.bulk_out(piece):
                stalled_out += 1
                bot.clear_halt(EP_OUT)
                break
            accepted += len(piece)
            offset += len(piece)
    got = bytearray()
    if cbw.data_transfer_length and cbw.data_in:
        sizes = iter(in_pieces or [])
        while len(got) < cbw.data_transfer_length:
            want = min(next(sizes, in_request) or 1, cbw.data_transfer_length - len(got))
            answer = bot.bulk_in(want)
            assert answer is not None, "device sits on a data-in request"
            if isinstance(answer, Stall):
                stalled_in += 1
                bot.clear_halt(EP_IN)
                break
            assert len(answer) <= want
            got += answer
            if len(answer) < want:
                break  # short transfer ends the data phase
    answer = bot.bulk_in(CSW_LENGTH)
    if isinstance(answer, Stall):  # BOT 5.3.3: clear the halt and try the CSW once more
        stalled_in += 1
        bot.clear_halt(EP_IN)
        answer = bot.bulk_in(CSW_LENGTH)
    assert isinstance(answer, bytes), f"no CSW: {answer!r}"
    return Outcome(bytes(got), Csw.parse(answer), stalled_in, stalled_out, accepted)


# --- CBW / CSW formats --------------------------------------------------------------------------

cbws = st.builds(
    Cbw,
    tag=st.integers(0, 2**32 - 1),
    data_transfer_length=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
    lun=st.integers(0, 255),
    cb_length=st.integers(0, 255),
    cb=st.binary(min_size=16, max_size=16),
)


@given(cbws)
def test_cbw_parse_build_round_trip(cbw: Cbw) -> None:
    raw = cbw.build()
    assert len(raw) == CBW_LENGTH
    assert raw[:4] == b"USBC"
    assert Cbw.parse(raw) == cbw


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255))
def test_csw_parse_build_round_trip(tag: int, residue: int, status: int) -> None:
    raw = Csw(tag, residue, status).build()
    assert len(raw) == CSW_LENGTH
    assert raw[:4] == b"USBS"
    assert Csw.parse(raw) == Csw(tag, residue, status)


def test_cbw_layout_matches_bot_5_1() -> None:
    raw = Cbw.for_command(0x11223344, READ_10, 0x1000, data_in=True, lun=2).build()
    assert raw[0:4] == (CBW_SIGNATURE).to_bytes(4, "little")
    assert raw[4:8] == bytes([0x44, 0x33, 0x22, 0x11])
    assert int.from_bytes(raw[8:12], "little") == 0x1000
    assert raw[12] == 0x80 and raw[13] == 2 and raw[14] == 10
    assert raw[15:25] == READ_10 and raw[25:31] == bytes(6)


@pytest.mark.parametrize("length", [0, 1, 30, 32, 64, 512])
def test_cbw_of_wrong_size_is_invalid(length: int) -> None:
    raw = Cbw.for_command(1, TEST_UNIT_READY).build().ljust(length, b"\0")[:length]
    with pytest.raises(InvalidCbw):
        Cbw.parse(raw)


def test_cbw_with_wrong_signature_is_invalid() -> None:
    raw = bytearray(Cbw.for_command(1, TEST_UNIT_READY).build())
    raw[3] ^= 0x01
    with pytest.raises(InvalidCbw):
        Cbw.parse(bytes(raw))


def test_csw_parse_rejects_bad_size_and_signature() -> None:
    good = Csw(1, 0, 0).build()
    with pytest.raises(InvalidCsw):
        Csw.parse(good[:12])
    with pytest.raises(InvalidCsw):
        Csw.parse(b"USBC" + good[4:])


@pytest.mark.parametrize(
    ("changes", "meaningful"),
    [
        ({}, True),
        ({"flags": 0x80}, True),
        ({"flags": 0x40}, False),  # reserved bmCBWFlags bits
        ({"flags": 0x01}, False),
        ({"lun": 0x10}, False),  # reserved bCBWLUN bits
        ({"lun": 1}, False),  # above max LUN 0
        ({"cb_length": 0}, False),
        ({"cb_length": 17}, False),
        ({"cb_length": 0x26}, False),  # reserved bits 7..5 set, low bits 6
        ({"cb_length": 16}, True),
        ({"cb_length": 1}, True),
    ],
)
def test_meaningfulness_bot_6_2_2(changes: dict[str, int], meaningful: bool) -> None:
    base = Cbw.for_command(5, TEST_UNIT_READY)
    cbw = _replace(base, changes)
    assert (cbw.meaningless_reason(max_lun=0) is None) is meaningful


def _replace(cbw: Cbw, changes: dict[str, int]) -> Cbw:
    fields: dict[str, Any] = {
        "tag": cbw.tag,
        "data_transfer_length": cbw.data_transfer_length,
        "flags": cbw.flags,
        "lun": cbw.lun,
        "cb_length": cbw.cb_length,
        "cb": cbw.cb,
    }
    fields.update(changes)
    return Cbw(**fields)


# --- classification of the thirteen cases -------------------------------------------------------


@pytest.mark.parametrize(
    ("host_length", "data_in", "direction", "device_length", "case"),
    [
        (0, False, Direction.NONE, 0, Case.HN_DN),
        (0, True, Direction.NONE, 0, Case.HN_DN),  # direction bit ignored when length is 0
        (0, False, Direction.IN, 8, Case.HN_DI),
        (0, False, Direction.OUT, 8, Case.HN_DO),
        (8, True, Direction.NONE, 0, Case.HI_DN),
        (8, True, Direction.IN, 0, Case.HI_DN),  # a zero-length plan is "no data"
        (64, True, Direction.IN, 8, Case.HI_GT_DI),
        (8, True, Direction.IN, 8, Case.HI_EQ_DI),
        (4, True, Direction.IN, 8, Case.HI_LT_DI),
        (8, True, Direction.OUT, 8, Case.HI_DO),
        (8, False, Direction.NONE, 0, Case.HO_DN),
        (8, False, Direction.IN, 8, Case.HO_DI),
        (64, False, Direction.OUT, 8, Case.HO_GT_DO),
        (8, False, Direction.OUT, 8, Case.HO_EQ_DO),
        (4, False, Direction.OUT, 8, Case.HO_LT_DO),
    ],
)
def test_classify(host_length: int, data_in: bool, direction: Direction, device_length: int,
                  case: Case) -> None:
    cbw = Cbw.for_command(1, TEST_UNIT_READY, host_length, data_in=data_in)
    assert classify(cbw, direction, device_length) is case


# --- the thirteen cases end to end (BOT 6.7) ----------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    case: Case
    host_length: int
    data_in: bool
    direction: Direction
    device_length: int
    status: CswStatus
    residue: int | None  # None: not checked (host ignores residue on phase error)
    ran: bool
    stalled_in: int
    stalled_out: int
    data_in_bytes: int = 0
    data_out_to_unit: int = 0


CASES = [
    # case 1: CSW status from the unit, residue 0
    CaseSpec(Case.HN_DN, 0, False, Direction.NONE, 0, CswStatus.PASSED, 0, True, 0, 0),
    # cases 2, 3: phase error; the command does not run
    CaseSpec(Case.HN_DI, 0, False, Direction.IN, 36, CswStatus.PHASE_ERROR, None, False, 0, 0),
    CaseSpec(Case.HN_DO, 0, False, Direction.OUT, 512, CswStatus.PHASE_ERROR, None, False, 0, 0),
    # case 4: stall bulk IN, residue = Hi
    CaseSpec(Case.HI_DN, 512, True, Direction.NONE, 0, CswStatus.PASSED, 512, True, 1, 0),
    # case 5: send Di, stall bulk IN, residue Hi - Di
    CaseSpec(Case.HI_GT_DI, 1024, True, Direction.IN, 36, CswStatus.PASSED, 1024 - 36, True, 1, 0, 36),
    # case 6: exact
    CaseSpec(Case.HI_EQ_DI, 1024, True, Direction.IN, 1024, CswStatus.PASSED, 0, True, 0, 0, 1024),
    # case 7: send Hi bytes, phase error
    CaseSpec(Case.HI_LT_DI, 512, True, Direction.IN, 1024, CswStatus.PHASE_ERROR, None, True, 0, 0, 512),
    # case 8: stall bulk IN, phase error, not run
    CaseSpec(Case.HI_DO, 512, True, Direction.OUT, 512, CswStatus.PHASE_ERROR, None, False, 1, 0),
    # case 9: accept and discard, residue = Ho
    CaseSpec(Case.HO_DN, 512, False, Direction.NONE, 0, CswStatus.PASSED, 512, True, 0, 0),
    # case 10: stall bulk OUT, phase error, not run
    CaseSpec(Case.HO_DI, 512, False, Direction.IN, 512, CswStatus.PHASE_ERROR, None, False, 0, 1),
    # case 11: accept Ho, unit gets Do, residue Ho - Do
    CaseSpec(Case.HO_GT_DO, 1024, False, Direction.OUT, 512, CswStatus.PASSED, 512, True, 0, 0, 0, 512),
    # case 12: exact
    CaseSpec(Case.HO_EQ_DO, 1024, False, Direction.OUT, 1024, CswStatus.PASSED, 0, True, 0, 0, 0, 1024),
    # case 13: phase error, the unit never sees a short buffer
    CaseSpec(Case.HO_LT_DO, 512, False, Direction.OUT, 1024, CswStatus.PHASE_ERROR, None, False, 0, 0),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"case{int(s.case)}-{s.case.name}")
def test_thirteen_cases(spec: CaseSpec) -> None:
    data = payload(spec.device_length) if spec.direction is Direction.IN else b""
    unit = FakeUnit(spec.direction, spec.device_length, data)
    bot = BulkOnlyTransport(unit)
    cbw = Cbw.for_command(0xCAFE0000 + spec.case, READ_10, spec.host_length, data_in=spec.data_in)
    host_data = payload(spec.host_length) if not spec.data_in else b""
    outcome = host_command(bot, cbw, host_data)

    assert outcome.csw.tag == cbw.tag  # BOT 5.2: dCSWTag echoes dCBWTag
    assert outcome.csw.status == spec.status
    if spec.residue is not None:
        assert outcome.csw.residue == spec.residue
    assert outcome.stalled_in == spec.stalled_in
    assert outcome.stalled_out == spec.stalled_out
    assert bool(unit.executed) is spec.ran
    assert outcome.data == data[: spec.data_in_bytes]
    if spec.data_out_to_unit:
        assert unit.executed[0][1] == host_data[: spec.data_out_to_unit]
    elif unit.executed:
        assert unit.executed[0][1] == b""
    if spec.stalled_out == 0 and not spec.data_in:
        assert outcome.accepted_out == spec.host_length  # 9, 11, 12, 13 accept the host's bytes
    assert bot.stage is Stage.COMMAND
    assert not bot.in_halted and not bot.out_halted
    counters = bot.status()
    assert counters["by_case"] == {int(spec.case): 1}
    assert counters["phase_errors"] == (1 if spec.status is CswStatus.PHASE_ERROR else 0)
    # the next command works without any reset
    unit.direction, unit.length, unit.data = Direction.NONE, 0, b""
    again = host_command(bot, Cbw.for_command(7, TEST_UNIT_READY))
    assert again.csw == Csw(7, 0, CswStatus.PASSED)


def test_check_condition_gives_failed_status_with_residue() -> None:
    unit = FakeUnit(Direction.IN, 4096, b"", Status.CHECK_CONDITION)
    bot = BulkOnlyTransport(unit)
    outcome = host_command(bot, Cbw.for_command(3, READ_10, 4096, data_in=True))
    assert outcome.csw == Csw(3, 4096, CswStatus.FAILED)
    assert outcome.stalled_in == 1  # no data: the host's data transfer ends with a stall
    assert bot.status()["failed"] == 1


def test_failed_write_reports_failed_status() -> None:
    unit = FakeUnit(Direction.OUT, 1024, b"", Status.CHECK_CONDITION)
    bot = BulkOnlyTransport(unit)
    outcome = host_command(bot, Cbw.for_command(3, WRITE_10, 1024), payload(1024))
    assert outcome.csw == Csw(3, 0, CswStatus.FAILED)


def test_unit_returning_less_than_planned_is_a_short_transfer_with_residue() -> None:
    # e.g. INQUIRY with allocation length 255: planned 255, the unit has 36 bytes.
    unit = FakeUnit(Direction.IN, 255, payload(36))
    bot = BulkOnlyTransport(unit)
    outcome = host_command(bot, Cbw.for_command(9, READ_10, 255, data_in=True))
    assert outcome.data == payload(36)
    assert outcome.csw == Csw(9, 255 - 36, CswStatus.PASSED)
    assert outcome.stalled_in == 1  # BOT 6.7.2: less than the host asked -> stall bulk IN


def test_unit_returning_more_than_planned_is_truncated() -> None:
    unit = FakeUnit(Direction.IN, 8, payload(64))
    bot = BulkOnlyTransport(unit)
    outcome = host_command(bot, Cbw.for_command(9, READ_10, 8, data_in=True))
    assert outcome.data == payload(8)
    assert outcome.csw == Csw(9, 0, CswStatus.PASSED)


@pytest.mark.parametrize(
    ("sent", "asked", "max_packet", "stall"),
    [
        (36, 512, 512, False),  # a short packet ends the host's transfer by itself
        (512, 1024, 512, True),  # a multiple of max packet would leave it open
        (0, 512, 512, True),  # nothing to send at all
        (100, 100, 64, True),  # fills the request: the host's next request is still data
    ],
)
def test_short_data_in_without_spec_stall(sent: int, asked: int, max_packet: int, stall: bool) -> None:
    unit = FakeUnit(Direction.IN, 4096, payload(sent))
    bot = BulkOnlyTransport(unit, max_packet=max_packet, stall_short_in=False)
    assert bot.bulk_out(Cbw.for_command(1, READ_10, 4096, data_in=True).build())
    if sent:
        assert bot.bulk_in(asked) == payload(sent)
    assert bot.in_halted is stall
    if stall:
        assert bot.bulk_in(13) is STALL
        bot.clear_halt(EP_IN)
    assert Csw.parse(bot.bulk_in(13)) == Csw(1, 4096 - sent, CswStatus.PASSED)  # type: ignore[arg-type]


# --- invalid and not-meaningful CBWs, reset recovery --------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"USBC",
        Cbw.for_command(1, TEST_UNIT_READY).build()[:30],
        Cbw.for_command(1, TEST_UNIT_READY).build() + b"\0",
        b"USBS" + Cbw.for_command(1, TEST_UNIT_READY).build()[4:],
        bytes(31),
    ],
    ids=["empty", "4-bytes", "30-bytes", "32-bytes", "bad-signature", "zeros"],
)
def test_invalid_cbw_stalls_both_until_reset_recovery(junk: bytes) -> None:
    unit = FakeUnit()
    bot = BulkOnlyTransport(unit)
    assert bot.bulk_out(junk) is True
    assert bot.stage is Stage.NEED_RESET
    assert bot.in_halted and bot.out_halted
    assert bot.bulk_in(13) is STALL
    assert bot.bulk_out(Cbw.for_command(2, TEST_UNIT_READY).build()) is False
    # BOT 6.6.1: CLEAR_FEATURE(HALT) alone does not end it
    bot.clear_halt(EP_IN)
    bot.clear_halt(EP_OUT)
    assert bot.in_halted and bot.out_halted
    assert bot.bulk_in(13) is STALL
    assert unit.planned == [] and unit.executed == []
    # Reset Recovery (BOT 5.3.4): class reset, then clear both halts
    bot.reset()
    bot.clear_halt(EP_IN)
    bot.clear_halt(EP_OUT)
    assert Stage(bot.stage) is Stage.COMMAND
    outcome = host_command(bot, Cbw.for_command(3, TEST_UNIT_READY))
    assert outcome.csw == Csw(3, 0, CswStatus.PASSED)
    counters = bot.status()
    assert counters["invalid_cbws"] == 1
    assert counters["clear_halts_ignored"] == 2
    assert counters["resets"] == 1


@pytest.mark.parametrize(
    ("changes", "data_in", "length"),
    [
        ({"lun": 3}, True, 512),
        ({"flags": 0x81}, True, 512),
        ({"cb_length": 0}, False, 0),
        ({"cb_length": 17}, False, 512),
        ({"lun": 0x20}, False, 0),
    ],
)
def test_not_meaningful_cbw_is_refused_with_phase_error(
    changes: dict[str, int], data_in: bool, length: int
) -> None:
    unit = FakeUnit(Direction.IN, 512, payload(512))
    bot = BulkOnlyTransport(unit)
    cbw = _replace(Cbw.for_command(0x77, READ_10, length, data_in=data_in), changes)
    outcome = host_command(bot, cbw, payload(length) if not data_in else b"")
    assert outcome.csw == Csw(0x77, length, CswStatus.PHASE_ERROR)
    assert unit.planned == [] and unit.executed == []
    # the data endpoint the host announced was stalled; unlike an invalid CBW, clear_halt works
    assert (outcome.stalled_in, outcome.stalled_out) == ((1, 0) if data_in and length else
                                                         (0, 1) if length else (0, 0))
    assert bot.stage is Stage.COMMAND
    assert bot.status()["meaningless_cbws"] == 1


def test_multi_lun_accepts_lun_up_to_max() -> None:
    unit = FakeUnit()
    bot = BulkOnlyTransport(unit, max_lun=3)
    assert bot.get_max_lun() == 3
    assert host_command(bot, Cbw.for_command(1, TEST_UNIT_READY, lun=3)).csw.status == CswStatus.PASSED
    assert host_command(bot, Cbw.for_command(2, TEST_UNIT_READY, lun=4)).csw.status == CswStatus.PHASE_ERROR


def test_class_requests_follow_bot_3() -> None:
    unit = FakeUnit(Direction.OUT, 4096)
    bot = BulkOnlyTransport(unit, max_lun=2)
    assert bot.class_request(0xA1, 0xFE, 0, 1) == b"\x02"  # Get Max LUN (3.2)
    assert bot.bulk_out(Cbw.for_command(1, WRITE_10, 4096).build())
    bot.set_halt(EP_IN)
    assert bot.class_request(0x21, 0xFF, 0, 0) == b""  # Bulk-Only Mass Storage Reset (3.1)
    assert bot.stage is Stage.COMMAND and not bot.in_halted and bot.status()["resets"] == 1
    for request in ((0x21, 0xFF, 1, 0), (0x21, 0xFF, 0, 1), (0xA1, 0xFF, 0, 0), (0xA1, 0xFE, 0, 0),
                    (0xA1, 0xFE, 1, 1), (0x21, 0xFE, 0, 1), (0xA1, 0x01, 0, 4), (0x80, 0x06, 0x100, 18)):
        assert bot.class_request(*request) is None, request  # request error: ep0 stalls
    assert bot.status()["resets"] == 1


@pytest.mark.parametrize("max_lun", [-1, 16])
def test_max_lun_range(max_lun: int) -> None:
    with pytest.raises(ValueError):
        BulkOnlyTransport(FakeUnit(), max_lun=max_lun)


def test_windows_request_sense_with_12_byte_cb_passes_through() -> None:
    # Windows sends REQUEST SENSE with bCBWCBLength 12; the unit gets all 12 bytes and ignores the rest.
    unit = FakeUnit(Direction.IN, 18, payload(18))
    bot = BulkOnlyTransport(unit)
    cdb = REQUEST_SENSE_6 + bytes(6)
    outcome = host_command(bot, Cbw.for_command(0x1234, cdb, 18, data_in=True))
    assert outcome.csw == Csw(0x1234, 0, CswStatus.PASSED)
    assert outcome.data == payload(18)
    assert unit.planned == [cdb] and unit.executed == [(cdb, b"")]


def test_reset_mid_data_phase_returns_to_command_stage() -> None:
    unit = FakeUnit(Direction.OUT, 4096)
    bot = BulkOnlyTransport(unit)
    assert bot.bulk_out(Cbw.for_command(1, WRITE_10, 4096).build())
    assert bot.bulk_out(payload(1000))
    assert bot.stage is Stage.DATA_OUT
    bot.reset()
    assert Stage(bot.stage) is Stage.COMMAND
    assert unit.executed == []  # the half-received write never reaches the unit
    assert host_command(bot, Cbw.for_command(2, TEST_UNIT_READY)).csw.tag == 2


def test_unit_exceptions_are_internal_errors_not_crashes() -> None:
    for where in ("plan", "execute"):
        unit = FakeUnit(Direction.IN, 64, payload(64), raise_in=where)
        bot = BulkOnlyTransport(unit)
        outcome = host_command(bot, Cbw.for_command(5, READ_10, 64, data_in=True))
        assert outcome.csw == Csw(5, 64, CswStatus.PHASE_ERROR)
        assert outcome.stalled_in == 1
        assert bot.status()["internal_errors"] == 1
    unit = FakeUnit(Direction.OUT, 64, raise_in="execute")
    bot = BulkOnlyTransport(unit)
    outcome = host_command(bot, Cbw.for_command(6, WRITE_10, 64), payload(64))
    assert outcome.csw.status == CswStatus.PHASE_ERROR


def test_negative_plan_is_an_internal_error() -> None:
    bot = BulkOnlyTransport(FakeUnit(Direction.IN, -5, b""))
    outcome = host_command(bot, Cbw.for_command(5, READ_10, 64, data_in=True))
    assert outcome.csw == Csw(5, 64, CswStatus.PHASE_ERROR)
    assert bot.status()["internal_errors"] == 1


def test_short_csw_request_is_stalled_and_csw_kept() -> None:
    bot = BulkOnlyTransport(FakeUnit())
    assert bot.bulk_out(Cbw.for_command(4, TEST_UNIT_READY).build())
    assert bot.bulk_in(12) is STALL
    assert bot.stage is Stage.STATUS
    bot.clear_halt(EP_IN)
    assert Csw.parse(bot.bulk_in(13)) == Csw(4, 0, 0)  # type: ignore[arg-type]


def test_host_halt_during_data_in_pauses_and_resumes() -> None:
    data = payload(2048)
    bot = BulkOnlyTransport(FakeUnit(Direction.IN, 2048, data))
    assert bot.bulk_out(Cbw.for_command(8, READ_10, 2048, data_in=True).build())
    first = bot.bulk_in(512)
    bot.set_halt(EP_IN)
    assert bot.bulk_in(512) is STALL
    bot.clear_halt(EP_IN)
    rest = bot.bulk_in(4096)
    assert isinstance(first, bytes) and isinstance(rest, bytes)
    assert first + rest == data
    assert Csw.parse(bot.bulk_in(13)) == Csw(8, 0, 0)  # type: ignore[arg-type]


def test_bad_arguments_raise_value_error() -> None:
    bot = BulkOnlyTransport(FakeUnit())
    with pytest.raises(ValueError):
        bot.clear_halt(0x82)
    with pytest.raises(ValueError):
        bot.set_halt(0x00)
    with pytest.raises(ValueError):
        bot.bulk_in(-1)
    with pytest.raises(ValueError):
        bot.max_packet = 0
    bot.max_packet = 1024
    assert bot.max_packet == 1024


def test_status_counts_commands_cases_sizes() -> None:
    unit = FakeUnit(Direction.IN, 4096, payload(4096))
    bot = BulkOnlyTransport(unit)
    for tag in range(3):
        host_command(bot, Cbw.for_command(tag, READ_10, 4096, data_in=True))
    unit.direction, unit.length, unit.data = Direction.NONE, 0, b""
    host_command(bot, Cbw.for_command(9, TEST_UNIT_READY))
    s = bot.status()
    assert s["commands"] == 4 and s["completed"] == 4
    assert s["by_case"] == {1: 1, 6: 3}  # counted by BOT case: opcodes are the logical unit's to count
    assert "by_opcode" not in s
    assert s["transfer_sizes"] == {"<=4096": 3, "0": 1}
    assert s["bytes_in"] == 3 * 4096 + 4 * CSW_LENGTH
    assert s["stage"] == "COMMAND"


# --- every (stage, input) pair of the stage machine ---------------------------------------------

STAGE_INPUTS = ["cbw", "junk", "data", "in", "clear_in", "clear_out", "set_in", "reset", "bus_reset"]


def _bot_in_stage(stage: Stage) -> tuple[BulkOnlyTransport, FakeUnit]:
    """A transport put into `stage` by ordinary traffic."""
    if stage is Stage.DATA_OUT:
        unit = FakeUnit(Direction.OUT, 1024)
        bot = BulkOnlyTransport(unit)
        bot.bulk_out(Cbw.for_command(1, WRITE_10, 1024).build())
    elif stage is Stage.DATA_IN:
        unit = FakeUnit(Direction.IN, 1024, payload(1024))
        bot = BulkOnlyTransport(unit)
        bot.bulk_out(Cbw.for_command(1, READ_10, 1024, data_in=True).build())
    elif stage is Stage.STATUS:
        unit = FakeUnit()
        bot = BulkOnlyTransport(unit)
        bot.bulk_out(Cbw.for_command(1, TEST_UNIT_READY).build())
    elif stage is Stage.NEED_RESET:
        unit = FakeUnit()
        bot = BulkOnlyTransport(unit)
        bot.bulk_out(b"garbage")
    elif stage is Stage.EXECUTING:
        unit = FakeUnit()
        bot = BulkOnlyTransport(unit, deferred=True)
        bot.bulk_out(Cbw.for_command(1, TEST_UNIT_READY).build())
        assert bot.take_command() is not None  # handed to the executor, still running
    else:
        unit = FakeUnit()
        bot = BulkOnlyTransport(unit)
    assert bot.stage is stage
    return bot, unit


# (stage, input) -> (answer, stage after, in_halted, out_halted); answer "csw"/"data" are checked
# by kind. Written from the spec independently of the code's own tables.
EXPECTED: dict[tuple[Stage, str], tuple[object, Stage, bool, bool]] = {
    (Stage.COMMAND, "cbw"): (True, Stage.STATUS, False, False),
    (Stage.COMMAND, "junk"): (True, Stage.NEED_RESET, True, True),
    (Stage.COMMAND, "data"): (True, Stage.NEED_RESET, True, True),  # 512 bytes is not a CBW
    (Stage.COMMAND, "in"): (None, Stage.COMMAND, False, False),
    (Stage.COMMAND, "clear_in"): (None, Stage.COMMAND, False, False),
    (Stage.COMMAND, "clear_out"): (None, Stage.COMMAND, False, False),
    (Stage.COMMAND, "set_in"): (None, Stage.COMMAND, True, False),
    (Stage.COMMAND, "reset"): (None, Stage.COMMAND, False, False),
    (Stage.DATA_OUT, "cbw"): (True, Stage.DATA_OUT, False, False),  # 31 more bytes of data
    (Stage.DATA_OUT, "junk"): (True, Stage.DATA_OUT, False, False),
    (Stage.DATA_OUT, "data"): (True, Stage.DATA_OUT, False, False),
    (Stage.DATA_OUT, "in"): (None, Stage.DATA_OUT, False, False),
    (Stage.DATA_OUT, "clear_in"): (None, Stage.DATA_OUT, False, False),
    (Stage.DATA_OUT, "clear_out"): (None, Stage.DATA_OUT, False, False),
    (Stage.DATA_OUT, "set_in"): (None, Stage.DATA_OUT, True, False),
    (Stage.DATA_OUT, "reset"): (None, Stage.COMMAND, False, False),
    (Stage.DATA_IN, "cbw"): (False, Stage.DATA_IN, False, True),
    (Stage.DATA_IN, "junk"): (False, Stage.DATA_IN, False, True),
    (Stage.DATA_IN, "data"): (False, Stage.DATA_IN, False, True),
    (Stage.DATA_IN, "in"): ("data", Stage.DATA_IN, False, False),
    (Stage.DATA_IN, "clear_in"): (None, Stage.DATA_IN, False, False),
    (Stage.DATA_IN, "clear_out"): (None, Stage.DATA_IN, False, False),
    (Stage.DATA_IN, "set_in"): (None, Stage.DATA_IN, True, False),
    (Stage.DATA_IN, "reset"): (None, Stage.COMMAND, False, False),
    (Stage.STATUS, "cbw"): (False, Stage.STATUS, False, True),
    (Stage.STATUS, "junk"): (False, Stage.STATUS, False, True),
    (Stage.STATUS, "data"): (False, Stage.STATUS, False, True),
    (Stage.STATUS, "in"): ("csw", Stage.COMMAND, False, False),
    (Stage.STATUS, "clear_in"): (None, Stage.STATUS, False, False),
    (Stage.STATUS, "clear_out"): (None, Stage.STATUS, False, False),
    (Stage.STATUS, "set_in"): (None, Stage.STATUS, True, False),
    (Stage.STATUS, "reset"): (None, Stage.COMMAND, False, False),
    (Stage.NEED_RESET, "cbw"): (False, Stage.NEED_RESET, True, True),
    (Stage.NEED_RESET, "junk"): (False, Stage.NEED_RESET, True, True),
    (Stage.NEED_RESET, "data"): (False, Stage.NEED_RESET, True, True),
    (Stage.NEED_RESET, "in"): (STALL, Stage.NEED_RESET, True, True),
    (Stage.NEED_RESET, "clear_in"): (None, Stage.NEED_RESET, True, True),
    (Stage.NEED_RESET, "clear_out"): (None, Stage.NEED_RESET, True, True),
    (Stage.NEED_RESET, "set_in"): (None, Stage.NEED_RESET, True, True),
    (Stage.NEED_RESET, "reset"): (None, Stage.COMMAND, False, False),
    # the command runs on the adapter's executor: the host may only wait, reset or halt
    (Stage.EXECUTING, "cbw"): (False, Stage.EXECUTING, False, True),
    (Stage.EXECUTING, "junk"): (False, Stage.EXECUTING, False, True),
    (Stage.EXECUTING, "data"): (False, Stage.EXECUTING, False, True),
    (Stage.EXECUTING, "in"): (None, Stage.EXECUTING, False, False),
    (Stage.EXECUTING, "clear_in"): (None, Stage.EXECUTING, False, False),
    (Stage.EXECUTING, "clear_out"): (None, Stage.EXECUTING, False, False),
    (Stage.EXECUTING, "set_in"): (None, Stage.EXECUTING, True, False),
    (Stage.EXECUTING, "reset"): (None, Stage.COMMAND, False, False),
}
# A USB reset (or a new configuration) does to the transport what the class reset does.
EXPECTED.update({(stage, "bus_reset"): EXPECTED[(stage, "reset")] for stage in Stage})


def test_expected_table_covers_every_pair() -> None:
    assert set(EXPECTED) == {(s, i) for s in Stage for i in STAGE_INPUTS}


@pytest.mark.parametrize(("stage", "event"), sorted(EXPECTED))
def test_every_stage_input_pair(stage: Stage, event: str) -> None:
    bot, _unit = _bot_in_stage(stage)
    answer: object = None
    if event == "cbw":
        answer = bot.bulk_out(Cbw.for_command(2, TEST_UNIT_READY).build())
    elif event == "junk":
        answer = bot.bulk_out(b"\xff" * 13)
    elif event == "data":
        answer = bot.bulk_out(payload(512))
    elif event == "in":
        got = bot.bulk_in(512)
        answer = ("csw" if isinstance(got, bytes) and len(got) == CSW_LENGTH and got[:4] == b"USBS"
                  else "data" if isinstance(got, bytes) else got)
    elif event == "clear_in":
        bot.clear_halt(EP_IN)
    elif event == "clear_out":
        bot.clear_halt(EP_OUT)
    elif event == "set_in":
        bot.set_halt(EP_IN)
    elif event == "bus_reset":
        bot.bus_reset()
    else:
        bot.reset()
    want_answer, want_stage, want_in, want_out = EXPECTED[(stage, event)]
    assert answer == want_answer
    assert bot.stage is want_stage
    assert (bot.in_halted, bot.out_halted) == (want_in, want_out)


def test_stage_tables_cover_every_stage() -> None:
    for table in (BulkOnlyTransport._ON_BULK_OUT, BulkOnlyTransport._ON_BULK_IN,
                  BulkOnlyTransport._ON_CLEAR_HALT):
        assert set(table) == set(Stage)
    assert set(BulkOnlyTransport._ON_CASE) == set(Case)
    assert set(_CASE_LOG_LEVEL) == set(Case)


# --- streams split anywhere (Hypothesis) --------------------------------------------------------

pieces = st.lists(st.integers(1, 3000), max_size=40)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 20000), split=pieces, extra=st.integers(0, 700))
def test_write_data_split_anywhere_reaches_unit_intact(size: int, split: list[int], extra: int) -> None:
    unit = FakeUnit(Direction.OUT, size)
    bot = BulkOnlyTransport(unit)
    host_data = payload(size + extra)  # extra > 0: case 11, the excess is accepted and dropped
    outcome = host_command(bot, Cbw.for_command(0xAB, WRITE_10, size + extra), host_data,
                           out_pieces=split)
    assert outcome.csw == Csw(0xAB, extra, CswStatus.PASSED)
    assert unit.executed == [(WRITE_10, host_data[:size])]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 20000), split=pieces, missing=st.integers(0, 700))
def test_read_data_split_anywhere_reaches_host_intact(size: int, split: list[int], missing: int) -> None:
    data = payload(size)
    unit = FakeUnit(Direction.IN, size + missing, data)  # missing > 0: the unit has less (case 5)
    bot = BulkOnlyTransport(unit)
    outcome = host_command(bot, Cbw.for_command(0xCD, READ_10, size + missing, data_in=True),
                           in_pieces=split)
    assert outcome.data == data
    assert outcome.csw == Csw(0xCD, missing, CswStatus.PASSED)
    assert outcome.stalled_in == (1 if missing else 0)


def test_adapter_may_reuse_its_receive_buffer() -> None:
    # Case 11 with the unit's share arriving in one transfer: the transport must not keep a
    # reference to a buffer the adapter refills for the next transfer.
    unit = FakeUnit(Direction.OUT, 512)
    bot = BulkOnlyTransport(unit)
    assert bot.bulk_out(Cbw.for_command(1, WRITE_10, 1024).build())
    buffer = bytearray(payload(512))
    assert bot.bulk_out(buffer)
    buffer[:] = bytes(512)  # the adapter reads the next transfer into the same buffer
    assert bot.bulk_out(buffer)
    assert unit.executed == [(WRITE_10, payload(512))]
    assert Csw.parse(bot.bulk_in(13)) == Csw(1, 512, CswStatus.PASSED)  # type: ignore[arg-type]


def test_one_mebibyte_write_and_read_in_max_packet_pieces() -> None:
    size = 1 << 20
    data = payload(size)
    unit = FakeUnit(Direction.OUT, size)
    bot = BulkOnlyTransport(unit)
    outcome = host_command(bot, Cbw.for_command(1, WRITE_10, size), data, out_pieces=[512] * (size // 512))
    assert outcome.csw.status == CswStatus.PASSED and unit.executed[0][1] == data
    unit.direction, unit.data = Direction.IN, data
    outcome = host_command(bot, Cbw.for_command(2, READ_10, size, data_in=True), in_request=512)
    assert outcome.data == data and outcome.csw == Csw(2, 0, 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(CASES), min_size=1, max_size=12))
def test_command_sequences_keep_tags_and_stage(specs: list[CaseSpec]) -> None:
    unit = FakeUnit()
    bot = BulkOnlyTransport(unit)
    for tag, spec in enumerate(specs):
        unit.direction, unit.length = spec.direction, spec.device_length
        unit.data = payload(spec.device_length) if spec.direction is Direction.IN else b""
        cbw = Cbw.for_command(tag, READ_10, spec.host_length, data_in=spec.data_in)
        outcome = host_command(bot, cbw, payload(spec.host_length) if not spec.data_in else b"",
                               in_request=300, out_pieces=[333] * 10)
        assert outcome.csw.tag == tag and outcome.csw.status == spec.status
        assert bot.stage is Stage.COMMAND


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 1500), missing=st.integers(0, 40))
def test_one_byte_at_a_time_equals_whole(size: int, missing: int) -> None:
    """The same WRITE and READ fed in one transfer and one byte per transfer give the same result."""
    results = []
    for piece in (size + missing, 1):
        unit = FakeUnit(Direction.OUT, size)
        bot = BulkOnlyTransport(unit)
        written = host_command(bot, Cbw.for_command(1, WRITE_10, size + missing), payload(size + missing),
                               out_pieces=[piece] * (size + missing))
        unit.direction, unit.length, unit.data = Direction.IN, size + missing, payload(size)
        read = host_command(bot, Cbw.for_command(2, READ_10, size + missing, data_in=True),
                            in_request=piece)
        results.append((written.csw, unit.executed[0], read.csw, read.data, bot.status()["completed"]))
    assert results[0] == results[1]
    assert results[0][1] == (WRITE_10, payload(size))
    assert results[0][3] == payload(size)


# --- deferred execution: the adapter runs the command, ep0 stays free -----------------------------


def deferred_write(unit: FakeUnit, tag: int = 1) -> tuple[BulkOnlyTransport, Any]:
    """A deferred transport that received a whole WRITE: the command is with the executor."""
    unit.direction, unit.length = Direction.OUT, 1024
    bot = BulkOnlyTransport(unit, deferred=True)
    assert bot.bulk_out(Cbw.for_command(tag, WRITE_10, 1024).build())
    assert bot.take_command() is None  # nothing to run before the data phase ends
    assert bot.bulk_out(payload(1024))
    assert bot.stage is Stage.EXECUTING and unit.executed == []
    command = bot.take_command()
    assert command is not None and bot.take_command() is None  # handed out once
    return bot, command


def test_deferred_command_waits_for_the_executor_while_class_requests_answer() -> None:
    unit = FakeUnit()
    bot, command = deferred_write(unit)
    assert bot.bulk_in(CSW_LENGTH) is None  # the CSW request waits for the command
    assert bot.class_request(0xA1, 0xFE, 0, 1) == b"\x00"  # Get Max LUN while it waits
    result = bot.run(command)
    assert unit.executed == [(WRITE_10, payload(1024))] and bot.stage is Stage.EXECUTING
    assert bot.complete(command, result) is True
    assert Csw.parse(bot.bulk_in(CSW_LENGTH)) == Csw(1, 0, CswStatus.PASSED)  # type: ignore[arg-type]


def test_class_reset_during_execution_runs_the_write_once_and_sends_no_csw() -> None:
    unit = FakeUnit()
    bot, command = deferred_write(unit, tag=5)
    assert bot.class_request(0x21, 0xFF, 0, 0) == b""  # answered while the write runs
    assert bot.stage is Stage.COMMAND
    assert bot.complete(command, bot.run(command)) is False  # abandoned by the host
    assert unit.executed == [(WRITE_10, payload(1024))]  # landed, exactly once
    assert bot.bulk_in(CSW_LENGTH) is None  # no CSW for the abandoned command
    assert bot.status()["completed_after_reset"] == 1
    # the host's retry after reset recovery is a new command with its own CSW
    assert bot.bulk_out(Cbw.for_command(6, WRITE_10, 1024).build()) and bot.bulk_out(payload(1024))
    retry = bot.take_command()
    assert retry is not None and bot.complete(retry, bot.run(retry)) is True
    assert Csw.parse(bot.bulk_in(CSW_LENGTH)) == Csw(6, 0, CswStatus.PASSED)  # type: ignore[arg-type]
    assert len(unit.executed) == 2 and bot.status()["completed"] == 1


def test_a_command_after_the_reset_can_be_accepted_before_the_abandoned_one_ends() -> None:
    unit = FakeUnit()
    bot, old = deferred_write(unit, tag=1)
    bot.reset()
    unit.direction, unit.length = Direction.NONE, 0
    assert bot.bulk_out(Cbw.for_command(2, TEST_UNIT_READY).build())
    new = bot.take_command()
    assert new is not None and new is not old
    # the executor runs them in the order received; the old result must not answer the new CBW
    assert bot.complete(old, bot.run(old)) is False
    assert bot.stage is Stage.EXECUTING and bot.bulk_in(CSW_LENGTH) is None
    assert bot.complete(new, bot.run(new)) is True
    assert Csw.parse(bot.bulk_in(CSW_LENGTH)) == Csw(2, 0, CswStatus.PASSED)  # type: ignore[arg-type]


def test_usb_reset_tells_the_unit_before_the_next_command_never_during_one() -> None:
    unit = FakeUnit()
    bot, command = deferred_write(unit)
    bot.bus_reset()
    assert "reset_event" not in unit.calls  # the write still runs: the unit hears of the reset later
    bot.complete(command, bot.run(command))
    assert unit.calls == ["plan", "execute"]
    unit.direction, unit.length = Direction.NONE, 0
    bot.bus_reset()  # a second reset before any command: still one unit attention
    assert bot.bulk_out(Cbw.for_command(2, TEST_UNIT_READY).build())
    nxt = bot.take_command()
    assert nxt is not None
    bot.complete(nxt, bot.run(nxt))
    assert unit.calls == ["plan", "execute", "plan", "reset_event", "execute"]
    assert bot.status()["bus_resets"] == 2


def test_usb_reset_reaches_the_unit_in_inline_mode_too() -> None:
    unit = FakeUnit()
    bot = BulkOnlyTransport(unit)
    bot.bus_reset()
    host_command(bot, Cbw.for_command(1, TEST_UNIT_READY))
    host_command(bot, Cbw.for_command(2, TEST_UNIT_READY))
    assert unit.calls == ["plan", "reset_event", "execute", "plan", "execute"]


def test_phase_errors_never_reach_the_executor() -> None:
    unit = FakeUnit(Direction.IN, 512, payload(512))
    bot = BulkOnlyTransport(unit, deferred=True)
    assert bot.bulk_out(Cbw.for_command(1, READ_10, 0).build())  # case 2: host expects nothing
    assert bot.take_command() is None and bot.stage is Stage.STATUS
    assert Csw.parse(bot.bulk_in(CSW_LENGTH)).status == CswStatus.PHASE_ERROR  # type: ignore[arg-type]


def test_a_unit_that_raises_on_the_executor_gives_a_phase_error() -> None:
    unit = FakeUnit(raise_in="execute")
    bot, command = deferred_write(unit)
    assert bot.complete(command, bot.run(command)) is True
    assert Csw.parse(bot.bulk_in(CSW_LENGTH)).status == CswStatus.PHASE_ERROR  # type: ignore[arg-type]
    assert bot.status()["internal_errors"] == 1
