"""The target session: what a target (a remote unit's copy of one source) does with what a source sends.

Sans-IO: the driver hands it the frames of the source's connection and the results of the I/O it
asked for; it answers with actions (frozen dataclasses) the driver's target adapter carries out:
write these records to the target, make this position durable, save the state, send this frame.
No socket, thread, file or clock inside.

The remote's position lives here and only here:

- `state.applied_seq` (in `TargetState`, the record the adapter persists): durable — the target was
  synced and the state file says so. It is what HELLO_REPLY reports and what ACKs carry.
- `applied`: records handed to the adapter to apply, maybe not durable yet. A lost connection
  drops it back to the durable position (the source sends the rest again).
- `reapply_until`: after a stop without a sync (a power cut, a crash), the target may hold torn
  writes of the records in (applied_seq, write_limit] of the state file; it is not a consistent image
  (`consistent` is False, promotion refuses) until records up to there are applied again and made
  durable (a resync's end position counts: the records before it were sent again or their regions
  copied). `write_limit` is raised (state file durable) before records past it are
  written, to the last seq received, so that bound is records the source holds and sends again.
- `flush_requested` and `acked` are the group-commit bookkeeping of the current connection (the
  newest position handed to MakeDurable, the newest ACK sent), not positions of the target.

Order of applies: records apply strictly in journal order, each at most once (a record at or below
`applied` is skipped and counted as a duplicate); a batch that does not follow `applied` is refused.

Hook point before a record overwrites blocks: every action that overwrites target blocks
(`ApplyRecords` for WRITE/UNMAP records, `CopyRegion` for resync data) is executed by the adapter's
`TargetStore.apply` / `TargetStore.copy_region`, which first calls `TargetStore.before_overwrite(lba,
count, seq)` for each extent, before the blocks change. The resync undo log uses it today; undo
history keeps before-images through the same call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from firmware.journal.format import RecordKind
from firmware.link import protocol as jp


@dataclass
class TargetState:
    """The durable state of one target (what `<state_dir>/<source id>.json` holds)."""

    source_id: str
    volume_uuid: str = ""  # hex; empty = no volume bound yet (content unknown)
    generation: int = 0
    applied_seq: int = 0  # durable applied position
    block_size: int = 0
    num_blocks: int = 0
    resync_active: bool = False
    resync_begin: int = 0  # P
    resync_end: int | None = None  # Q, once the copy is complete
    resync_undo: bool = False  # an undo log protects the pre-resync image
    resync_base_seq: int = 0  # applied position of that pre-resync image
    target_id: str = ""  # which file or disk the position belongs to (the adapter's fingerprint)
    # no record after this seq reaches the target before a state file with a higher limit is durable:
    # after a stop without a sync (a power cut), records in (applied_seq, write_limit] may be torn
    write_limit: int = 0


class Refused(Exception):
    """The target refuses this source or frame with an ERROR code (the connection then ends)."""

    def __init__(self, code: jp.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    event: jp.Event


@dataclass(frozen=True, slots=True)
class ApplyRecords:
    """Write these records to the target in order (call `before_overwrite` first for each WRITE/UNMAP)."""

    records: tuple[jp.Record, ...]


@dataclass(frozen=True, slots=True)
class CopyRegion:
    """Resync data: write `data` at `lba` (call `before_overwrite` first)."""

    lba: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MakeDurable:
    """Sync the target, persist the state with `applied_seq = seq`, then report `durable(seq)`
    (the adapter may do this off the receive path: group commit)."""

    seq: int


@dataclass(frozen=True, slots=True)
class SyncNow:
    """Sync the target before going on (before a resync begins or ends; done in line)."""


@dataclass(frozen=True, slots=True)
class SaveState:
    """Persist `TargetState` durably (tmp + fsync + rename)."""


class UndoStep(enum.Enum):
    DISCARD = 1  # delete an old undo log: a new pre-resync image is about to be protected
    OPEN = 2  # open (or create) the undo log that protects the pre-resync image
    DROP = 3  # the resync is complete: close and delete the undo log


@dataclass(frozen=True, slots=True)
class Undo:
    step: UndoStep


@dataclass(frozen=True, slots=True)
class ReadDigests:
    """Answer a DIGEST_REQUEST: digest regions [first, first+count) of `region_blocks` blocks."""

    first_region: int
    count: int
    region_blocks: int


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


TargetAction = Send | ApplyRecords | CopyRegion | MakeDurable | SyncNow | SaveState | Undo | ReadDigests | Close


class TargetSession:
    """One target's replication state, across the connections of its source (one replicating at a time)."""

    def __init__(self, state: TargetState, *, remote_name: str) -> None:
        self.state = state
        self.remote_name = remote_name
        self.applied = state.applied_seq
        self.acked = state.applied_seq  # the last position acknowledged on this connection
        self.hello_ev: jp.Hello | None = None
        self.purpose = jp.Purpose.REPLICATE
        self.target_id = ""
        self.num_blocks = 0
        self.flush_requested = 0
        self.records_applied = 0
        self.duplicates_skipped = 0
        self.bytes_applied = 0
        self.resync_regions_done = 0
        self.resync_regions_total = 0
        self.last_record_ts_ns = 0
        self.write_ahead = 0  # the driver's hint: the last seq of the batches it has received so far
        self.written_seq = state.applied_seq  # the newest record handed to the target (synced or not)
        self.reapply_until = state.write_limit if state.write_limit > state.applied_seq else 0

    @property
    def reapplying(self) -> bool:
        """The target may hold torn writes of records after the durable position (see the module doc)."""
        return self.reapply_until > self.state.applied_seq

    @property
    def consistent(self) -> bool:
        return not self.state.resync_active and not self.reapplying

    def settle_write_limit(self) -> list[TargetAction]:
        """Nothing is applied past the durable position: lower the write limit to it (so a power cut
        now leaves a consistent target), unless records torn earlier still wait to be applied again.
        The driver calls it when the link is idle (a heartbeat) and when the connection ends."""
        st = self.state
        low = max(st.applied_seq, self.reapply_until if self.reapplying else 0)
        if self.written_seq > st.applied_seq or st.write_limit <= low:
            return []
        st.write_limit = low
        return [SaveState()]

    # -- connection ------------------------------------------------------------------------------
    def bound_to(self, hello: jp.Hello) -> bool:
        """The target holds this volume's image at the stored position: same volume, generation and
        block size, and the same file or disk as when the position was stored."""
        st = self.state
        return (st.volume_uuid == hello.volume_uuid.hex() and st.generation == hello.generation
                and st.block_size == hello.block_size and (not st.target_id or st.target_id == self.target_id))

    @staticmethod
    def reply_features(hello: jp.Hello) -> jp.Feature:
        """What this end accepts of the features a HELLO offers: lz4, and on a failback's FETCH the
        promoted copy's written regions (DIRTY_REQUEST)."""
        if hello.purpose is jp.Purpose.FETCH:
            return jp.Feature.LZ4 | jp.Feature.DIRTY_MAP
        return jp.Feature.LZ4

    def hello(self, hello: jp.Hello, *, target_id: str, target_blocks: int) -> list[TargetAction]:
        """A HELLO whose certificate was checked and whose target is open (`target_blocks` long)."""
        num_blocks = hello.volume_size // hello.block_size
        if target_blocks < num_blocks:
            raise Refused(jp.ErrorCode.VOLUME_MISMATCH,
                          f"target holds {target_blocks} blocks, the source volume {num_blocks}")
        self.hello_ev = hello
        self.purpose = hello.purpose
        self.target_id = target_id
        self.num_blocks = num_blocks
        st = self.state
        out: list[TargetAction] = []
        if hello.purpose is jp.Purpose.REPLICATE:
            self.applied = self.flush_requested = self.acked = st.applied_seq
            if st.resync_active and st.resync_undo:
                out.append(Undo(UndoStep.OPEN))
        flags = jp.ReplyFlag.NONE
        if st.resync_active:
            flags |= jp.ReplyFlag.RESYNC_IN_PROGRESS
        if not self.bound_to(hello):
            flags |= jp.ReplyFlag.NEW_TARGET
        uuid = bytes.fromhex(st.volume_uuid) if st.volume_uuid else bytes(16)
        out.append(Send(jp.HelloReply(self.remote_name, uuid, st.applied_seq, st.generation,
                                      hello.features & self.reply_features(hello), flags)))
        return out

    def connection_lost(self) -> MakeDurable | None:
        """The replicating connection ended: what was applied to make durable (so the next connection
        resumes exactly after it), if anything. Then `forget_unsynced()`."""
        if self.applied != self.state.applied_seq and not self.state.resync_active:
            return MakeDurable(self.applied)
        return None

    def forget_unsynced(self) -> None:
        """Anything not durable will be sent again by the source. Records written to the target but not
        made durable (its sync failed) leave it not consistent until they are applied again."""
        st = self.state
        if self.written_seq > st.applied_seq:
            self.reapply_until = max(self.reapply_until, self.written_seq)
        self.written_seq = st.applied_seq
        self.applied = self.flush_requested = self.acked = st.applied_seq

    @property
    def _hello(self) -> jp.Hello:
        if self.hello_ev is None:
            raise jp.ProtocolError("frame before HELLO")
        return self.hello_ev

    def _bind(self) -> None:
        h, st = self._hello, self.state
        st.volume_uuid = h.volume_uuid.hex()
        st.generation = h.generation
        st.block_size = h.block_size
        st.num_blocks = h.volume_size // h.block_size
        st.target_id = self.target_id

    def _check_range(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > self.num_blocks:
            raise jp.ProtocolError(f"blocks {lba}+{count} outside the volume of {self.num_blocks}")

    def _replicating(self, what: str) -> None:
        self._hello  # noqa: B018 - raises before HELLO
        if self.purpose is not jp.Purpose.REPLICATE:
            raise jp.ProtocolError(f"{what} on a verify connection")

    # -- frames ----------------------------------------------------------------------------------
    def event(self, ev: jp.Event) -> list[TargetAction]:
        """One frame from the source (after HELLO)."""
        if isinstance(ev, jp.Heartbeat):
            out: list[TargetAction] = [Send(jp.Heartbeat(ev.token))]
            if self.purpose is jp.Purpose.REPLICATE and self.hello_ev is not None:
                out = self.settle_write_limit() + out
            return out
        if isinstance(ev, jp.DigestRequest):
            self._hello  # noqa: B018
            if ev.region_blocks <= 0:
                raise jp.ProtocolError("DIGEST_REQUEST with no blocks per region")
            return [ReadDigests(ev.first_region, ev.count, ev.region_blocks)]
        if isinstance(ev, jp.Error):
            return [Close(f"source error {ev.code.name}: {ev.message}")]
        if isinstance(ev, jp.Batch):
            self._replicating("BATCH")
            return self._batch(ev)
        if isinstance(ev, jp.ResyncBegin):
            self._replicating("RESYNC_BEGIN")
            return self._resync_begin(ev)
        if isinstance(ev, jp.RegionData):
            self._replicating("REGION_DATA")
            return self._region(ev)
        if isinstance(ev, jp.ResyncEnd):
            self._replicating("RESYNC_END")
            return self._resync_end(ev)
        raise jp.ProtocolError(f"unexpected {type(ev).__name__} from the source")

    def _batch(self, b: jp.Batch) -> list[TargetAction]:
        st = self.state
        if st.resync_active and st.resync_end is None:
            raise jp.ProtocolError("records before the end of the resync copy", jp.ErrorCode.SEQUENCE)
        out: list[TargetAction] = []
        if not self.bound_to(self._hello):
            if st.volume_uuid and st.applied_seq:
                raise Refused(jp.ErrorCode.SEQUENCE, "target holds another volume: resync first")
            self._bind()
        if b.prev_seq > self.applied:
            raise Refused(jp.ErrorCode.SEQUENCE,
                          f"batch follows seq={b.prev_seq} but the target has applied seq={self.applied}")
        bs = self._hello.block_size
        fresh: list[jp.Record] = []
        for r in b.records:
            if r.seq <= self.applied:
                self.duplicates_skipped += 1
                continue
            if r.kind is not RecordKind.FLUSH:
                self._check_range(r.lba, r.count)
            if r.kind is RecordKind.WRITE and len(r.payload) != r.count * bs:
                raise jp.ProtocolError(f"write seq={r.seq}: {len(r.payload)} bytes for {r.count} blocks")
            fresh.append(r)
        if fresh:
            if fresh[-1].seq > st.write_limit:
                # durable before the records reach the target: a power cut may tear them (see above)
                st.write_limit = max(fresh[-1].seq, self.write_ahead)
                out.append(SaveState())
            out.append(ApplyRecords(tuple(fresh)))
        return out

    def applied_ok(self, records: tuple[jp.Record, ...]) -> None:
        """The adapter wrote `records` (an ApplyRecords) to the target. Until it says so they are not
        applied: a failure half way leaves `applied` before the batch and the source sends it again."""
        for r in records:
            if r.seq <= self.applied:
                raise ValueError(f"record seq={r.seq} reported applied twice")
            self.applied = self.written_seq = r.seq
            self.records_applied += 1
            self.last_record_ts_ns = r.timestamp_ns
            if r.kind is RecordKind.WRITE:
                self.bytes_applied += len(r.payload)

    def want_flush(self, flusher_busy: bool) -> MakeDurable | None:
        """Group commit: one durable position at a time, the newest applied when the last is done."""
        if flusher_busy or self.purpose is not jp.Purpose.REPLICATE or self.applied <= self.flush_requested:
            return None
        self.flush_requested = self.applied
        return MakeDurable(self.applied)

    def durable(self, seq: int) -> list[TargetAction]:
        """The adapter synced the target and stored `seq` (MakeDurable): finish a resync at Q, then ACK."""
        st = self.state
        if seq <= self.acked:
            return []
        st.applied_seq = max(st.applied_seq, seq)
        self.acked = seq
        if self.reapply_until and st.applied_seq >= self.reapply_until:
            self.reapply_until = 0  # every record the power cut may have torn is applied again, durably
        out: list[TargetAction] = []
        if st.resync_active and st.resync_end is not None and seq >= st.resync_end:
            out.extend(self._finish_resync())
        out.append(Send(jp.Ack(seq)))
        return out

    def _finish_resync(self) -> list[TargetAction]:
        st = self.state
        st.resync_active = False
        st.resync_undo = False
        st.resync_end = None
        return [SaveState(), Undo(UndoStep.DROP)]

    def _resync_begin(self, ev: jp.ResyncBegin) -> list[TargetAction]:
        """Called with no flush in progress (the driver quiesces first)."""
        st = self.state
        out: list[TargetAction] = []
        if not st.resync_active and self.applied != st.applied_seq:
            # the records before this frame are the image the undo log must preserve: durable first
            out.append(SyncNow())
            st.applied_seq = self.applied
        if not st.resync_active:
            # an undo log is worth keeping only if the target holds a consistent image of this volume now
            # (a target that may hold torn writes has no consistent image to keep)
            keep = bool(self.bound_to(self._hello) and st.applied_seq > 0 and not self.reapplying)
            st.resync_active = True
            st.resync_undo = keep
            st.resync_base_seq = st.applied_seq
            if keep:
                out.append(Undo(UndoStep.DISCARD))
        self._bind()
        st.resync_begin = ev.position
        st.resync_end = None
        out.append(SaveState())
        if st.resync_undo:
            out.append(Undo(UndoStep.OPEN))
        self.resync_regions_total = ev.total_regions
        self.resync_regions_done = 0
        return out

    def _region(self, ev: jp.RegionData) -> list[TargetAction]:
        st = self.state
        if not st.resync_active or st.resync_end is not None:
            raise jp.ProtocolError("REGION_DATA outside a resync copy", jp.ErrorCode.SEQUENCE)
        bs = self._hello.block_size
        if len(ev.data) % bs or not ev.data:
            raise jp.ProtocolError(f"REGION_DATA of {len(ev.data)} bytes is not whole blocks")
        self._check_range(ev.lba, len(ev.data) // bs)
        self.resync_regions_done += 1
        self.bytes_applied += len(ev.data)
        return [CopyRegion(ev.lba, ev.data)]

    def _resync_end(self, ev: jp.ResyncEnd) -> list[TargetAction]:
        """Called with no flush in progress (the driver quiesces first)."""
        st = self.state
        if not st.resync_active:
            raise jp.ProtocolError("RESYNC_END without RESYNC_BEGIN", jp.ErrorCode.SEQUENCE)
        out: list[TargetAction] = [SyncNow()]
        st.resync_end = ev.position
        st.applied_seq = st.resync_begin
        self.applied = self.flush_requested = self.acked = st.resync_begin
        if self.applied >= ev.position:
            out.extend(self._finish_resync())
        else:
            out.append(SaveState())
        out.append(Send(jp.Ack(self.applied)))
        return out

    # -- roll back -------------------------------------------------------------------------------
    def rollback_possible(self) -> bool:
        return self.state.resync_active and self.state.resync_undo

    def rolled_back(self) -> None:
        """The adapter restored the pre-resync image from the undo log."""
        st = self.state
        st.applied_seq = st.resync_base_seq
        st.resync_active = False
        st.resync_undo = False
        st.resync_end = None
        st.write_limit = self.written_seq = st.applied_seq  # the undo log restored every chunk written since
        self.reapply_until = 0  # the resync began
        self.applied = self.flush_requested = self.acked = st.applied_seq
