"""Reservations of one logical unit: SPC-4 persistent reservations and SPC-2 RESERVE/RELEASE.

One `Reservations` object belongs to a logical unit and is shared by every `ScsiTarget` that serves
it (the iSCSI server runs a pool of targets over one store), so it is thread-safe: one lock around
every change and every read of more than one field. It is sans-IO otherwise: no files, no clocks.

I_T nexus: a string naming the initiator port as the transport knows it. Over iSCSI it is the
initiator name and ISID in the SCSI TransportID form (`iqn.1994-05.com.example:host,i,0x23d000000001`,
SPC-4 7.6.4.6); USB has a single nexus, the empty string.

Persistent reservations (SPC-4 5.13): REGISTER, REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE,
CLEAR, PREEMPT and PREEMPT AND ABORT (served as PREEMPT: the preempted nexus's tasks are not
aborted); READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS. Every reservation
type of SPC-4 table 209 (write exclusive, exclusive access, their registrants-only and
all-registrants forms) is served for the logical unit scope. Not served: REGISTER AND MOVE,
SPEC_I_PT and ALL_TG_PT (the unit has one target port). No unit attentions are sent to other
registrants when a reservation is preempted, cleared or released.

APTPL (activate persist through power loss, SPC-4 5.13.5): with a `persist` callback the unit
reports PTPL_C=1, and once a REGISTER (or REGISTER AND IGNORE EXISTING KEY) came with APTPL=1 every
change of the registrations or the reservation is handed to `persist` (the encoded state, `encode`)
before the command completes; a REGISTER with APTPL=0 hands over b"" (nothing survives a power
loss). `persist` must store it crash-safely; when it fails the command fails and nothing changes.
`Reservations(saved=...)` starts from a stored state. Without `persist` the state lives in memory
only (PTPL_C=0) and a PERSISTENT RESERVE OUT with APTPL=1 is refused rather than accepted and then
forgotten.

SPC-2 reservations (RESERVE/RELEASE (6)/(10)): one nexus holds the whole unit; every other nexus
gets RESERVATION CONFLICT for everything except INQUIRY, REPORT LUNS, REQUEST SENSE, REPORT
SUPPORTED OPERATION CODES and RELEASE (which then does nothing). Released by RELEASE, by the loss
of the holder's nexus (`nexus_lost`) and by a logical unit or target reset (`reset`).
"""

from __future__ import annotations

import enum
import json
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from firmware.scsi.cdb import PROUT_PARAMETER_LIST_LENGTH
from firmware.scsi.opcodes import Opcode, PrInAction, PrOutAction
from firmware.scsi.sense import (
    Asc,
    CommandError,
    Sense,
    SenseKey,
    illegal_request,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)


class PrType(enum.IntEnum):
    """Persistent reservation types (SPC-4 table 209)."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8


_ALL_REGISTRANTS = frozenset({PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})
# types where every registered nexus has the holder's access (SPC-4 5.13.1 table 206)
_REGISTRANTS_ACCESS = _ALL_REGISTRANTS | {
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
}
# types under which a nexus without the holder's access may still read
_WRITE_EXCLUSIVE = frozenset({
    PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
})  # fmt: skip


class Access(enum.Enum):
    """How a command meets a reservation (SPC-4 table 207, SBC-3 table 13, simplified to three classes)."""

    ALLOWED = "allowed"  # served under any reservation: identification, sense, reservations themselves
    READ = "read"  # reads the medium or the unit's state
    WRITE = "write"  # changes the medium or the unit's state


_ALLOWED_OPCODES = frozenset({
    Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE, Opcode.TEST_UNIT_READY,
    Opcode.READ_CAPACITY_10, Opcode.SERVICE_ACTION_IN_16, Opcode.READ_FORMAT_CAPACITIES,
    Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT, Opcode.MAINTENANCE_IN,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL,
})  # fmt: skip
_READ_OPCODES = frozenset({
    Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16, Opcode.VERIFY_10, Opcode.VERIFY_12,
    Opcode.VERIFY_16, Opcode.PRE_FETCH_10, Opcode.PRE_FETCH_16, Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10,
    Opcode.READ_DEFECT_DATA_10, Opcode.READ_DEFECT_DATA_12,
})  # fmt: skip
# under an SPC-2 reservation held by another nexus, only these are served (SPC-2 5.5.1)
_SPC2_ALLOWED = frozenset({
    Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE, Opcode.MAINTENANCE_IN, Opcode.RELEASE_6,
    Opcode.RELEASE_10,
})  # fmt: skip


def access_of(opcode: int) -> Access:
    if opcode in _ALLOWED_OPCODES:
        return Access.ALLOWED
    if opcode in _READ_OPCODES:
        return Access.READ
    return Access.WRITE  # anything else, unknown opcodes included (they fail on their own anyway)


class ReservationConflict(Exception):
    """The command ends with status RESERVATION CONFLICT (no sense data)."""


@dataclass(frozen=True, slots=True)
class _Reservation:
    holder: str  # nexus that made it (for all-registrants types: any registrant holds it)
    pr_type: PrType


def _iscsi_transport_id(nexus: str) -> bytes:
    """TransportID of an iSCSI initiator port (SPC-4 7.6.4.6, format 01b), or a 24-byte
    "no specific protocol" one for a transport without initiator port names (USB)."""
    if ",i,0x" not in nexus:
        return bytes([0x0F]) + bytes(23)
    name = nexus.encode("utf-8") + b"\0"
    name += bytes(-len(name) % 4)
    if len(name) < 20:
        name += bytes(20 - len(name))
    return bytes([0x45, 0]) + len(name).to_bytes(2, "big") + name


class Reservations:
    """The reservation state of one logical unit (see the module docstring)."""

    def __init__(self, *, persist: Callable[[bytes], None] | None = None, saved: bytes = b"") -> None:
        self._lock = threading.Lock()
        self.generation = 0  # PRGENERATION (SPC-4 6.15.2): counts registrations changed
        self._keys: dict[str, int] = {}  # nexus -> registered reservation key
        self._reservation: _Reservation | None = None
        self._spc2_holder: str | None = None
        self._persist = persist
        self._aptpl = False  # the last REGISTER's APTPL bit (kept only with `persist`)
        self.active = False  # fast path: False when no reservation of either kind exists
        if saved:
            self._restore(saved)
            self._update_active()

    # ---- the persisted state (APTPL) ----------------------------------------------------------

    def encode(self) -> bytes:
        """The persistent reservation state as `saved` takes it back (SPC-2 reservations are not in it)."""
        with self._lock:
            return self._encode_locked()

    def _encode_locked(self) -> bytes:
        res = self._reservation
        state = {"version": 1, "aptpl": self._aptpl, "generation": self.generation,
                 "registrations": [[nexus, key] for nexus, key in self._keys.items()],
                 "reservation": None if res is None else {"holder": res.holder, "type": int(res.pr_type)}}
        return json.dumps(state, sort_keys=True).encode()

    def _restore(self, saved: bytes) -> None:
        """Load `encode()`'s output; ValueError names what is wrong with it."""
        try:
            state = json.loads(saved)
            if not isinstance(state, dict) or state.get("version") != 1:
                raise ValueError("not a reservation state of version 1")
            keys: dict[str, int] = {}
            for nexus, key in state["registrations"]:
                if not isinstance(nexus, str) or not isinstance(key, int) or not 0 < key < 1 << 64:
                    raise ValueError(f"bad registration {nexus!r}")
                keys[nexus] = key
            raw = state["reservation"]
            reservation = None
            if raw is not None:
                holder, pr_type = raw["holder"], PrType(raw["type"])
                if not isinstance(holder, str) or (pr_type not in _ALL_REGISTRANTS and holder not in keys):
                    raise ValueError("the reservation's holder is not registered")
                reservation = _Reservation(holder, pr_type)
            generation = state["generation"]
            if not isinstance(generation, int) or not isinstance(state["aptpl"], bool):
                raise ValueError("bad generation or aptpl")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"reservation state incomplete: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"reservation state is not JSON: {exc}") from None
        self._keys, self._reservation, self.generation = keys, reservation, generation
        self._aptpl = state["aptpl"]

    # ---- queries ------------------------------------------------------------------------------

    def check(self, nexus: str, opcode: int) -> None:
        """Raise `ReservationConflict` when `nexus` may not run `opcode` now. Call only when
        `active` is True (the per-command fast path checks that attribute first)."""
        with self._lock:
            holder = self._spc2_holder
            if holder is not None and holder != nexus and opcode not in _SPC2_ALLOWED:
                raise ReservationConflict()
            res = self._reservation
            if res is None:
                return
            access = access_of(opcode)
            if access is Access.ALLOWED or self._has_holder_access(nexus, res):
                return
            if opcode in (Opcode.RESERVE_6, Opcode.RESERVE_10, Opcode.RELEASE_6, Opcode.RELEASE_10):
                raise ReservationConflict()
            if access is Access.READ and res.pr_type in _WRITE_EXCLUSIVE:
                return
            raise ReservationConflict()

    def _has_holder_access(self, nexus: str, res: _Reservation) -> bool:
        if res.pr_type in _REGISTRANTS_ACCESS:
            return nexus in self._keys
        return res.holder == nexus

    def _is_holder(self, nexus: str, res: _Reservation) -> bool:
        if res.pr_type in _ALL_REGISTRANTS:
            return nexus in self._keys
        return res.holder == nexus

    def snapshot(self) -> dict[str, object]:
        """For status output: registrations, the reservation and the SPC-2 holder."""
        with self._lock:
            res = self._reservation
            return {
                "generation": self.generation,
                "registrations": len(self._keys),
                "reservation": None if res is None else {"holder": res.holder, "type": res.pr_type.name},
                "spc2_holder": self._spc2_holder,
            }

    # ---- PERSISTENT RESERVE IN ----------------------------------------------------------------

    def persistent_reserve_in(self, action: PrInAction) -> bytes:
        """The whole parameter data of a PERSISTENT RESERVE IN (the caller cuts it to the allocation
        length; ADDITIONAL LENGTH always tells the full length, SPC-4 6.15.2)."""
        with self._lock:
            gen = self.generation & 0xFFFFFFFF
            if action is PrInAction.READ_KEYS:
                keys = b"".join(k.to_bytes(8, "big") for k in self._keys.values())
                return struct.pack(">II", gen, len(keys)) + keys
            if action is PrInAction.READ_RESERVATION:
                res = self._reservation
                if res is None:
                    return struct.pack(">II", gen, 0)
                key = 0 if res.pr_type in _ALL_REGISTRANTS else self._keys.get(res.holder, 0)
                return struct.pack(">IIQ4xxBxx", gen, 16, key, int(res.pr_type))
            if action is PrInAction.REPORT_CAPABILITIES:
                # byte 2: CRH=0 SIP_C=0 ATP_C=0 PTPL_C=0; byte 3: TMV=1, ALLOW COMMANDS 0 (no
                # information); bytes 4-5: the type mask (SPC-4 6.15.4)
                # PTPL_C (byte 2 bit 0) when the state can be persisted, PTPL_A (byte 3 bit 0) once APTPL is on
                mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX
                ptpl_c = 0x01 if self._persist is not None else 0
                ptpl_a = 0x01 if self._aptpl else 0
                return struct.pack(">HBBBBH", 8, ptpl_c, 0x80 | ptpl_a, mask, 0x01, 0)  # byte 5: EX_AC_AR
            # READ FULL STATUS (SPC-4 6.15.5)
            res = self._reservation
            descriptors = []
            for nexus, key in self._keys.items():
                holds = res is not None and self._is_holder(nexus, res)
                scope_type = int(res.pr_type) if holds and res is not None else 0
                tid = _iscsi_transport_id(nexus)
                descriptors.append(struct.pack(">Q4xBBxxxxHI", key, 0x01 if holds else 0, scope_type, 1, len(tid)) + tid)
            body = b"".join(descriptors)
            return struct.pack(">II", gen, len(body)) + body

    # ---- PERSISTENT RESERVE OUT ---------------------------------------------------------------

    def persistent_reserve_out(self, nexus: str, action: PrOutAction, scope: int, pr_type: int, data: bytes) -> None:
        """Apply a PERSISTENT RESERVE OUT. Raises `CommandError` (bad CDB or parameter list) or
        `ReservationConflict`; nothing changes unless the command succeeds."""
        if action is PrOutAction.REGISTER_AND_MOVE:
            raise CommandError(invalid_field_in_cdb(1, 4))
        if len(data) != PROUT_PARAMETER_LIST_LENGTH:
            raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
        key, sa_key = struct.unpack_from(">QQ", data)
        flags = data[20]
        if flags & 0x08:  # SPEC_I_PT
            raise CommandError(invalid_field_in_parameter_list(20, 3))
        if flags & 0x04:  # ALL_TG_PT
            raise CommandError(invalid_field_in_parameter_list(20, 2))
        registering = action in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY)
        if flags & 0x01 and self._persist is None:  # APTPL without a place to keep the state: refused
            raise CommandError(invalid_field_in_parameter_list(20, 0))
        if flags & 0xF2 or data[21]:
            raise CommandError(invalid_field_in_parameter_list(20 if flags & 0xF2 else 21))
        needs_type = action in (PrOutAction.RESERVE, PrOutAction.RELEASE, PrOutAction.PREEMPT,
                                PrOutAction.PREEMPT_AND_ABORT)
        if needs_type:
            if scope != 0:  # LU_SCOPE only
                raise CommandError(invalid_field_in_cdb(2, 7))
            if pr_type not in PrType._value2member_map_:
                raise CommandError(invalid_field_in_cdb(2, 3))
        with self._lock:
            if self._spc2_holder is not None and self._spc2_holder != nexus:
                raise ReservationConflict()
            before = (dict(self._keys), self._reservation, self.generation, self._aptpl)
            try:
                self._apply_out(nexus, action, key, sa_key, pr_type)
                if registering and self._persist is not None:
                    # SPC-4 5.13.5: the APTPL bit of the last REGISTER decides (others ignore it)
                    self._aptpl = bool(flags & 0x01)
                if self._persist is not None and (self._aptpl or before[3]) and (
                        (dict(self._keys), self._reservation, self.generation, self._aptpl) != before):
                    self._persist(self._encode_locked() if self._aptpl else b"")
            except OSError as exc:
                self._keys, self._reservation, self.generation, self._aptpl = before
                raise CommandError(Sense.of(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)) from exc
            except BaseException:
                self._keys, self._reservation, self.generation, self._aptpl = before
                raise
            finally:
                self._update_active()

    def _apply_out(self, nexus: str, action: PrOutAction, key: int, sa_key: int, pr_type: int) -> None:
        if action in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
            self._register(nexus, key, sa_key, ignore=action is PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY)
        else:
            if self._keys.get(nexus) != key:  # not registered, or another key
                raise ReservationConflict()
            if action is PrOutAction.RESERVE:
                self._reserve(nexus, PrType(pr_type))
            elif action is PrOutAction.RELEASE:
                self._release(nexus, PrType(pr_type))
            elif action is PrOutAction.CLEAR:
                self._keys.clear()
                self._reservation = None
                self.generation += 1
            else:
                self._preempt(nexus, sa_key, PrType(pr_type))

    def _register(self, nexus: str, key: int, sa_key: int, *, ignore: bool) -> None:
        current = self._keys.get(nexus)
        if not ignore and (key != (current or 0)):
            raise ReservationConflict()
        if sa_key == 0:
            if current is None:
                return  # unregistering what is not registered: nothing to do (SPC-4 5.13.11.2.3)
            self._unregister(nexus)
        else:
            self._keys[nexus] = sa_key
        self.generation += 1

    def _unregister(self, nexus: str) -> None:
        del self._keys[nexus]
        res = self._reservation
        if res is None:
            return
        if res.pr_type in _ALL_REGISTRANTS:
            if not self._keys:  # the last registrant gone: so is the reservation (SPC-4 5.13.11.2.2)
                self._reservation = None
        elif res.holder == nexus:
            self._reservation = None

    def _reserve(self, nexus: str, pr_type: PrType) -> None:
        res = self._reservation
        if res is None:
            self._reservation = _Reservation(nexus, pr_type)
            return
        if self._is_holder(nexus, res) and res.pr_type == pr_type:
            return  # the holder reserving again with the same type: nothing changes
        raise ReservationConflict()

    def _release(self, nexus: str, pr_type: PrType) -> None:
        res = self._reservation
        if res is None or not self._is_holder(nexus, res):
            return  # SPC-4 5.13.11.2.2: not an error, nothing released
        if res.pr_type != pr_type:
            raise CommandError(Sense.of(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION))
        self._reservation = None

    def _preempt(self, nexus: str, sa_key: int, pr_type: PrType) -> None:
        """SPC-4 5.13.11.4: remove the registrations with key `sa_key`; when they held the reservation
        (or `sa_key` is 0 under an all-registrants one), the preempting nexus takes it with `pr_type`."""
        res = self._reservation
        all_registrants = res is not None and res.pr_type in _ALL_REGISTRANTS
        if all_registrants and sa_key == 0:
            victims = [n for n in self._keys if n != nexus]
            takes_over = True
        else:
            if sa_key == 0:
                raise CommandError(invalid_field_in_parameter_list(8))
            takes_over = res is not None and not all_registrants and self._keys.get(res.holder) == sa_key
            victims = [n for n, k in self._keys.items() if k == sa_key and not (takes_over and n == nexus)]
            if not victims and not takes_over:
                raise ReservationConflict()
        for other in victims:
            del self._keys[other]
        if takes_over:
            self._reservation = _Reservation(nexus, pr_type)
        elif res is not None and (not self._keys or (not all_registrants and res.holder not in self._keys)):
            self._reservation = None
        self.generation += 1

    # ---- SPC-2 RESERVE / RELEASE --------------------------------------------------------------

    def reserve_unit(self, nexus: str) -> None:
        with self._lock:
            if self._spc2_holder not in (None, nexus):
                raise ReservationConflict()
            if self._reservation is not None or self._keys:
                raise ReservationConflict()  # CRH=0: persistent reservations exclude RESERVE
            self._spc2_holder = nexus
            self._update_active()

    def release_unit(self, nexus: str) -> None:
        with self._lock:
            if self._reservation is not None:
                res = self._reservation
                if not self._has_holder_access(nexus, res):
                    raise ReservationConflict()
            if self._spc2_holder == nexus:
                self._spc2_holder = None
            self._update_active()

    # ---- transport events ---------------------------------------------------------------------

    def nexus_lost(self, nexus: str) -> None:
        """The transport lost `nexus` (logout, dropped connection): its SPC-2 reservation ends;
        persistent registrations stay (that is what makes them persistent)."""
        with self._lock:
            if self._spc2_holder == nexus:
                self._spc2_holder = None
                self._update_active()

    def reset(self) -> None:
        """A logical unit reset or a target reset: SPC-2 reservations end (SAM-5 6.3.3)."""
        with self._lock:
            self._spc2_holder = None
            self._update_active()

    def _update_active(self) -> None:
        self.active = self._spc2_holder is not None or self._reservation is not None
