"""Persistent reservations (PERSISTENT RESERVE IN/OUT) and SPC-2 RESERVE/RELEASE over the ScsiTarget,
with two I_T nexuses as the iSCSI server presents them (two targets of one unit sharing its state)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from firmware.logical_unit import CommandResult, Status
from firmware.scsi import ScsiTarget
from firmware.scsi.reservations import PrType, Reservations
from firmware.scsi.sense import Sense
from firmware.scsi.shared import SharedUnit
from host_tests.scsi_fakes import MemoryBlockStore
from host_tests.scsi_support import NAA3_ID, rw10

A = "iqn.2026-01.com.example:a,i,0x23d000000001"
B = "iqn.2026-01.com.example:b,i,0x23d000000002"
ILLEGAL, CONFLICT = 0x05, Status.RESERVATION_CONFLICT
INVALID_CDB, INVALID_PARAM, LIST_LENGTH = 0x24, 0x26, 0x1A

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE, REGISTER_MOVE = range(8)
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)


class Unit:
    """Two targets over one store and one SharedUnit, each command sent as a given nexus."""

    def __init__(self, shared: SharedUnit | None = None) -> None:
        self.store = MemoryBlockStore(block_size=512, num_blocks=1024)
        self.shared = shared if shared is not None else SharedUnit()
        self.targets = [ScsiTarget(self.store, serial="UM0001", device_id=NAA3_ID, shared=self.shared) for _ in range(2)]
        self._next = 0

    def run(self, nexus: str, cdb: bytes, data_out: bytes = b"") -> tuple[CommandResult, Sense]:
        target = self.targets[self._next]
        self._next ^= 1  # alternate: the state must not live in one target
        target.plan(cdb)
        result = target.execute(cdb, data_out, nexus)
        return result, target.sense

    def good(self, nexus: str, cdb: bytes, data_out: bytes = b"") -> bytes:
        result, sense = self.run(nexus, cdb, data_out)
        assert result.status == Status.GOOD, f"{cdb.hex()} from {nexus}: {result.status!r} {sense.label}"
        return result.data

    def conflict(self, nexus: str, cdb: bytes, data_out: bytes = b"") -> None:
        result, _ = self.run(nexus, cdb, data_out)
        assert result.status == CONFLICT, f"{cdb.hex()} from {nexus}: {result.status!r}"
        assert result.data == b""

    def check(self, nexus: str, cdb: bytes, asc: int, ascq: int = 0, data_out: bytes = b"", key: int = ILLEGAL) -> Sense:
        result, sense = self.run(nexus, cdb, data_out)
        assert result.status == Status.CHECK_CONDITION, f"{cdb.hex()}: {result.status!r}"
        assert (sense.key, sense.asc, sense.ascq) == (key, asc, ascq), sense.label
        return sense

    # PERSISTENT RESERVE OUT / IN helpers
    def prout(self, nexus: str, action: int, key: int = 0, sa_key: int = 0, pr_type: int = 0, flags: int = 0,
              expect: str = "good") -> None:
        cdb, data = prout(action, key, sa_key, pr_type, flags)
        if expect == "good":
            self.good(nexus, cdb, data)
        else:
            self.conflict(nexus, cdb, data)

    def keys(self, nexus: str = A) -> tuple[int, list[int]]:
        data = self.good(nexus, prin(READ_KEYS))
        gen, length = struct.unpack_from(">II", data)
        return gen, [int.from_bytes(data[8 + i : 16 + i], "big") for i in range(0, length, 8)]

    def reservation(self, nexus: str = A) -> tuple[int, int] | None:
        data = self.good(nexus, prin(READ_RESERVATION))
        if struct.unpack_from(">I", data, 4)[0] == 0:
            return None
        return int.from_bytes(data[8:16], "big"), data[21] & 0x0F


def prin(action: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BB5xHB", 0x5E, action, alloc, 0)


def prout(action: int, key: int = 0, sa_key: int = 0, pr_type: int = 0, flags: int = 0,
          scope: int = 0, length: int = 24) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBB2xIB", 0x5F, action, (scope << 4) | pr_type, length, 0)
    data = struct.pack(">QQ4xBx2x", key, sa_key, flags)
    return cdb, data[:length].ljust(length, b"\0")


READ = rw10(0x28, 0, 1)
WRITE = rw10(0x2A, 0, 1)
BLOCK = b"\x5a" * 512


# ---- registration -------------------------------------------------------------------------------


def test_register_reregister_and_unregister() -> None:
    u = Unit()
    gen0, keys = u.keys()
    assert keys == []
    u.prout(A, REGISTER_IGNORE, sa_key=0x1111)
    assert u.keys() == (gen0 + 1, [0x1111])
    # REGISTER with a reservation key that is not the registered one: conflict, nothing changes
    u.prout(A, REGISTER, key=0, sa_key=0x2222, expect="conflict")
    u.prout(A, REGISTER, key=0x1111, sa_key=0x3333)  # the right key changes it
    assert u.keys()[1] == [0x3333]
    u.prout(A, REGISTER, key=0x3333, sa_key=0)  # unregister
    assert u.keys() == (gen0 + 3, [])
    # an unregistered nexus naming a key is refused; unregistering what is not there is a no-op
    u.prout(B, REGISTER, key=0x1234, sa_key=0x5, expect="conflict")
    u.prout(B, REGISTER, key=0, sa_key=0)
    assert u.keys() == (gen0 + 3, [])


def test_read_keys_truncated_keeps_the_additional_length() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=7)
    u.prout(B, REGISTER_IGNORE, sa_key=8)
    data = u.good(A, prin(READ_KEYS, alloc=8))
    assert len(data) == 8 and struct.unpack(">II", data)[1] == 16


def test_each_target_of_the_unit_sees_the_same_registrations() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=9)
    for target in u.targets:
        target.plan(prin(READ_KEYS))
        assert target.execute(prin(READ_KEYS), b"", B).data[8:16] == (9).to_bytes(8, "big")


# ---- reservations and access ---------------------------------------------------------------------

# type -> (registered B can read, can write, unregistered B can read, can write), SPC-4 table 206
ACCESS = {
    PrType.EXCLUSIVE_ACCESS: (False, False, False, False),
    PrType.WRITE_EXCLUSIVE: (True, False, True, False),
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: (True, True, True, False),
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: (True, True, True, False),
}


@pytest.mark.parametrize("pr_type", list(ACCESS))
def test_reservation_type_decides_who_reads_and_writes(pr_type: PrType) -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=0xA)
    u.prout(B, REGISTER_IGNORE, sa_key=0xB)
    u.prout(A, RESERVE, key=0xA, pr_type=pr_type)
    all_registrants = pr_type in (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    assert u.reservation() == (0 if all_registrants else 0xA, pr_type)
    u.good(A, READ)
    u.good(A, WRITE, BLOCK)
    reg_read, reg_write, unreg_read, unreg_write = ACCESS[pr_type]
    for allowed, cdb, data in ((reg_read, READ, b""), (reg_write, WRITE, BLOCK)):
        (u.good if allowed else u.conflict)(B, cdb, data)
    u.prout(B, REGISTER, key=0xB, sa_key=0)
    for allowed, cdb, data in ((unreg_read, READ, b""), (unreg_write, WRITE, BLOCK)):
        (u.good if allowed else u.conflict)(B, cdb, data)
    # identification, sense and the reservation commands themselves are never in conflict
    u.good(B, bytes([0x12, 0, 0, 0, 36, 0]))
    u.good(B, bytes([0x00] * 6))
    u.good(B, prin(READ_RESERVATION))
    u.prout(A, RELEASE, key=0xA, pr_type=pr_type)
    assert u.reservation() is None
    u.good(B, WRITE, BLOCK)


def test_a_conflict_leaves_no_sense_and_is_counted() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    u.conflict(B, WRITE, BLOCK)
    assert u.store.read(0, 1) == bytes(512)  # the write did not happen
    errors = u.targets[0].status()["errors"] | u.targets[1].status()["errors"]  # type: ignore[operator]
    assert "RESERVATION_CONFLICT" in errors


def test_unregistering_the_holder_ends_its_reservation_but_not_an_all_registrants_one() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(B, REGISTER_IGNORE, sa_key=2)
    u.prout(A, RESERVE, key=1, pr_type=PrType.WRITE_EXCLUSIVE)
    u.prout(A, REGISTER, key=1, sa_key=0)
    assert u.reservation() is None
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(A, RESERVE, key=1, pr_type=PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    u.prout(A, REGISTER, key=1, sa_key=0)
    assert u.reservation() == (0, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    u.prout(B, RELEASE, key=2, pr_type=PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS)
    assert u.reservation() is None


def test_reserve_needs_the_registered_key_and_a_second_reserve_conflicts() -> None:
    u = Unit()
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS, expect="conflict")  # not registered
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(B, REGISTER_IGNORE, sa_key=2)
    u.prout(A, RESERVE, key=5, pr_type=PrType.EXCLUSIVE_ACCESS, expect="conflict")  # wrong key
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)  # the holder again, same type: fine
    u.prout(A, RESERVE, key=1, pr_type=PrType.WRITE_EXCLUSIVE, expect="conflict")
    u.prout(B, RESERVE, key=2, pr_type=PrType.EXCLUSIVE_ACCESS, expect="conflict")
    u.prout(B, RELEASE, key=2, pr_type=PrType.EXCLUSIVE_ACCESS)  # not the holder: nothing released
    assert u.reservation() == (1, PrType.EXCLUSIVE_ACCESS)


def test_release_with_another_type_is_an_invalid_release() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    cdb, data = prout(RELEASE, key=1, pr_type=PrType.WRITE_EXCLUSIVE)
    u.check(A, cdb, 0x26, 0x04, data_out=data)
    assert u.reservation() == (1, PrType.EXCLUSIVE_ACCESS)


def test_clear_removes_everything_and_counts_one_generation() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(B, REGISTER_IGNORE, sa_key=2)
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    gen, _ = u.keys()
    u.prout(B, CLEAR, key=5, expect="conflict")  # wrong key
    u.prout(B, CLEAR, key=2)
    assert u.keys() == (gen + 1, [])
    assert u.reservation() is None


def test_preempt_removes_a_registration_without_a_reservation() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(B, REGISTER_IGNORE, sa_key=2)
    gen, _ = u.keys()
    u.prout(B, PREEMPT, key=2, sa_key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    assert u.keys() == (gen + 1, [2])
    assert u.reservation() is None
    u.prout(B, PREEMPT, key=2, sa_key=99, pr_type=PrType.EXCLUSIVE_ACCESS, expect="conflict")  # no such key


def test_preempt_of_the_holder_takes_the_reservation() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(B, REGISTER_IGNORE, sa_key=2)
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS)
    u.prout(B, PREEMPT_ABORT, key=2, sa_key=1, pr_type=PrType.WRITE_EXCLUSIVE)
    assert u.reservation() == (2, PrType.WRITE_EXCLUSIVE)
    assert u.keys()[1] == [2]
    u.conflict(A, WRITE, BLOCK)
    u.good(A, READ)


def test_preempt_with_key_zero_under_all_registrants_takes_over() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.prout(B, REGISTER_IGNORE, sa_key=2)
    u.prout(A, RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    u.prout(B, PREEMPT, key=2, sa_key=0, pr_type=PrType.EXCLUSIVE_ACCESS)
    assert u.keys()[1] == [2]
    assert u.reservation() == (2, PrType.EXCLUSIVE_ACCESS)
    # without an all-registrants reservation a zero key names nobody
    cdb, data = prout(PREEMPT, key=2, sa_key=0, pr_type=PrType.EXCLUSIVE_ACCESS)
    sense = u.check(B, cdb, INVALID_PARAM, data_out=data)
    assert sense.field_pointer is not None and sense.field_pointer.byte == 8


# ---- PERSISTENT RESERVE IN data -------------------------------------------------------------------


def test_report_capabilities_and_read_full_status() -> None:
    u = Unit()
    caps = u.good(A, prin(REPORT_CAPABILITIES))
    length, b2, b3, mask = struct.unpack_from(">HBBH", caps)
    assert length == 8 and len(caps) == 8
    assert b2 & 0x01 == 0  # PTPL_C=0: nothing survives power loss, and APTPL is refused (below)
    assert b3 & 0x80  # TMV
    assert mask == 0xEA01  # WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX | EX_AC_AR
    u.prout(A, REGISTER_IGNORE, sa_key=0x77)
    u.prout(A, RESERVE, key=0x77, pr_type=PrType.WRITE_EXCLUSIVE)
    u.prout(B, REGISTER_IGNORE, sa_key=0x88)
    full = u.good(A, prin(READ_FULL_STATUS))
    assert struct.unpack_from(">I", full, 4)[0] == len(full) - 8
    at, seen = 8, {}
    while at < len(full):
        key = int.from_bytes(full[at : at + 8], "big")
        holder, scope_type = full[at + 12] & 0x01, full[at + 13]
        tid_len = int.from_bytes(full[at + 20 : at + 24], "big")
        tid = full[at + 24 : at + 24 + tid_len]
        assert tid[0] == 0x45 and tid_len % 4 == 0  # iSCSI, initiator port format
        name = tid[4:].rstrip(b"\0").decode()
        seen[name] = (key, holder, scope_type)
        at += 24 + tid_len
    assert seen == {A: (0x77, 1, PrType.WRITE_EXCLUSIVE), B: (0x88, 0, 0)}


@pytest.mark.parametrize("action", [4, 5, 0x10, 0x1F])
def test_persistent_reserve_in_unknown_service_action(action: int) -> None:
    u = Unit()
    sense = u.check(A, prin(action), INVALID_CDB)
    assert sense.field_pointer is not None and sense.field_pointer.byte == 1


# ---- bad PERSISTENT RESERVE OUT ---------------------------------------------------------------------


def test_persistent_reserve_out_bad_parameter_lists() -> None:
    u = Unit()
    cdb, data = prout(REGISTER_IGNORE, sa_key=1, length=20)
    u.check(A, cdb, LIST_LENGTH, data_out=data)
    for flags, bit in ((0x01, 0), (0x04, 2), (0x08, 3)):  # APTPL, ALL_TG_PT, SPEC_I_PT
        cdb, data = prout(REGISTER_IGNORE, sa_key=1, flags=flags)
        sense = u.check(A, cdb, INVALID_PARAM, data_out=data)
        assert sense.field_pointer is not None and (sense.field_pointer.byte, sense.field_pointer.bit) == (20, bit)
    assert u.keys()[1] == []  # nothing was registered by a refused command


def test_a_parameter_list_longer_than_any_offered_is_refused_before_its_data_phase() -> None:
    # a 4 GiB parameter list: the plan asks for no data (a transport discards the host's bytes
    # instead of keeping them) and the command fails with PARAMETER LIST LENGTH ERROR
    u = Unit()
    for length in (25, 1 << 20, 0xFFFFFFFF):
        cdb = struct.pack(">BBB2xIB", 0x5F, REGISTER_IGNORE, 0, length, 0)
        target = u.targets[0]
        plan = target.plan(cdb)
        assert plan.length == 0, (length, plan)
        result = target.execute(cdb, b"", A)
        assert result.status == Status.CHECK_CONDITION
        assert (target.sense.key, target.sense.asc) == (ILLEGAL, LIST_LENGTH), target.sense.label
    assert u.keys()[1] == []


def test_persistent_reserve_out_bad_cdbs() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    cdb, data = prout(RESERVE, key=1, pr_type=PrType.EXCLUSIVE_ACCESS, scope=1)  # element scope
    u.check(A, cdb, INVALID_CDB, data_out=data)
    cdb, data = prout(RESERVE, key=1, pr_type=2)  # type 2 is obsolete
    u.check(A, cdb, INVALID_CDB, data_out=data)
    cdb, data = prout(REGISTER_MOVE, key=1, sa_key=2)
    u.check(A, cdb, INVALID_CDB, data_out=data)
    u.check(A, struct.pack(">BBB2xIB", 0x5F, 0x08, 0, 24, 0), INVALID_CDB, data_out=bytes(24))
    u.check(A, struct.pack(">BBB2xIB", 0x5F, 0x20, 0, 24, 0), INVALID_CDB, data_out=bytes(24))  # reserved bit
    assert u.reservation() is None


# ---- SPC-2 RESERVE / RELEASE --------------------------------------------------------------------------

RESERVE6, RELEASE6 = bytes([0x16, 0, 0, 0, 0, 0]), bytes([0x17, 0, 0, 0, 0, 0])
RESERVE10, RELEASE10 = bytes([0x56]) + bytes(9), bytes([0x57]) + bytes(9)
MODE_SENSE6 = bytes([0x1A, 0, 0x3F, 0, 255, 0])


@pytest.mark.parametrize(("reserve", "release"), [(RESERVE6, RELEASE6), (RESERVE10, RELEASE10)])
def test_reserve_release_excludes_other_nexuses(reserve: bytes, release: bytes) -> None:
    u = Unit()
    u.good(A, reserve)
    u.good(A, reserve)  # the holder again
    u.conflict(B, reserve)
    u.good(B, release)  # not the holder: GOOD, nothing released
    u.conflict(B, MODE_SENSE6)
    u.conflict(B, READ)
    u.conflict(B, prin(READ_KEYS))
    u.good(B, bytes([0x12, 0, 0, 0, 36, 0]))  # INQUIRY is served
    u.good(A, MODE_SENSE6)
    u.good(A, release)
    u.good(B, reserve)
    u.good(B, release)


def test_reserve_ends_with_the_nexus_and_with_a_reset() -> None:
    u = Unit()
    u.good(A, RESERVE6)
    u.shared.reservations.nexus_lost(B)  # another nexus going away changes nothing
    u.conflict(B, READ)
    u.shared.reservations.nexus_lost(A)
    u.good(B, RESERVE6)
    u.shared.reservations.reset()
    u.good(A, READ)
    u.good(A, RESERVE6)


def test_reserve_is_refused_while_persistent_reservations_exist() -> None:
    u = Unit()
    u.prout(A, REGISTER_IGNORE, sa_key=1)
    u.conflict(A, RESERVE6)
    u.prout(A, RESERVE, key=1, pr_type=PrType.WRITE_EXCLUSIVE)
    u.conflict(B, RESERVE6)
    u.conflict(B, RELEASE6)


@pytest.mark.parametrize("cdb", [bytes([0x16, 0x01, 0, 0, 0, 0]), bytes([0x16, 0x10, 0, 0, 0, 0]),
                                 bytes([0x56, 0x10]) + bytes(8), bytes([0x56, 0, 0, 0, 0, 0, 0, 0, 8, 0])])
def test_third_party_and_extent_reservations_are_refused(cdb: bytes) -> None:
    u = Unit()
    u.check(A, cdb, INVALID_CDB)


def test_usb_has_one_nexus_and_is_never_in_conflict_with_itself() -> None:
    u = Unit()
    u.good("", RESERVE6)
    u.good("", WRITE, BLOCK)
    u.good("", RELEASE6)
    u.prout("", REGISTER_IGNORE, sa_key=3)
    u.prout("", RESERVE, key=3, pr_type=PrType.EXCLUSIVE_ACCESS)
    u.good("", WRITE, BLOCK)
    full = u.good("", prin(READ_FULL_STATUS))
    assert full[8 + 24] == 0x0F  # a TransportID of no specific protocol


# ---- APTPL: persist through power loss --------------------------------------------------------------


def test_aptpl_persists_registrations_and_the_reservation_and_they_come_back() -> None:
    stored: list[bytes] = []
    u = Unit(SharedUnit(reservations=Reservations(persist=stored.append)))
    caps = u.good(A, prin(REPORT_CAPABILITIES))
    assert caps[2] & 0x01 and not caps[3] & 0x01  # PTPL_C=1, PTPL_A=0
    u.prout(A, REGISTER_IGNORE, sa_key=0x77)
    assert stored == []  # APTPL not asked for: nothing is written
    u.prout(A, REGISTER_IGNORE, sa_key=0x77, flags=0x01)  # APTPL=1
    u.prout(A, RESERVE, key=0x77, pr_type=PrType.WRITE_EXCLUSIVE)
    u.prout(B, REGISTER_IGNORE, sa_key=0x88)  # B's register has APTPL=0: persisting stops
    assert stored[-1] == b""
    u.prout(B, REGISTER, key=0x88, sa_key=0x88, flags=0x01)  # and again on
    assert u.good(A, prin(REPORT_CAPABILITIES))[3] & 0x01  # PTPL_A=1
    # a power cut: a new unit from what was stored
    again = Unit(SharedUnit(reservations=Reservations(persist=stored.append, saved=stored[-1])))
    assert sorted(again.keys()[1]) == [0x77, 0x88]
    assert again.reservation() == (0x77, PrType.WRITE_EXCLUSIVE)
    again.conflict(B, rw10(0x2A, 0, 1), data_out=bytes(512))  # the reservation holds after the restart
    again.good(A, rw10(0x2A, 0, 1), data_out=bytes(512))


def test_aptpl_a_failed_store_fails_the_command_and_changes_nothing() -> None:
    def broken(state: bytes) -> None:
        raise OSError(28, "No space left on device")

    u = Unit(SharedUnit(reservations=Reservations(persist=broken)))
    cdb, data = prout(REGISTER_IGNORE, sa_key=0x55, flags=0x01)
    u.check(A, cdb, 0x44, key=0x04, data_out=data)  # HARDWARE ERROR, INTERNAL TARGET FAILURE
    assert u.keys()[1] == []
    assert not u.good(A, prin(REPORT_CAPABILITIES))[3] & 0x01


def test_a_damaged_reservation_state_is_refused_with_the_reason() -> None:
    for bad in (b"{", b'{"version": 2}', b'{"version": 1, "aptpl": true, "generation": 1, "registrations": [], '
                b'"reservation": {"holder": "nobody", "type": 1}}'):
        with pytest.raises(ValueError, match=r"reservation state|holder|version"):
            Reservations(persist=lambda s: None, saved=bad)


def test_the_local_unit_keeps_the_aptpl_state_in_its_state_dir(tmp_path: Path) -> None:
    from firmware.config import UsageError
    from firmware.local_main import _shared_unit

    u = Unit(_shared_unit(tmp_path))
    u.prout(A, REGISTER_IGNORE, sa_key=0x99, flags=0x01)
    u.prout(A, RESERVE, key=0x99, pr_type=PrType.EXCLUSIVE_ACCESS)
    assert (tmp_path / "reservations.json").exists()
    again = Unit(_shared_unit(tmp_path))  # the unit restarted
    assert again.reservation() == (0x99, PrType.EXCLUSIVE_ACCESS)
    again.prout(A, REGISTER, key=0x99, sa_key=0x99)  # APTPL=0: the stored state goes
    assert not (tmp_path / "reservations.json").exists()
    (tmp_path / "reservations.json").write_bytes(b"garbage")
    with pytest.raises(UsageError, match=r"reservations\.json is damaged"):
        _shared_unit(tmp_path)
