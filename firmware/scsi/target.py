"""`ScsiTarget`: the SBC-3 block target the host talks to, over any `BlockStore`.

Sans-IO: it is handed a CDB (and the DATA-OUT bytes) by a transport (`gadget/bot.py`), checks it in
one place (`firmware.scsi.cdb.check_command`), calls the store, and returns status and DATA-IN
bytes. It never raises: a bad CDB, a store failure or a bug in this module becomes CHECK CONDITION
with sense data kept for REQUEST SENSE.

Durability (docs/ARCHITECTURE.md, "Contracts"): WRITE with FUA calls `store.write(fua=True)`; SYNCHRONIZE CACHE calls
`store.flush()` and returns only after it, even with IMMED set (returning later than the host
allowed is always permitted, returning before the data is durable never is). The caching mode page
reports `store.write_cache` as it is at that moment: the host is told the truth about WCE.

Unit attention (SPC-4 5.14, SAM-5 5.14): conditions wait in a small queue and each is reported
once, as CHECK CONDITION of the next command other than INQUIRY, REPORT LUNS and REQUEST SENSE, or
by a REQUEST SENSE that has no other sense to return. `reset_event()` (the transport saw a USB
reset, a new configuration, the host re-enumerating) queues POWER ON, RESET, OR BUS DEVICE RESET
OCCURRED (29h/00) in place of anything queued before it; `capacity_changed()` (the store's size
changed) takes the new size and queues CAPACITY DATA HAS CHANGED (2Ah/09);
`write_protect_changed()` (the store started or stopped refusing writes) takes `store.read_only` and
queues MODE PARAMETERS CHANGED (2Ah/01), so the host re-reads the WP bit. Construction raises
none: the transport reports the power-on with its first `reset_event()`, when the host configures
the device.

Threads: `plan()` may run on the transport's receiving thread while `execute()` of an earlier,
abandoned command still runs on its executor; `plan()` only reads fixed state and publishes its
decoding with one assignment, which `execute()` uses only for the very same CDB bytes.

What it does not do: USB (stalls, residues, phase errors are the transport's), journaling or
replication (the store's), task management (BOT has none beyond reset).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status
from firmware.scsi import pages, supported_opcodes
from firmware.scsi.cdb import (
    Command,
    CompareAndWrite,
    Inquiry,
    Limits,
    ModeSelect,
    ModeSense,
    PersistentReserveIn,
    PersistentReserveOut,
    PreFetch,
    PreventAllowMediumRemoval,
    ReadCapacity10,
    ReadCapacity16,
    ReadFormatCapacities,
    ReadWrite,
    ReportLuns,
    ReportSupportedOpcodes,
    RequestSense,
    ReserveRelease,
    StartStopUnit,
    SynchronizeCache,
    TestUnitReady,
    Unmap,
    Verify,
    WriteAndVerify,
    WriteSame,
    check_command,
)
from firmware.scsi.opcodes import OPCODE_NAMES, Opcode, opcode_name
from firmware.scsi.reservations import ReservationConflict
from firmware.scsi.sense import (
    FIXED_SENSE_LENGTH,
    NO_SENSE,
    Asc,
    CommandError,
    Sense,
    SenseKey,
    illegal_request,
    invalid_field_in_parameter_list,
)
from firmware.scsi.shared import SharedUnit
from firmware.storage import BlockStore, StorageError

log = logging.getLogger(__name__)

# Advertised maximum transfer (VPD B0). Linux caps usb-storage at 120 KiB by default; a bigger
# ceiling only lets hosts that raise max_sectors send bigger commands.
DEFAULT_MAX_TRANSFER_BYTES = 1 << 20
DEFAULT_MAX_UNMAP_BLOCKS = 0x40_0000
DEFAULT_MAX_UNMAP_DESCRIPTORS = 64
DEFAULT_MAX_WRITE_SAME_BLOCKS = 0x1_0000
MAX_COMPARE_AND_WRITE_BLOCKS = 255  # the CDB's field is one byte

_UNMAP_HEADER = 8
_UNMAP_DESCRIPTOR = 16

# SPC-4 5.14 / SAM-5 5.14: these are served even while a unit attention is pending.
_UA_EXEMPT = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})

_NONE = CommandPlan(Direction.NONE, 0)
_GOOD = CommandResult(Status.GOOD)
_CHECK = CommandResult(Status.CHECK_CONDITION)
_CONFLICT = CommandResult(Status.RESERVATION_CONFLICT)

_WRITE_PROTECTED = Sense.of(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
_INTERNAL_FAILURE = Sense.of(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
_DATA_PHASE_ERROR = Sense.of(SenseKey.ABORTED_COMMAND, Asc.DATA_PHASE_ERROR)
_LBA_OUT_OF_RANGE = Sense.of(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)
_RESET_OCCURRED = Sense.of(SenseKey.UNIT_ATTENTION, Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)
_CAPACITY_CHANGED = Sense.of(SenseKey.UNIT_ATTENTION, Asc.CAPACITY_DATA_HAS_CHANGED)
_MODE_CHANGED = Sense.of(SenseKey.UNIT_ATTENTION, Asc.MODE_PARAMETERS_CHANGED)


def _size_bucket(nbytes: int) -> int:
    """Transfer-size histogram bucket: the byte count rounded up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


class ScsiTarget:
    """One SCSI direct-access logical unit (LUN 0) implementing `firmware.logical_unit.LogicalUnit`."""

    def __init__(
        self,
        store: BlockStore,
        *,
        vendor: str = "USBMIRR ",
        product: str = "usbmirror disk",
        revision: str = "0.1",
        serial: str,
        device_id: bytes,
        max_transfer_blocks: int | None = None,
        max_unmap_blocks: int = DEFAULT_MAX_UNMAP_BLOCKS,
        max_unmap_descriptors: int = DEFAULT_MAX_UNMAP_DESCRIPTORS,
        max_write_same_blocks: int = DEFAULT_MAX_WRITE_SAME_BLOCKS,
        read_only: bool | None = None,
        shared: SharedUnit | None = None,
    ) -> None:
        block_size = store.block_size
        num_blocks = store.num_blocks
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two >= 512, not {block_size}")
        if not 1 <= num_blocks < 1 << 64:
            raise ValueError(f"number of blocks out of range: {num_blocks}")
        if max_transfer_blocks is None:
            max_transfer_blocks = max(1, DEFAULT_MAX_TRANSFER_BYTES // block_size)
        for name, value in (
            ("max_transfer_blocks", max_transfer_blocks),
            ("max_unmap_blocks", max_unmap_blocks),
            ("max_unmap_descriptors", max_unmap_descriptors),
            ("max_write_same_blocks", max_write_same_blocks),
        ):
            if not 1 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} must be 1..0xFFFFFFFF, not {value}")
        self._store = store
        # reservations and the COMPARE AND WRITE gate, common to every target serving this store
        self._shared = shared if shared is not None else SharedUnit()
        max_compare_blocks = min(MAX_COMPARE_AND_WRITE_BLOCKS, max_transfer_blocks // 2)
        self._identity = pages.InquiryIdentity(vendor, product, revision, serial, bytes(device_id))
        self._identity.validate()
        self._limits = Limits(block_size, num_blocks, max_transfer_blocks, max_write_same_blocks, max_compare_blocks)
        self._block_limits = pages.BlockLimits(
            max_transfer_blocks=max_transfer_blocks,
            optimal_granularity_blocks=max(1, 4096 // block_size),
            max_unmap_blocks=max_unmap_blocks,
            max_unmap_descriptors=max_unmap_descriptors,
            max_write_same_blocks=max_write_same_blocks,
            max_compare_blocks=max_compare_blocks,
        )
        self._read_only = bool(store.read_only) if read_only is None else read_only
        self._default_wce = bool(store.write_cache)
        self._sense: Sense = NO_SENSE
        self._unit_attentions: list[Sense] = []  # queued, oldest first (module docstring)
        self._planned: tuple[bytes, Command] | None = None  # the CDB plan() decoded last
        # counters for status() / the install self-test
        self._commands: Counter[str] = Counter()
        self._transfer_sizes: Counter[int] = Counter()
        self._errors: Counter[str] = Counter()
        self._flushes = 0
        self._fua_writes = 0
        self._unmap_commands = 0
        self._unmapped_blocks = 0
        self._blocks_read = 0
        self._blocks_written = 0

    # ---- LogicalUnit --------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._limits.block_size

    @property
    def num_blocks(self) -> int:
        return self._limits.num_blocks

    def plan(self, cdb: bytes) -> CommandPlan:
        try:
            cmd = check_command(cdb, self._limits)
            plan = self._plan(cmd)
        except CommandError:
            return _NONE
        except Exception:
            log.exception("planning failed opcode=%s", opcode_name(cdb[0]) if cdb else "none")
            return _NONE
        # execute() of the same CDB reuses this decoding. The decoding depends only on the CDB
        # bytes and the fixed limits, so reusing it is never stale, whatever came in between.
        self._planned = (bytes(cdb), cmd)
        return plan

    def execute(
        self, cdb: bytes, data_out: bytes | bytearray | memoryview = b"", nexus: str = ""
    ) -> CommandResult:
        """`nexus` names the I_T nexus the command came from (`firmware.scsi.reservations`); USB has one."""
        name = OPCODE_NAMES[cdb[0]] if cdb else "EMPTY"
        self._commands[name] += 1
        if not isinstance(data_out, bytes):  # a transport handing over a bytearray/memoryview
            data_out = bytes(data_out)
        try:
            if self._unit_attentions and (not cdb or cdb[0] not in _UA_EXEMPT):
                raise CommandError(self._unit_attentions.pop(0))
            planned = self._planned
            cmd = planned[1] if planned is not None and planned[0] == cdb else check_command(cdb, self._limits)
            if self._shared.reservations.active:
                self._shared.reservations.check(nexus, cdb[0])
            if isinstance(cmd, _NEXUS_COMMANDS):
                data = self._run_reservation(cmd, data_out, nexus)
            else:
                data = self._run(cmd, data_out)
        except ReservationConflict:
            self._errors["RESERVATION_CONFLICT"] += 1
            log.debug("reservation conflict opcode=%s nexus=%s", name, nexus)
            return _CONFLICT
        except CommandError as exc:
            return self._fail(name, exc.sense)
        except StorageError as exc:
            log.warning("storage error opcode=%s error=%s", name, exc)
            return self._fail(name, Sense(exc.sense_key & 0x0F, exc.asc & 0xFF, exc.ascq & 0xFF))
        except Exception:
            log.exception("internal failure opcode=%s", name)
            return self._fail(name, _INTERNAL_FAILURE)
        if not isinstance(cmd, RequestSense):
            self._sense = NO_SENSE
        return CommandResult(Status.GOOD, data) if data else _GOOD

    # ---- extras -------------------------------------------------------------------------------

    def reset_event(self) -> None:
        """A power-on or reset the host should hear about: the next command other than INQUIRY,
        REPORT LUNS or REQUEST SENSE gets UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET
        OCCURRED (29h/00). It replaces the conditions queued before it (after a reset the host
        re-reads everything anyway) and so is reported once however many resets came."""
        self._unit_attentions = [_RESET_OCCURRED]

    def capacity_changed(self) -> None:
        """The store's size changed: READ CAPACITY and the range checks use `store.num_blocks`
        from now on, and the next command gets UNIT ATTENTION, CAPACITY DATA HAS CHANGED (2Ah/09)
        so the host re-reads the capacity. Call it between commands (the store owner's thread);
        the new limits are published with one assignment."""
        num_blocks = self._store.num_blocks
        if not 1 <= num_blocks < 1 << 64:
            raise ValueError(f"number of blocks out of range: {num_blocks}")
        old = self._limits
        if num_blocks == old.num_blocks:
            return
        self._limits = dataclasses.replace(old, num_blocks=num_blocks)
        self._planned = None
        if _CAPACITY_CHANGED not in self._unit_attentions:
            self._unit_attentions = [*self._unit_attentions, _CAPACITY_CHANGED]
        log.info("capacity changed blocks=%d->%d", old.num_blocks, num_blocks)

    def write_protect_changed(self) -> None:
        """The store started or stopped refusing writes (a local unit that became a replica, or
        primary again): writes are checked and MODE SENSE reports WP from `store.read_only` as it
        is now, and the next command gets UNIT ATTENTION, MODE PARAMETERS CHANGED (2Ah/01). Safe
        from another thread than the commands' (one assignment each)."""
        read_only = bool(self._store.read_only)
        if read_only == self._read_only:
            return
        self._read_only = read_only
        if _MODE_CHANGED not in self._unit_attentions:
            self._unit_attentions = [*self._unit_attentions, _MODE_CHANGED]
        log.info("write protect changed read_only=%s", read_only)

    @property
    def unit_attentions(self) -> tuple[Sense, ...]:
        """The unit attention conditions not yet reported, oldest first."""
        return tuple(self._unit_attentions)

    @property
    def sense(self) -> Sense:
        """The sense data REQUEST SENSE would return now (without clearing it)."""
        return self._sense

    def status(self) -> dict[str, object]:
        """Counters for the status socket and the install self-test. Safe to call from another thread
        (each counter is copied with one C-level call before it is read)."""
        return {
            "block_size": self._limits.block_size,
            "num_blocks": self._limits.num_blocks,
            "max_transfer_blocks": self._limits.max_transfer_blocks,
            "read_only": self._read_only,
            "commands": dict(sorted(self._commands.copy().items())),
            "transfer_sizes": dict(sorted(self._transfer_sizes.copy().items())),
            "blocks_read": self._blocks_read,
            "blocks_written": self._blocks_written,
            "flushes": self._flushes,
            "fua_writes": self._fua_writes,
            "unmap_commands": self._unmap_commands,
            "unmapped_blocks": self._unmapped_blocks,
            "errors": dict(sorted(self._errors.copy().items())),
        }

    # ---- internals ----------------------------------------------------------------------------

    def _fail(self, name: str, sense: Sense) -> CommandResult:
        self._sense = sense
        self._errors[sense.label] += 1
        log.debug("check condition opcode=%s sense=%s", name, sense.label)
        return _CHECK

    def _mode_state(self) -> pages.ModeState:
        return pages.ModeState(
            wce=bool(self._store.write_cache),
            default_wce=self._default_wce,
            read_only=self._read_only,
            block_size=self._limits.block_size,
            num_blocks=self._limits.num_blocks,
        )

    def _plan(self, cmd: Command) -> CommandPlan:
        bs = self._limits.block_size
        if isinstance(cmd, ReadWrite):
            if not cmd.blocks:
                return _NONE
            return CommandPlan(Direction.OUT if cmd.is_write else Direction.IN, cmd.blocks * bs)
        if isinstance(cmd, Verify):
            if cmd.bytchk == 0 or not cmd.blocks:
                return _NONE
            return CommandPlan(Direction.OUT, cmd.blocks * bs if cmd.bytchk == 1 else bs)
        if isinstance(cmd, WriteSame):
            return _NONE if cmd.ndob else CommandPlan(Direction.OUT, bs)
        if isinstance(cmd, Unmap | ModeSelect | PersistentReserveOut):
            return CommandPlan(Direction.OUT, cmd.param_len) if cmd.param_len else _NONE
        if isinstance(cmd, WriteAndVerify):
            return CommandPlan(Direction.OUT, cmd.blocks * bs) if cmd.blocks else _NONE
        if isinstance(cmd, CompareAndWrite):
            return CommandPlan(Direction.OUT, 2 * cmd.blocks * bs) if cmd.blocks else _NONE
        if isinstance(cmd, PersistentReserveIn):  # the length depends on the state when it runs
            return CommandPlan(Direction.IN, cmd.alloc) if cmd.alloc else _NONE
        if isinstance(cmd, RequestSense):
            length = min(cmd.alloc, FIXED_SENSE_LENGTH)
            return CommandPlan(Direction.IN, length) if length else _NONE
        data = self._data_in(cmd)
        return CommandPlan(Direction.IN, len(data)) if data else _NONE

    def _data_in(self, cmd: Command) -> bytes:
        """Response of a data-in command that does not touch the blocks, cut to its allocation length.
        No state changes: `plan()` uses it to size the data phase."""
        limits = self._limits
        if isinstance(cmd, Inquiry):
            if cmd.evpd:
                data = pages.vpd_page(cmd.page, self._identity, self._block_limits)
            else:
                data = pages.standard_inquiry(self._identity)
            return data[: cmd.alloc]
        if isinstance(cmd, ModeSense):
            data = pages.mode_sense_data(
                long_header=cmd.long_header,
                pc=cmd.pc,
                page=cmd.page,
                subpage=cmd.subpage,
                dbd=cmd.dbd,
                llbaa=cmd.llbaa,
                state=self._mode_state(),
            )
            return data[: cmd.alloc]
        if isinstance(cmd, ReadCapacity10):
            return pages.read_capacity_10(limits.num_blocks, limits.block_size)
        if isinstance(cmd, ReadCapacity16):
            return pages.read_capacity_16(limits.num_blocks, limits.block_size)[: cmd.alloc]
        if isinstance(cmd, ReadFormatCapacities):
            return pages.format_capacities(limits.num_blocks, limits.block_size)[: cmd.alloc]
        if isinstance(cmd, ReportLuns):
            return pages.report_luns(cmd.select_report)[: cmd.alloc]
        if isinstance(cmd, ReportSupportedOpcodes):
            return supported_opcodes.report(cmd, self.extra_service_actions)[: cmd.alloc]
        return b""

    def _run(self, cmd: Command, data_out: bytes) -> bytes:
        if isinstance(cmd, ReadWrite):
            return self._write(cmd, data_out) if cmd.is_write else self._read(cmd)
        if isinstance(cmd, RequestSense):
            # The sense of the last CHECK CONDITION first (autosense of a command that reported a
            # unit attention gets that one), else the oldest queued unit attention (SPC-4 5.14).
            sense = self._sense
            if sense == NO_SENSE and self._unit_attentions:
                sense = self._unit_attentions.pop(0)
            self._sense = NO_SENSE
            return sense.to_fixed()[: cmd.alloc]
        if isinstance(cmd, SynchronizeCache):
            # IMMED=1 still waits for the flush: see the module docstring.
            self._flush()
            return b""
        if isinstance(cmd, Verify):
            self._verify(cmd, data_out)
            return b""
        if isinstance(cmd, WriteSame):
            self._write_same(cmd, data_out)
            return b""
        if isinstance(cmd, Unmap):
            self._unmap(cmd, data_out)
            return b""
        if isinstance(cmd, ModeSelect):
            self._mode_select(cmd, data_out)
            return b""
        if isinstance(cmd, StartStopUnit):
            if cmd.loej:
                log.info("eject request ignored: fixed disk")
            if cmd.stops and not cmd.no_flush:
                self._flush()
            return b""
        if isinstance(cmd, TestUnitReady | PreventAllowMediumRemoval):
            return b""
        if isinstance(cmd, WriteAndVerify):
            self._write_and_verify(cmd, data_out)
            return b""
        if isinstance(cmd, CompareAndWrite):
            self._compare_and_write(cmd, data_out)
            return b""
        if isinstance(cmd, PreFetch):
            return b""  # no cache to load: GOOD (SBC-3 5.10; CONDITION MET would promise a cached range)
        return self._data_in(cmd)

    def _expect_data_out(self, data_out: bytes, length: int) -> None:
        if len(data_out) != length:
            # The transport promises exactly plan().length bytes; anything else is a transport bug.
            log.error("data-out length mismatch expected=%d got=%d", length, len(data_out))
            raise CommandError(_DATA_PHASE_ERROR)

    def _check_writable(self) -> None:
        if self._read_only:
            raise CommandError(_WRITE_PROTECTED)

    def _read(self, cmd: ReadWrite) -> bytes:
        if not cmd.blocks:
            return b""
        nbytes = cmd.blocks * self._limits.block_size
        data = self._store.read(cmd.lba, cmd.blocks)
        if len(data) != nbytes:
            log.error("store returned a short read lba=%d blocks=%d got=%d", cmd.lba, cmd.blocks, len(data))
            raise CommandError(_INTERNAL_FAILURE)
        self._blocks_read += cmd.blocks
        self._transfer_sizes[_size_bucket(nbytes)] += 1
        return bytes(data)

    def _write(self, cmd: ReadWrite, data_out: bytes) -> bytes:
        if self._read_only:  # _check_writable(), inlined: once per write
            raise CommandError(_WRITE_PROTECTED)
        if not cmd.blocks:
            return b""  # SBC-3: a zero transfer length writes nothing and is not an error
        nbytes = cmd.blocks * self._limits.block_size
        if len(data_out) != nbytes:
            self._expect_data_out(data_out, nbytes)
        gate = self._shared.gate
        gate.enter()
        try:
            self._store.write(cmd.lba, data_out, fua=cmd.fua)
        finally:
            gate.leave()
        if cmd.fua:
            self._fua_writes += 1
        self._blocks_written += cmd.blocks
        self._transfer_sizes[_size_bucket(nbytes)] += 1
        return b""

    def _flush(self) -> None:
        self._store.flush()
        self._flushes += 1

    def _verify(self, cmd: Verify, data_out: bytes) -> None:
        if not cmd.blocks:
            return
        bs = self._limits.block_size
        if cmd.bytchk == 1:
            self._expect_data_out(data_out, cmd.blocks * bs)
        elif cmd.bytchk == 3:
            self._expect_data_out(data_out, bs)
        data = self._store.read(cmd.lba, cmd.blocks)  # blocks <= max transfer length: one read
        if len(data) != cmd.blocks * bs:
            log.error("store returned a short read lba=%d blocks=%d got=%d", cmd.lba, cmd.blocks, len(data))
            raise CommandError(_INTERNAL_FAILURE)
        if cmd.bytchk == 0:
            return
        expected = data_out if cmd.bytchk == 1 else data_out * cmd.blocks
        if data != expected:
            offset = _first_difference(data, expected)
            if cmd.bytchk == 3:
                offset %= bs
            raise CommandError(Sense.of(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY_OPERATION, information=offset))

    def _write_same(self, cmd: WriteSame, data_out: bytes) -> None:
        self._check_writable()
        bs = self._limits.block_size
        if cmd.ndob:
            block = bytes(bs)
        else:
            self._expect_data_out(data_out, bs)
            block = data_out
        gate = self._shared.gate
        gate.enter()
        try:
            if cmd.unmap and block.count(0) == bs:
                # SBC-3 5.45: with UNMAP set the blocks may be unmapped when they would then read back
                # as the data-out block; LBPRZ=1 makes that true for an all-zero block.
                self._store.unmap(cmd.lba, cmd.blocks)
                self._unmap_commands += 1
                self._unmapped_blocks += cmd.blocks
                return
            step = self._limits.max_transfer_blocks
            for lba in range(cmd.lba, cmd.lba + cmd.blocks, step):
                count = min(step, cmd.lba + cmd.blocks - lba)
                self._store.write(lba, block * count)
        finally:
            gate.leave()
        self._blocks_written += cmd.blocks

    def _unmap(self, cmd: Unmap, data_out: bytes) -> None:
        self._expect_data_out(data_out, cmd.param_len)
        self._check_writable()
        if not data_out:
            return  # SBC-3 5.28: a zero parameter list length is not an error
        ranges = self._parse_unmap(data_out)
        gate = self._shared.gate
        gate.enter()
        try:
            for lba, blocks in ranges:
                self._store.unmap(lba, blocks)
                self._unmapped_blocks += blocks
        finally:
            gate.leave()
        self._unmap_commands += 1

    def _parse_unmap(self, data: bytes) -> list[tuple[int, int]]:
        """UNMAP parameter list (SBC-3 5.28.2): 0: UNMAP DATA LENGTH  2: BLOCK DESCRIPTOR DATA LENGTH
        4: reserved  8: descriptors of 16 bytes (LBA 8, NUMBER OF LOGICAL BLOCKS 4, reserved 4).
        All descriptors are checked before any is applied."""
        if len(data) < _UNMAP_HEADER:
            raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
        bd_len = int.from_bytes(data[2:4], "big")
        if any(data[4:8]):
            raise CommandError(invalid_field_in_parameter_list(4))
        if bd_len > len(data) - _UNMAP_HEADER:
            raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
        count = bd_len // _UNMAP_DESCRIPTOR  # a trailing partial descriptor is ignored (SBC-3 5.28.2)
        if count > self._block_limits.max_unmap_descriptors:
            raise CommandError(invalid_field_in_parameter_list(2))
        ranges: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            at = _UNMAP_HEADER + i * _UNMAP_DESCRIPTOR
            lba = int.from_bytes(data[at : at + 8], "big")
            blocks = int.from_bytes(data[at + 8 : at + 12], "big")
            if any(data[at + 12 : at + 16]):
                raise CommandError(invalid_field_in_parameter_list(at + 12))
            if not blocks:
                continue
            if lba >= self._limits.num_blocks or lba + blocks > self._limits.num_blocks:
                raise CommandError(_LBA_OUT_OF_RANGE)
            total += blocks
            if total > self._block_limits.max_unmap_blocks:
                raise CommandError(invalid_field_in_parameter_list(at + 8))
            ranges.append((lba, blocks))
        return ranges

    def _mode_select(self, cmd: ModeSelect, data_out: bytes) -> None:
        self._expect_data_out(data_out, cmd.param_len)
        changes = pages.parse_mode_select(data_out, long_header=cmd.long_header, state=self._mode_state())
        if changes.wce is not None and changes.wce != bool(self._store.write_cache):
            log.info("write cache %s by MODE SELECT", "enabled" if changes.wce else "disabled")
            self._store.set_write_cache(changes.wce)

    # ---- commands added for clustered and virtualised initiators ------------------------------

    # (opcode, service action, CDB usage data) served outside the CDB table, for REPORT SUPPORTED
    # OPERATION CODES; a subclass serving more service actions extends it.
    extra_service_actions: tuple[tuple[int, int, bytes], ...] = ()

    @property
    def shared(self) -> SharedUnit:
        """The reservations and write gate this target shares with the other targets of its unit."""
        return self._shared

    def _read_exact(self, lba: int, blocks: int) -> bytes:
        data = self._store.read(lba, blocks)
        if len(data) != blocks * self._limits.block_size:
            log.error("store returned a short read lba=%d blocks=%d got=%d", lba, blocks, len(data))
            raise CommandError(_INTERNAL_FAILURE)
        return bytes(data)

    def _write_and_verify(self, cmd: WriteAndVerify, data_out: bytes) -> None:
        """SBC-3 5.40: write, then read the blocks back from the store (the medium); with BYTCHK=1
        compare them with the data-out: MISCOMPARE with the offset of the first byte that differs."""
        self._write(ReadWrite(Opcode.WRITE_16, cmd.lba, cmd.blocks), data_out)
        if not cmd.blocks:
            return
        data = self._read_exact(cmd.lba, cmd.blocks)
        if cmd.bytchk and data != data_out:
            raise CommandError(_miscompare(data, data_out))

    def _compare_and_write(self, cmd: CompareAndWrite, data_out: bytes) -> None:
        """SBC-3 5.2: atomically (the write gate, `firmware.scsi.shared`) compare `blocks` blocks with
        the first half of the data-out and, if all match, write the second half. A mismatch writes
        nothing: MISCOMPARE DURING VERIFY OPERATION with the offset of the first differing byte."""
        self._check_writable()
        if not cmd.blocks:
            return  # SBC-3 5.2: zero blocks is not an error and compares nothing
        nbytes = cmd.blocks * self._limits.block_size
        self._expect_data_out(data_out, 2 * nbytes)
        expected, new = data_out[:nbytes], data_out[nbytes:]
        with self._shared.gate.exclusive():
            current = self._read_exact(cmd.lba, cmd.blocks)
            if current != expected:
                raise CommandError(_miscompare(current, expected))
            self._store.write(cmd.lba, new, fua=cmd.fua)
        if cmd.fua:
            self._fua_writes += 1
        self._blocks_written += cmd.blocks
        self._transfer_sizes[_size_bucket(nbytes)] += 1

    def _run_reservation(
        self, cmd: PersistentReserveIn | PersistentReserveOut | ReserveRelease, data_out: bytes, nexus: str
    ) -> bytes:
        reservations = self._shared.reservations
        if isinstance(cmd, PersistentReserveIn):
            return reservations.persistent_reserve_in(cmd.action)[: cmd.alloc]
        if isinstance(cmd, PersistentReserveOut):
            self._expect_data_out(data_out, cmd.param_len)
            reservations.persistent_reserve_out(nexus, cmd.action, cmd.scope, cmd.pr_type, data_out)
            return b""
        if cmd.reserve:
            reservations.reserve_unit(nexus)
        else:
            reservations.release_unit(nexus)
        return b""


_NEXUS_COMMANDS = (PersistentReserveIn, PersistentReserveOut, ReserveRelease)


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where `a` and `b` (of one length, not equal) differ: whole blocks are
    compared first (C comparisons), then the differing block through the XOR of the two as big-endian
    integers, whose highest set bit lies in that byte. A byte loop in Python took tens of milliseconds
    per miscompare of a large transfer."""
    step, at = 4096, 0
    while a[at:at + step] == b[at:at + step]:
        at += step
    x, y = a[at:at + step], b[at:at + step]
    diff = int.from_bytes(x, "big") ^ int.from_bytes(y, "big")
    return at + len(x) - 1 - (diff.bit_length() - 1) // 8


def _miscompare(found: bytes, expected: bytes) -> Sense:
    offset = _first_difference(found, expected)
    return Sense.of(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY_OPERATION, information=offset)
