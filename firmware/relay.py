"""A remote unit's relay (cascade): pass a source it receives on, in order, to a further remote unit.

`usbmirror remote ... --target ID=PATH --forward ID=HOST:PORT` makes this remote a relay of source ID.
The relay is the two sessions of the replication core in one process: the remote's `TargetSession`
(receiving ID from its upstream) and, through `firmware.replicator.Replicator`, a `SourceSession`
that sends ID to the next hop, with a cursor, window and retention of its own.

- **Relay journal** `<state_dir>/<ID>.forward.journal` (a `firmware.journal.Journal` ring of
  `retention` bytes): every record applied to the target is appended to it, in order, before the
  target is overwritten (`before_apply`, an `ApplyHook`); the journal is made durable in the
  target's group commit, before the state file stores the applied position (`before_durable`). So
  everything the upstream forgets (it forgets what the relay acknowledged) is in the relay journal
  until the next hop has it durable; its consumer position is the next hop's confirmed cursor.
- **Crash safety**: the state file holds, beside the applied position A, the relay journal's seq H at
  A. Records the relay journal holds after H came from the upstream records after A, one each, so after
  a crash the relay skips that many of the records the upstream sends again instead of relaying
  them twice.
- **A slow or absent next hop never blocks the upstream.** The relay does not throttle. When the
  relay journal is full it stops journaling and marks the regions of the records it could not keep
  in a dirty bitmap (`<ID>.forward.dirty`, durable before the target is overwritten), exactly like
  the local unit's overflow; journaling resumes once the journal is at most half full, and the
  relay brings the dirty regions to the next hop by a dirty-region resync (the replicator's
  overflow rounds). Resync data the relay itself receives from its upstream (`before_region`) is
  marked dirty the same way, and while the relay's own target is mid-resync (not a consistent
  image) its rounds towards the next hop are not final.
- **Upstream only**: a relayed source accepts writes only from its upstream, the certificate
  identity of the first unit that replicated it after `--forward` was set, kept in
  `<ID>.forward.json` (see `check_upstream`).
- **A promoted relay** (its copy made primary, `usbmirror promote`) goes on forwarding: what reaches
  the target then is the standby host's writes (`firmware.promotion.PromotedStore`) or a rollback
  to a point, through the same `before_apply`, so they are appended in the order they are written
  and made durable in the relay journal before the target changes (nobody would send them again).
  The next hop keeps a third copy of the promoted data. After a failback (`promotion_ends`) the
  relay journal's head stands for the failback's fork position and the upstream's records follow it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.atomic import write_atomically
from firmware.journal import FileFlash, Journal, JournalError, JournalFull, RecordKind
from firmware.journal.bitmap import DirtyBitmap, DirtySnapshot
from firmware.link import protocol as jp
from firmware.pairing import TlsFiles
from firmware.replication.spec import RemoteSpec
from firmware.replication.target import Refused, TargetState
from firmware.replicator import Replicator, ReplicatorTuning
from firmware.target_store import Reader, TargetStore

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 256 << 20  # bytes of relay journal per forwarded source
RESUME_FILL = 0.5  # after an overflow, journaling resumes at or below this fill


@dataclass(frozen=True, slots=True)
class ForwardSpec:
    """`--forward ID=HOST:PORT`: relay source `source_id` to `remote`, keeping `retention` bytes."""

    source_id: str
    remote: RemoteSpec
    retention: int = DEFAULT_RETENTION


class _RelayedVolume:
    """The relay's target as the replicator reads it (`ReplicatedUnit`): the newest data, the dirty
    regions an overflow (or the upstream's resync) left, and no sync gates (a relay is async)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    @property
    def block_size(self) -> int:
        return self.relay.block_size

    @property
    def num_blocks(self) -> int:
        return self.relay.num_blocks

    @property
    def region_blocks(self) -> int:
        return self.relay.region_blocks

    @property
    def overflow(self) -> bool:
        return self.relay.overflowing()

    def read(self, lba: int, count: int) -> bytes:
        vol = self.relay.store.volume
        if vol is None:
            raise OSError(f"target {self.relay.store.path} is not open")
        return vol.read(lba, count)

    def dirty_snapshot(self) -> DirtySnapshot:
        return self.relay.bitmap_or_fail().snapshot()

    def clear_dirty(self, snapshot: DirtySnapshot) -> int:
        relay = self.relay
        n = relay.bitmap_or_fail().clear(snapshot)
        with relay.lock:  # marks happen under the lock: none runs between the count and the reset
            if relay.bitmap is not None and not relay.bitmap.dirty_regions:
                relay.dirty_epochs.clear()
        log.info("relay dirty regions cleared source=%s count=%d", relay.source_id, n)
        return n

    def dirty_runs(self) -> tuple[int, tuple[tuple[int, int, int], ...]]:
        """As `LocalUnit.dirty_runs`: (the bitmap's stamp now, (first stamp, lo, hi) per run of dirty
        writes), lo and hi being relay journal positions; () when no region is dirty."""
        relay = self.relay
        with relay.lock:
            bm = relay.bitmap
            if not relay.dirty_epochs or bm is None or not bm.dirty_regions:
                return 0, ()
            return bm.snapshot().token, tuple(relay.dirty_epochs)

    def add_sync_gate(self, gate: Callable[[int], None]) -> None:
        pass

    def remove_sync_gate(self, gate: Callable[[int], None]) -> None:
        pass


class Relay:
    """One forwarded source. Registered on the target's store as an `ApplyHook` and a durable hook;
    `bind()` (at start when the target already holds a volume, else at the upstream's first HELLO)
    opens the relay journal and bitmap and starts the link to the next hop."""

    def __init__(self, spec: ForwardSpec, store: TargetStore, state: Callable[[], TargetState], *,
                 state_dir: str, tls: TlsFiles | None, tuning: ReplicatorTuning | None = None) -> None:
        self.spec = spec
        self.source_id = spec.source_id
        self.store = store
        self.state = state
        self.tls = tls
        self.tuning = tuning or ReplicatorTuning()
        d = Path(state_dir)
        self.journal_path = d / f"{spec.source_id}.forward.journal"
        self.bitmap_path = d / f"{spec.source_id}.forward.dirty"
        self.pin_path = d / f"{spec.source_id}.forward.json"
        self.lock = threading.Lock()
        self._bind_lock = threading.Lock()
        self.journal: Journal | None = None
        self.bitmap: DirtyBitmap | None = None
        self.replicator: Replicator | None = None
        self.key: tuple[str, int, int] | None = None  # volume uuid, block size, blocks of the bound volume
        self.block_size = 0
        self.num_blocks = 0
        self.region_blocks = 0
        self._overflow = False
        self.overflow_events = 0
        self.records_relayed = 0
        self.records_overflowed = 0
        self.skip_through = 0  # upstream records up to here are in the relay journal already
        self._marks: deque[tuple[int, int]] = deque()  # (upstream seq, relay journal head) after a batch
        # (first bitmap stamp, lo, hi) per run of dirty writes, as the local unit keeps them: every
        # relay journal record up to lo came before the run's writes, every one after hi after them
        self.dirty_epochs: list[tuple[int, int, int]] = []
        self._last_head = 0
        self._promoted = False  # the copy is primary here: its writes come from a standby host
        self.upstream = self._load_pin()
        self._prewrite()

    # -- the upstream ---------------------------------------------------------------------------
    def _load_pin(self) -> str | None:
        try:
            up = json.loads(self.pin_path.read_text()).get("upstream")
        except (FileNotFoundError, ValueError):
            return None
        return str(up) if up else None

    def check_upstream(self, ident: tuple[str, str], peer: str) -> None:
        """A relayed source takes writes from its upstream only: the identity of the first unit that
        replicated it here, kept across restarts. Anyone else is refused (PERMISSION_DENIED)."""
        who = ":".join(ident)
        with self.lock:
            if self.upstream is None:
                write_atomically(self.pin_path, json.dumps({"upstream": who}).encode())
                self.upstream = who
                log.info("relay upstream recorded source=%s upstream=%s peer=%s", self.source_id, who, peer)
                return
            if who != self.upstream:
                raise Refused(jp.ErrorCode.PERMISSION_DENIED,
                              f"this remote relays source {self.source_id} from {self.upstream} only, not {who} "
                              f"(delete {self.pin_path.name} in its state dir to change the upstream)")

    # -- binding to the volume ------------------------------------------------------------------
    def bind(self, volume_uuid: str, block_size: int, num_blocks: int) -> None:
        """Open the relay journal for this volume and start forwarding (again, for another volume)."""
        with self._bind_lock:  # one journal and one link to the next hop, whoever binds first
            self._bind_locked(volume_uuid, block_size, num_blocks)

    def _bind_locked(self, volume_uuid: str, block_size: int, num_blocks: int) -> None:
        key = (volume_uuid, block_size, num_blocks)
        if self.key == key or not volume_uuid or not block_size or not num_blocks:
            return
        unit_uuid = uuidlib.UUID(hex=volume_uuid)
        if self.key is not None:
            log.warning("relay volume changed source=%s: the relay journal starts again", self.source_id)
            self._stop_forwarding()
            self.bitmap_path.unlink(missing_ok=True)
            self._format_journal(unit_uuid, block_size)
        if self.store.volume is None:
            self.store.open(num_blocks * block_size, block_size)
        rb = self.tuning.region_blocks or max(1, (1 << 20) // block_size)
        fresh = False
        try:
            journal = Journal.open(self.journal_path, size=self.spec.retention, unit_uuid=unit_uuid,
                                   block_size=block_size, track_applied=False)
        except JournalError as exc:
            log.warning("relay journal unusable source=%s (%s): starting a new one", self.source_id, exc)
            self.bitmap_path.unlink(missing_ok=True)
            self._format_journal(unit_uuid, block_size)
            journal = Journal.open(self.journal_path, size=self.spec.retention, unit_uuid=unit_uuid,
                                   block_size=block_size, track_applied=False)
            fresh = True
        try:
            bitmap = DirtyBitmap.open(self.bitmap_path, num_blocks=num_blocks, region_blocks=rb, unit_uuid=unit_uuid)
        except (OSError, ValueError):
            self.bitmap_path.unlink(missing_ok=True)
            bitmap = DirtyBitmap.open(self.bitmap_path, num_blocks=num_blocks, region_blocks=rb, unit_uuid=unit_uuid)
        if fresh:
            bitmap.mark(0, num_blocks)  # what the lost journal held is unknown: bring everything
        consumer = f"remote:{self.spec.remote.name or self.spec.remote.label}"  # the replicator's name for it
        for name in journal.consumers():
            if name != consumer:  # a next hop forwarded to before: it would hold the journal's tail for ever
                journal.unregister_consumer(name)
        self.skip_through = self._recovered_skip(journal)
        with self.lock:
            self.journal, self.bitmap, self.key = journal, bitmap, key
            self.block_size, self.num_blocks, self.region_blocks = block_size, num_blocks, rb
            self._overflow = False
            self._marks.clear()
            self._last_head = journal.head_seq
            self.dirty_epochs = [(0, journal.tail_seq - 1, journal.head_seq)] if bitmap.dirty_regions else []
        self.replicator = Replicator(_RelayedVolume(self), journal, source_id=self.source_id,
                                     remotes=[self.spec.remote], tls=self.tls, tuning=self.tuning,
                                     plaintext=self.tls is None)
        self.replicator.start()
        log.info("relay forwarding source=%s to=%s journal_seq=%d..%d retention=%d skip_through=%d",
                 self.source_id, self.spec.remote.label, journal.tail_seq, journal.head_seq, self.spec.retention,
                 self.skip_through)

    def _format_journal(self, unit_uuid: uuidlib.UUID, block_size: int) -> None:
        """Start the relay journal again (a new generation: the next hop compares every region)."""
        self._prewrite()
        flash = FileFlash(self.journal_path)
        try:
            Journal.format(flash, unit_uuid=unit_uuid, block_size=block_size)
        finally:
            flash.close()

    def _prewrite(self) -> None:
        """The relay journal file, pre-written at start rather than while an upstream waits for its
        HELLO_REPLY (a large one takes seconds)."""
        if not self.journal_path.exists():
            FileFlash.create(self.journal_path, self.spec.retention).close()

    def _recovered_skip(self, journal: Journal) -> int:
        """Upstream records the relay journal already holds beyond the stored applied position."""
        saved = self.store.extra_state.get("forward")
        st = self.state()
        if not isinstance(saved, dict) or saved.get("volume") != st.volume_uuid:
            return 0
        if int(saved.get("upstream_seq", -1)) != st.applied_seq:
            return 0
        extra = journal.head_seq - int(saved.get("journal_seq", journal.head_seq))
        return st.applied_seq + extra if extra > 0 else 0

    def bitmap_or_fail(self) -> DirtyBitmap:
        if self.bitmap is None:
            raise OSError("the relay is not bound to a volume yet")
        return self.bitmap

    def upstream_hello(self, hello: jp.Hello) -> None:
        """The upstream's HELLO: a new volume or generation starts over (the upstream resyncs)."""
        st = self.state()
        if st.generation != hello.generation or st.volume_uuid != hello.volume_uuid.hex():
            self.skip_through = 0
        self.bind(hello.volume_uuid.hex(), hello.block_size, hello.volume_size // hello.block_size)

    # -- overflow ---------------------------------------------------------------------------------
    def overflowing(self) -> bool:
        """The relay journal is full (or the target is mid-resync): resync rounds are not final."""
        with self.lock:
            j = self.journal
            if self._overflow and j is not None and j.used_bytes <= RESUME_FILL * j.capacity_bytes:
                self._overflow = False
                log.warning("relay journal has room again: journaling resumed source=%s dirty_regions=%d",
                            self.source_id, self.bitmap.dirty_regions if self.bitmap else 0)
            return self._overflow or self.state().resync_active

    def _enter_overflow_locked(self, why: str) -> None:
        self._overflow = True
        self.overflow_events += 1
        j = self.journal
        log.warning("relay journal full: tracking dirty regions instead source=%s used_bytes=%d capacity_bytes=%d "
                    "reason=%s", self.source_id, j.used_bytes if j else 0, j.capacity_bytes if j else 0, why)

    # -- a promoted copy ---------------------------------------------------------------------------
    @property
    def promoted(self) -> bool:
        return self._promoted

    def promotion_begins(self) -> None:
        """The copy is primary here from now on (promoted, or opened again as primary after a
        restart): the records that reach the target are the promoted copy's own stream, relayed
        whole, with none skipped and none standing for an upstream position."""
        with self.lock:
            self._promoted = True
            self.skip_through = 0
            self._marks.clear()
        log.info("relay forwards the promoted copy's writes source=%s to=%s", self.source_id, self.spec.remote.label)

    def promotion_ends(self, upstream_seq: int) -> None:
        """The copy follows the upstream again from `upstream_seq` (a failback's fork position; 0
        after `resolve --keep local`): the relay journal's head now stands for that position, kept
        in the state file the caller saves next."""
        j = self.journal
        if j is not None:
            j.sync()
        with self.lock:
            self._promoted = False
            self.skip_through = 0
            self._marks.clear()
            self._last_head = j.head_seq if j is not None else 0
        if j is not None:
            self.store.extra_state["forward"] = {"upstream_seq": upstream_seq, "journal_seq": self._last_head,
                                                 "volume": self.state().volume_uuid}
        log.info("relay follows its upstream again source=%s upstream_seq=%d journal_seq=%d", self.source_id,
                 upstream_seq, self._last_head)

    def mark_rewritten(self, lba: int, count: int) -> None:
        """The target's blocks are rewritten outside the record stream (an incomplete resync rolled
        back from the undo log): the next hop gets those regions by a dirty-region round."""
        j, bm = self.journal, self.bitmap
        if j is None or bm is None:
            return  # not bound: the next hop is compared whole when the relay binds again
        with self.lock:
            self._mark_locked(bm, j, lba, count)

    # -- the ApplyHook ----------------------------------------------------------------------------
    def before_apply(self, records: Sequence[jp.RecordLike], read: Reader) -> None:
        j, bm = self.journal, self.bitmap
        if j is None or bm is None:
            raise OSError(f"the relay of source {self.source_id} is not bound to a volume")
        if self._promoted:
            self._relay_promoted(j, bm, records)
            return
        with self.lock:
            last = None
            for r in records:
                if r.seq <= self.skip_through:
                    continue
                last = r.seq
                kind = RecordKind(int(r.kind))
                if not self._overflow:
                    try:
                        j.append(kind, r.lba, r.count, bytes(r.payload), r.timestamp_ns)
                        self.records_relayed += 1
                        continue
                    except JournalFull as exc:
                        self._enter_overflow_locked(str(exc))
                    except ValueError as exc:  # a record larger than the relay journal takes
                        self._enter_overflow_locked(str(exc))
                self.records_overflowed += 1
                if kind in (RecordKind.WRITE, RecordKind.UNMAP):
                    self._mark_locked(bm, j, r.lba, r.count)
            if last is not None:
                self._marks.append((last, j.head_seq))

    def _relay_promoted(self, j: Journal, bm: DirtyBitmap, records: Sequence[jp.RecordLike]) -> None:
        """The promoted copy's writes: appended in order and synced before the target changes (no
        upstream sends them again after a crash); a full or failing relay journal marks their
        regions dirty instead (durably), so the next hop gets them by a dirty-region round."""
        journaled: list[tuple[int, int]] = []
        with self.lock:
            for r in records:
                kind = RecordKind(int(r.kind))
                blocks = kind in (RecordKind.WRITE, RecordKind.UNMAP)
                if not self._overflow:
                    try:
                        j.append(kind, r.lba, r.count, bytes(r.payload), r.timestamp_ns)
                        self.records_relayed += 1
                        if blocks:
                            journaled.append((r.lba, r.count))
                        continue
                    except (JournalError, ValueError) as exc:
                        self._enter_overflow_locked(str(exc))
                self.records_overflowed += 1
                if blocks:
                    self._mark_locked(bm, j, r.lba, r.count)
        try:
            j.sync()  # also wakes the link to the next hop
        except JournalError as exc:  # what it took may not be durable: the bitmap says so instead
            with self.lock:
                self._enter_overflow_locked(f"relay journal sync failed: {exc}")
                for lba, count in journaled:
                    self._mark_locked(bm, j, lba, count)

    def _mark_locked(self, bm: DirtyBitmap, j: Journal, lba: int, count: int) -> None:
        """Mark blocks dirty (durable before the target changes), noting the run they belong to."""
        head = j.head_seq
        if not self.dirty_epochs or self.dirty_epochs[-1][1:] != (head, head):
            self.dirty_epochs.append((bm.snapshot().token + 1, head, head))
        bm.mark(lba, count)

    def before_region(self, lba: int, count: int, read: Reader) -> None:
        j, bm = self.journal, self.bitmap
        if j is None or bm is None:
            raise OSError(f"the relay of source {self.source_id} is not bound to a volume")
        with self.lock:
            self._mark_locked(bm, j, lba, count)

    def resync_begin(self, base_seq: int, time_ns: int) -> None:
        pass

    # -- the target's group commit --------------------------------------------------------------
    def before_durable(self, seq: int) -> dict[str, Any]:
        """The target is synced up to `seq`; make the relay journal durable too (this wakes the link
        to the next hop) and return what the state file keeps beside `applied_seq = seq`."""
        j = self.journal
        if j is None:
            return {}
        j.sync()
        j.maybe_checkpoint()
        with self.lock:
            while self._marks and self._marks[0][0] <= seq:
                self._last_head = self._marks.popleft()[1]
            # nothing relayed after `seq` yet: the head is where `seq` left it
            head = self._last_head if self._marks else j.head_seq
        return {"forward": {"upstream_seq": seq, "journal_seq": head, "volume": self.state().volume_uuid}}

    # -- status and lifecycle -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        j, rep = self.journal, self.replicator
        out: dict[str, Any] = {"address": self.spec.remote.label, "upstream": self.upstream,
                               "retention_bytes": self.spec.retention}
        if j is None or rep is None:
            out.update({"state": "unbound", "lag_records": None, "lag_bytes": None, "lag_seconds": None})
            return out
        link = rep.links[0].status()
        out.update(link)
        out["address"] = self.spec.remote.label
        dirty = self.bitmap.dirty_regions if self.bitmap else 0
        # exact, not the link's estimate: the relay journal holds only what the next hop has not
        # confirmed (one consumer), and a dirty region is a region it may lack
        out["lag_bytes"] = j.used_bytes + dirty * self.region_blocks * self.block_size
        out.update({"journal_used_bytes": j.used_bytes, "journal_capacity_bytes": j.capacity_bytes,
                    "journal_head_seq": j.head_seq, "records_relayed": self.records_relayed,
                    "records_overflowed": self.records_overflowed, "overflow": self._overflow,
                    "promoted": self._promoted,
                    "overflow_events": self.overflow_events,
                    "dirty_regions": dirty})
        return out

    def _stop_forwarding(self) -> None:
        rep, self.replicator = self.replicator, None
        if rep is not None:
            rep.close()
        with self.lock:
            j, bm = self.journal, self.bitmap
            self.journal = self.bitmap = None
            self.key = None
        if j is not None:
            with contextlib.suppress(JournalError, OSError):
                j.checkpoint()
            j.close()
        if bm is not None:
            bm.close()

    def close(self) -> None:
        with self._bind_lock:
            self._stop_forwarding()

