"""The remote unit (`usbmirror remote`): a TCP/TLS server that applies each source's journal to its target.

Each source id maps to its own target (an image file, a partition, a whole disk or an md device,
opened as `firmware.volume.Volume`). A connection from a source goes through the journey protocol
(`firmware.link`): HELLO (the peer certificate must name the source id it asks for, or be a remote
of the same CA relaying it), then batches
of records, applied strictly in journal order, made durable (fdatasync of the target), and only then
acknowledged with the new applied position.

Durable position: `<state_dir>/<source id>.json`, a small sidecar written tmp + fsync + rename +
fsync(dir) after the target's fdatasync. A crash between the two re-applies records the source sends
again; records are absolute block writes applied in order, so applying one twice leaves the same
bytes (and a record at or below the stored position is skipped, counted as a duplicate).

Resync (initial sync, or after the source's journal overflowed): the source records its position P,
asks for region digests, sends the regions that differ, marks the end of the copy with Q (its position
then), and streams the records after P. Between the start of the resync and the moment records up to
Q are applied, the target is *not* a consistent image (regions copied at different instants). So,
when the target held a consistent image before (same volume, applied position > 0), every block
range is saved to an undo log (`<state_dir>/<source id>.undo`, fsynced before the target is
overwritten, one copy per 64 KiB chunk) from RESYNC_BEGIN until the position Q is applied; then the
log is dropped. `rollback_resync()` restores the pre-resync consistent image, for a switchover while a
resync is incomplete. docs/JOURNEY.md explains why the image at Q is consistent.

Layout: `firmware.replication.target.TargetSession` decides (hello checks, order of applies, the
durable position, resync state); `firmware.target_store.TargetStore` does the target's I/O (apply,
sync, state file, undo log, with the `ApplyHook` point before blocks are overwritten);
`firmware.link_transport.LinkTransport` carries frames; this module accepts connections and drives a
session per connection with the actions it returns.

Roles (docs/FAILOVER.md): the source's HELLO may be followed by its data generations, which a
replica adopts; `promote()` makes this copy primary (a new generation, recorded before anything is
served, an optional rollback to a point of the history, then a `PromotedStore` the bring-up serves to
a standby host); from then on the source's HELLO is answered with GENERATIONS and ERROR PRIMARY.

Cascade: a source given `forwards` is relayed to a further remote by `firmware.relay.Relay` (its
journal, dirty bitmap and link), hooked on the target's store; a relayed source takes writes from its
upstream only. A remote accepts a source from the source's own certificate or from any remote
certificate of the same CA (a relay).

What it does not do: decide when to resync (the source does).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware.crash_points import crash_point
from firmware.failover.generations import History, mib
from firmware.failover.state import SplitBrain, fresh_generation_id, open_roles
from firmware.history import DEFAULT_AGE_S, DiscardOnChange, HistoryError, HistoryWriter, history_dir, resolve
from firmware.history import status_keys as history_status_keys
from firmware.journal.bitmap import DirtyBitmap
from firmware.link import protocol as jp
from firmware.link_driver import LinkDriver, Waker
from firmware.link_transport import LinkTransport
from firmware.pairing import TlsFiles, peer_identity, server_context
from firmware.promotion import PromotedStore, rollback_to_point
from firmware.relay import ForwardSpec, Relay
from firmware.replication.target import (
    ApplyRecords,
    Close,
    CopyRegion,
    MakeDurable,
    ReadDigests,
    Refused,
    SaveState,
    Send,
    SyncNow,
    TargetAction,
    TargetSession,
    TargetState,
    Undo,
    UndoStep,
)
from firmware.replicator import ReplicatorTuning
from firmware.resources import process_resources
from firmware.storage import SpaceExhausted, StorageError
from firmware.target_store import TargetStore, UndoLog, save_json_durably, target_fingerprint
from firmware.volume import Volume, VolumeError

__all__ = ["PromoteError", "RemoteUnit", "RemoteUnitConfig", "SourceTarget", "TargetState", "UndoLog",
           "save_json_durably", "target_fingerprint"]

log = logging.getLogger(__name__)

HEALTHY_WITHIN_S = 10.0  # a connected source heard from this recently is healthy: promote refuses


class PromoteError(Exception):
    """`promote` refused or failed; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteUnitConfig:
    """`usbmirror remote` settings.

    `tls_dir=None` runs the link in plaintext: for tests and benchmarks only, never on a network.
    `volume_factory(path, size, block_size)` opens a target (tests substitute a failing volume).
    """

    listen: tuple[str, int]
    name: str
    targets: dict[str, str]
    tls_dir: str | None
    state_dir: str
    heartbeat_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    volume_factory: Callable[[str, int, int], Volume] | None = None
    history_size: int | None = None  # bytes of point-in-time history per source; None = none kept
    history_age_s: float = DEFAULT_AGE_S
    forwards: dict[str, ForwardSpec] = dataclasses.field(default_factory=dict)  # relayed sources (cascade)
    forward_tuning: ReplicatorTuning | None = None


class SourceTarget:
    """One source id's target: its session (positions, order of applies, resync state) and its store
    (volume, state file, undo log). One replicating connection at a time holds `lock`."""

    def __init__(self, unit: RemoteUnit, source_id: str, path: str) -> None:
        self.unit = unit
        self.source_id = source_id
        self.path = path
        self.store = TargetStore(source_id, path, unit.cfg.state_dir, unit.cfg.volume_factory)
        self.session = TargetSession(self.store.load_state(), remote_name=unit.cfg.name)
        self.roles = open_roles(unit.cfg.state_dir, source_id, primary=False)
        self.lock = threading.Lock()  # held by the connection that replicates
        self.active: _Connection | None = None
        self.last_error = ""
        self.connections = 0
        self.peer = ""
        self.last_ack_time: float | None = None
        self.last_heard: float | None = None  # monotonic: the replicating connection's last frame
        self.promoted: PromotedStore | None = None  # served to a standby host while this copy is primary
        self.promotion_error = ""
        self._rate: list[tuple[float, int]] = []  # (monotonic, bytes_applied) samples at ACK time
        self.history: HistoryWriter | None = None
        if unit.cfg.history_size is not None:
            self.history = HistoryWriter.reopen(history_dir(unit.cfg.state_dir, source_id),
                                                size_cap=unit.cfg.history_size, age_s=unit.cfg.history_age_s)
            if self.history is not None:
                self.store.add_hook(self.history)
        elif history_dir(unit.cfg.state_dir, source_id).exists():  # kept before: stale once the target changes
            self.store.add_hook(DiscardOnChange(history_dir(unit.cfg.state_dir, source_id)))
        self.relay: Relay | None = None
        fwd = unit.cfg.forwards.get(source_id)
        if fwd is not None:
            tls = TlsFiles.for_remote(unit.cfg.tls_dir, unit.cfg.name) if unit.cfg.tls_dir is not None else None
            self.relay = Relay(fwd, self.store, lambda: self.session.state, state_dir=unit.cfg.state_dir, tls=tls,
                               tuning=unit.cfg.forward_tuning)
            self.store.add_hook(self.relay)
            self.store.durable_hooks.append(self.relay.before_durable)
        self._finish_resolve()

    def start_relay(self) -> None:
        """Forward at once when the target already holds a volume (else at the upstream's HELLO)."""
        st = self.state
        if self.relay is not None and st.volume_uuid and st.block_size and st.num_blocks:
            try:
                self.relay.bind(st.volume_uuid, st.block_size, st.num_blocks)
            except (OSError, ValueError) as exc:
                log.error("relay could not start source=%s error=%s", self.source_id, exc)

    def open_history(self, hello: jp.Hello) -> None:
        """Keep point-in-time history for the volume this source sends (docs/HISTORY.md): a hook that
        saves before-images before the store overwrites the target."""
        cfg = self.unit.cfg
        if cfg.history_size is None:
            return
        key = (hello.volume_uuid.hex(), hello.generation, hello.block_size)
        h = self.history
        if h is not None and (h.meta.volume_uuid, h.meta.generation, h.meta.block_size) == key:
            return
        if h is not None:
            self.store.hooks.remove(h)
            h.close()
        self.history = HistoryWriter.open(history_dir(cfg.state_dir, self.source_id), block_size=hello.block_size,
                                          num_blocks=hello.volume_size // hello.block_size, volume_uuid=key[0],
                                          generation=hello.generation, target=os.path.realpath(self.path),
                                          base_seq=self.state.applied_seq, size_cap=cfg.history_size,
                                          age_s=cfg.history_age_s)
        self.store.add_hook(self.history)

    @property
    def state(self) -> TargetState:
        return self.session.state

    @property
    def records_applied(self) -> int:
        return self.session.records_applied

    @property
    def duplicates_skipped(self) -> int:
        return self.session.duplicates_skipped

    @property
    def undo_path(self) -> Path:
        return self.store.undo_path

    def note_ack(self) -> None:
        now = time.monotonic()
        self.last_ack_time = now
        self._rate.append((now, self.session.bytes_applied))
        while len(self._rate) > 2 and now - self._rate[0][0] > 5.0:
            self._rate.pop(0)

    def throughput_bps(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._rate[0], self._rate[-1]
        if self.last_ack_time is not None and time.monotonic() - self.last_ack_time > 5.0:
            return 0.0
        return (b1 - b0) / max(1e-3, t1 - t0)

    def rollback_resync(self) -> bool:
        """Restore the image from before an incomplete resync. True if one was restored."""
        if self.promoted is not None:
            return False
        with self.lock:
            return self._rollback_resync_locked()

    def _rollback_resync_locked(self) -> bool:
        before = self.relay.mark_rewritten if self.relay is not None else None
        if not self.session.rollback_possible() or not self.store.rollback(self.state, before):
            return False
        self.session.rolled_back()
        self.store.save_state(self.state)
        self.store.undo_discard()
        log.warning("rolled back incomplete resync source=%s applied_seq=%d", self.source_id,
                    self.state.applied_seq)
        return True

    # -- roles ----------------------------------------------------------------------------------
    def adopt_history(self, gens: jp.Generations) -> None:
        """The source's generations, sent after its HELLO: a replica takes them over when they
        descend from its own (the source's copy is the one it follows)."""
        try:
            theirs = History.from_tuples(gens.generations)
        except ValueError as exc:
            raise jp.ProtocolError(f"GENERATIONS: {exc}") from None
        st = self.roles.state
        if st.primary or theirs == st.history:
            return
        if not theirs.descends_from(st.history):
            log.warning("source generations do not descend from this copy's source=%s own=%s source_current=%s",
                        self.source_id, st.history.current and st.history.current.label,
                        theirs.current and theirs.current.label)
            return
        self.roles.update(history=theirs)
        log.info("adopted the source's data generation source=%s generation=%s", self.source_id,
                 theirs.current and theirs.current.label)

    def resolve(self, keep: str, *, dry_run: bool) -> dict[str, Any]:
        """`usbmirror resolve --keep local` on the remote (docs/FAILOVER.md): discard what was written on
        this promoted copy; it becomes the local unit's replica and is resynced from it (only regions
        whose digests differ cross). The caller stopped serving it. `--keep remote` is decided on the
        local unit, whose writes it discards."""
        st = self.roles.state
        if keep != "local":
            raise PromoteError("--keep remote discards the local unit's writes: run `usbmirror resolve --keep "
                               "remote` with the local unit's state dir")
        if not st.primary:
            raise PromoteError(f"the copy of source {self.source_id} is not primary here: it holds no writes of "
                               "its own to discard")
        cur = st.history.current
        promo = st.promotion or {}
        nbytes = self.promoted_dirty_bytes()
        when = _iso(promo["promoted_ns"] / 1e9) if isinstance(promo.get("promoted_ns"), int) else "an unknown time"
        text = (f"would discard {mib(nbytes)} written on {self.unit.cfg.name} since source "
                f"{self.source_id} was promoted there (generation {cur.label if cur else '?'}, at {when}); this "
                "copy becomes the local unit's replica and is resynced from it")
        out = {"source": self.source_id, "keep": keep, "discard_bytes": nbytes, "dry_run": dry_run}
        if dry_run:
            return {**out, "message": text}
        self.end_promotion_io()
        # under the target's lock: a HELLO that sees this copy a replica waits until the target is
        # marked as holding no known image, so the source never resumes on top of the discarded writes
        if not self.lock.acquire(timeout=max(5.0, self.unit.cfg.heartbeat_timeout_s)):
            raise PromoteError(f"a connection of source {self.source_id} holds its target; try again")
        try:
            self.roles.update(primary=False, history=History(st.history.generations[:-1]), promotion=None,
                              split_brain=None, resolution=None,
                              last_resync={"resolved": "keep local", "discarded_bytes": nbytes,
                                           "needs_full_resync": True, "resolved_ns": time.time_ns()})
            crash_point("resolve.recorded")
            self._finish_resolve()
        finally:
            self.lock.release()
        log.warning("split brain resolved: keep local source=%s discarded_bytes=%d", self.source_id, nbytes)
        return {**out, "message": text.replace("would discard", "discarded", 1)}

    def _finish_resolve(self) -> None:
        """After `resolve --keep local` was recorded: the target no longer holds the image of its
        applied position, so the next connection of the source starts a full comparison (a crash
        before this ran repeats it at the next start)."""
        rs = self.roles.state.last_resync or {}
        if not rs.get("needs_full_resync"):
            return
        ts = self.session.state
        ts.volume_uuid, ts.generation, ts.applied_seq, ts.target_id, ts.write_limit = "", 0, 0, "", 0
        self.session.reapply_until = self.session.written_seq = 0
        ts.resync_active = ts.resync_undo = False
        ts.resync_end = None
        self.session.forget_unsynced()
        if self.relay is not None:  # the local unit's resync to come is relayed like its records
            self.relay.promotion_ends(0)
        self.store.save_state(ts)
        if self.history is not None:
            if self.history in self.store.hooks:
                self.store.hooks.remove(self.history)
            self.history.close()
            self.history = None
        shutil.rmtree(history_dir(self.unit.cfg.state_dir, self.source_id), ignore_errors=True)
        self.roles.drop_bitmap(self.source_id)
        self.roles.update(last_resync={k: v for k, v in rs.items() if k != "needs_full_resync"})

    def note_primary_peer(self, gens: jp.Generations) -> None:
        """The old source's generations, sent after its HELLO to this primary copy: when it says it
        wrote since the two last agreed (it found a split brain), this side records it too."""
        st = self.roles.state
        if not st.primary or jp.GenerationsFlag.DIRTY not in gens.flags:
            return
        try:
            theirs = History.from_tuples(gens.generations)
        except ValueError:
            return
        own_bytes = self.promoted_dirty_bytes()
        sb = st.split_brain
        if sb is not None and sb.peer_generation == theirs.current and sb.peer_bytes == gens.dirty_bytes \
                and sb.own_bytes == own_bytes:
            return
        cur = st.history.current
        reason = (f"the local unit wrote {gens.dirty_bytes} bytes after this copy was promoted in generation "
                  f"{cur.label if cur else '?'}")
        self.roles.update(split_brain=SplitBrain(self.source_id, cur, theirs.current, own_bytes, gens.dirty_bytes,
                                                 reason, time.time_ns()))
        log.error("split brain source=%s own_bytes=%d peer_bytes=%d reason=%s", self.source_id, own_bytes,
                  gens.dirty_bytes, reason)

    def promoted_dirty_bytes(self) -> int:
        """Bytes (region granularity) written on this copy since it was promoted."""
        st = self.state
        if not st.block_size or not st.num_blocks:
            return 0
        if self.promoted is not None:
            regions = self.promoted.status()["dirty_regions"]
        elif self.roles.bitmap_path(self.source_id).exists():
            bm = self.roles.bitmap(self.source_id, num_blocks=st.num_blocks,
                                   region_blocks=max(1, (1 << 20) // st.block_size),
                                   volume_uuid=uuid.UUID(hex=st.volume_uuid))
            regions = bm.dirty_regions
        else:
            regions = 0
        return int(regions) * max(1, (1 << 20) // st.block_size) * st.block_size

    def behind(self) -> dict[str, Any]:
        """How far this copy is behind the source, as far as it knows: what a promotion puts at stake."""
        st, ses = self.state, self.session
        ts = ses.last_record_ts_ns
        if not ts and self.history is not None and self.history.index.next_id > self.history.index.first_id:
            idx = self.history.index
            ts = idx.time_ns(idx.next_id - 1)
        now = time.monotonic()
        return {
            "applied_seq": st.applied_seq,
            "applied_record_time": ts / 1e9 if ts else None,
            "applied_record_age_s": round(max(0.0, time.time() - ts / 1e9), 3) if ts else None,
            "seconds_since_source": None if self.last_heard is None else round(now - self.last_heard, 3),
        }

    def promote(self, *, serving: dict[str, Any], mark: str | None = None, at: str | None = None,
                seq: int | None = None, force: bool = False) -> dict[str, Any]:
        """Make this copy primary (docs/FAILOVER.md): refused while the source is connected and
        healthy. A new generation is recorded durably first, with `serving` (how the copy is served:
        `usbip`/`busid`, `iscsi`/`iscsi_target`/`iscsi_chap_user` or `gadget`) in its `promotion`;
        then the optional rollback to a point of the history; then the copy is opened read-write
        (`self.promoted`). Returns what happened and the warning saying what is at stake."""
        if self.roles.state.primary:
            raise PromoteError(f"source {self.source_id} is already primary on this remote"
                               f" ({self._serving_text()})")
        st = self.state
        if not st.volume_uuid or not st.num_blocks or not st.block_size:
            raise PromoteError(f"this remote holds no copy of source {self.source_id} yet (it never connected)")
        conn = self.active
        now = time.monotonic()
        if conn is not None:
            heard = None if self.last_heard is None else now - self.last_heard
            if heard is not None and heard < HEALTHY_WITHIN_S:
                raise PromoteError(f"source {self.source_id} is connected and healthy (last heard {heard:.1f} s ago "
                                   f"from {self.peer}): stop it or cut it off first; promoting now would fork its "
                                   "data")
            log.warning("promote: ending a silent connection source=%s peer=%s", self.source_id, self.peer)
            conn.kill()
        if not self.lock.acquire(timeout=max(5.0, self.unit.cfg.heartbeat_timeout_s)):
            raise PromoteError(f"a connection of source {self.source_id} still holds its target; try again")
        try:
            return self._promote_locked(serving=serving, mark=mark, at=at, seq=seq, force=force)
        except BaseException as exc:
            if self.roles.state.primary and self.promoted is None:
                self.promotion_error = str(exc)
            if self.promoted is None:
                self.lock.release()
            raise

    def _promote_locked(self, *, serving: dict[str, Any], mark: str | None, at: str | None, seq: int | None,
                        force: bool) -> dict[str, Any]:
        st = self.state
        rolled_resync = False
        if st.resync_active:
            if not self.session.rollback_possible():
                raise PromoteError(f"the copy of source {self.source_id} is in the middle of a first full copy: "
                                   "it never held a whole image and cannot be promoted")
            if not force:
                raise PromoteError(f"a resync of source {self.source_id} is incomplete: the target is not a whole "
                                   f"image; --force rolls it back to the image from before the resync (seq "
                                   f"{st.resync_base_seq}) and promotes that")
            rolled_resync = self._rollback_resync_locked()
        torn = ""
        if self.session.reapplying:
            torn = (f"the target may hold torn writes of the records after seq {st.applied_seq} (up to seq "
                    f"{self.session.reapply_until}): the remote stopped without syncing them (a power cut or a "
                    "crash) and the source has not sent them again")
            if not force:
                raise PromoteError(f"{torn}; it is consistent again once the source reconnects and they are "
                                   "applied; --force promotes it as it is (check its file system)")
        behind = self.behind()
        point_seq: int | None = None
        what = f"the newest image (seq {st.applied_seq})"
        if mark is not None or at is not None or seq is not None:
            if self.history is None:
                raise PromoteError(f"source {self.source_id} has no history on this remote (--history-size): "
                                   "it can only be promoted at its newest image")
            try:
                res = resolve(self.history.index, mark=mark, at=at, seq=seq)
            except HistoryError as exc:
                raise PromoteError(str(exc)) from None
            point_seq, what = res.seq, res.what
        fork = point_seq if point_seq is not None else st.applied_seq
        now_ns = time.time_ns()
        roles = self.roles.state
        hist = roles.history.promote(gen_id=fresh_generation_id(), now_ns=now_ns, fork_seq=fork)
        cur = hist.current
        assert cur is not None
        warning = (f"source {self.source_id} is promoted while its local unit is "
                   f"{'silent' if self.active is not None else 'not connected'}: this copy has applied up to "
                   f"seq {behind['applied_seq']}"
                   + (f", written by the local unit at {_iso(behind['applied_record_time'])} "
                      f"({behind['applied_record_age_s']:.0f} s ago)" if behind["applied_record_time"] else "")
                   + (f", last heard {behind['seconds_since_source']:.0f} s ago" if behind["seconds_since_source"]
                      is not None else "")
                   + "; whatever the local unit acknowledged after that is not in this copy (the failover's loss)"
                   + (f"; {torn} (promoted with --force)" if torn else "")
                   + (f"; the target is rolled back to {what}, discarding the writes after it" if point_seq is not None
                      and point_seq < st.applied_seq else ""))
        # a fresh bitmap of the regions this copy writes as primary, durable (empty) before the promotion
        # names it: one left by an earlier generation is dropped first
        self.roles.drop_bitmap(self.source_id)
        self._bitmap()
        promotion = {**serving, "point": what, "fork_seq": fork, "promoted_ns": now_ns, "bitmap": cur.label,
                     "rollback_to_seq": point_seq if point_seq is not None and point_seq < st.applied_seq else None,
                     "behind": behind, "resync_rolled_back": rolled_resync,
                     "torn_after_seq": st.applied_seq if torn else None}
        self.roles.update(primary=True, history=hist, promotion=promotion, split_brain=None, resolution=None)
        log.warning("promoted source=%s generation=%s fork_seq=%d point=%s warning=%s", self.source_id, cur.label,
                    fork, what, warning)
        crash_point("promote.recorded")
        self._open_promoted()
        return {"source": self.source_id, "generation": cur.label, "fork_seq": fork, "point": what,
                "warning": warning, "behind": behind, **serving}

    def resume_promotion(self) -> PromotedStore | None:
        """A remote that starts with this copy primary: finish what the promotion left undone and
        open the copy again (None when it is a replica). Raises PromoteError (also kept in status)."""
        if not self.roles.state.primary or self.promoted is not None:
            return self.promoted
        if (self.roles.state.promotion or {}).get("handover"):
            return None  # a failback is under way: the copy is no longer served
        if not self.lock.acquire(timeout=5.0):
            raise PromoteError(f"the target of source {self.source_id} is busy")
        try:
            self._open_promoted()
        except BaseException as exc:
            self.promotion_error = str(exc)
            self.lock.release()
            raise
        return self.promoted

    def _open_promoted(self) -> None:
        """With `lock` held and the role state primary: the pending rollback, then the store."""
        st = self.state
        bs, n = st.block_size, st.num_blocks
        try:
            self.store.open(n * bs, bs)
        except (VolumeError, StorageError) as exc:
            raise PromoteError(f"cannot open the target {self.path}: {exc}") from None
        last = self.history.index.last_seq if self.history is not None else 0
        next_seq = max(st.applied_seq, last) + 1
        bitmap = self._promoted_bitmap()
        if self.relay is not None:  # a relay goes on forwarding: the standby host's writes reach its next hop
            if self.relay.journal is None:
                self.start_relay()
            if self.relay.journal is None:
                raise PromoteError(f"source {self.source_id} is relayed to {self.relay.spec.remote.label} but the "
                                   "relay could not start (see the log): the promoted copy's writes would not reach "
                                   "it")
            self.relay.promotion_begins()
        pending = (self.roles.state.promotion or {}).get("rollback_to_seq")
        if isinstance(pending, int):
            try:
                blocks, next_seq = rollback_to_point(self.store, self.unit.cfg.state_dir, self.source_id,
                                                     os.path.realpath(self.path), seq=pending, next_seq=next_seq,
                                                     num_blocks=n, mark=bitmap.mark)
            except (HistoryError, OSError, StorageError) as exc:
                raise PromoteError(f"rolling the target of source {self.source_id} back to seq {pending} "
                                   f"failed: {exc}") from None
            promo = dict(self.roles.state.promotion or {})
            promo["rollback_to_seq"] = None
            promo["rolled_back_blocks"] = blocks
            self.roles.update(promotion=promo)
            log.warning("rolled the promoted target back source=%s seq=%d blocks=%d", self.source_id, pending,
                        blocks)
        self.promoted = PromotedStore(self.store, bitmap, num_blocks=n, block_size=bs, next_seq=next_seq)
        self.promotion_error = ""

    def _bitmap(self) -> DirtyBitmap:
        """The regions written on this copy since it and its source last agreed (1 MiB regions)."""
        st = self.state
        return self.roles.bitmap(self.source_id, num_blocks=st.num_blocks,
                                 region_blocks=max(1, (1 << 20) // st.block_size),
                                 volume_uuid=uuid.UUID(hex=st.volume_uuid))

    def bitmap_doubt(self) -> str:
        """Why the bitmap may not hold every region written on this promoted copy ("" when it does):
        it belongs to another generation (or to a promotion recorded before bitmaps were named), it
        was lost or its header damaged, or the promotion rolled back an incomplete resync (the copy
        then differs from the source by more than the writes either side recorded)."""
        roles = self.roles.state
        promo = roles.promotion or {}
        cur = roles.history.current
        path = self.roles.bitmap_path(self.source_id)
        if promo.get("bitmap_lost"):
            return str(promo["bitmap_lost"])
        if cur is None or promo.get("bitmap") != cur.label:
            return (f"the bitmap of this copy's writes is not recorded for generation {cur.label if cur else '?'} "
                    f"(recorded: {promo.get('bitmap')})")
        if promo.get("resync_rolled_back"):
            return "the promotion rolled back an incomplete resync"
        if self.source_id not in self.roles.open_bitmaps() and not path.exists():
            return f"the bitmap {path} is missing"
        return ""

    def _promoted_bitmap(self) -> DirtyBitmap:
        """The bitmap the promoted copy marks before each write; one that was lost or damaged since
        the promotion is noted in `promotion.bitmap_lost` (durably, before the copy takes a write):
        a failback then compares every region."""
        doubt = self.bitmap_doubt()
        bm = self._bitmap()
        if not doubt and bm.damaged:
            doubt = f"the bitmap {self.roles.bitmap_path(self.source_id)} was damaged"
        if doubt and not (self.roles.state.promotion or {}).get("bitmap_lost"):
            self.roles.update(promotion={**(self.roles.state.promotion or {}), "bitmap_lost": doubt})
            log.error("promoted copy: its bitmap cannot be trusted source=%s reason=%s; a failback compares every "
                      "region", self.source_id, doubt)
        return bm

    def dirty_regions_frames(self) -> list[jp.DirtyRegions]:
        """The answer to a failback's DIRTY_REQUEST: the regions written on this copy since the
        promotion, or (not TRUSTED) why they cannot be trusted."""
        st = self.state
        rb = max(1, (1 << 20) // st.block_size)
        total = (st.num_blocks + rb - 1) // rb
        doubt = self.bitmap_doubt()
        bm = None if doubt else self._bitmap()
        if bm is not None and bm.damaged:
            doubt = f"the bitmap {self.roles.bitmap_path(self.source_id)} was damaged"
        if bm is None or doubt:
            log.warning("failback: this copy's bitmap cannot be trusted source=%s reason=%s", self.source_id, doubt)
            return [jp.DirtyRegions(jp.DirtyFlag.LAST, rb, total, 0, b"", doubt)]
        bits = bytearray((total + 7) // 8)
        for r in bm.snapshot().region_indices:
            bits[r >> 3] |= 1 << (r & 7)
        step = jp.MAX_DIRTY_BITMAP_BYTES
        out = []
        for off in range(0, max(1, len(bits)), step):
            last = off + step >= len(bits)
            flags = jp.DirtyFlag.TRUSTED | (jp.DirtyFlag.LAST if last else jp.DirtyFlag.NONE)
            out.append(jp.DirtyRegions(flags, rb, total, off * 8, bytes(bits[off : off + step])))
        return out

    def end_promotion_io(self) -> None:
        """The remote stops: the promoted copy takes no more I/O and the target lock is released
        (the role state stays primary)."""
        p, self.promoted = self.promoted, None
        if p is not None:
            p.close()
            self.lock.release()

    def begin_failback(self) -> dict[str, Any]:
        """`usbmirror failback`: the copy is no longer served (the caller stopped its server) and takes
        no more writes; the role state says a handover is under way, so the old local unit (a
        replica) pulls what changed, takes the source back in a new generation, and this copy
        becomes its replica (`handed_back`)."""
        st = self.roles.state
        if not st.primary:
            raise PromoteError(f"source {self.source_id} is not primary on this remote: nothing to fail back")
        written = self.promoted.status() if self.promoted is not None else {}
        self.end_promotion_io()
        promo = dict(st.promotion or {})
        if not promo.get("handover"):
            promo["handover"] = True
            promo["handover_ns"] = time.time_ns()
            self.roles.update(promotion=promo)
            log.warning("failback: the promoted copy is no longer served source=%s writes=%s", self.source_id,
                        written.get("writes"))
            crash_point("failback.handover")
        return {"source": self.source_id, "generation": st.history.current.label if st.history.current else None,
                "promoted_io": written}

    def handed_back(self, gens: jp.Generations, *, bytes_compared: int = 0) -> int:
        """A FETCH connection's GENERATIONS: the local unit pulled what changed and is primary again
        in the generation after ours. This copy becomes its replica at that generation's fork
        position (stored first, so the source never ships the writes it lost on top of it). Returns
        the position to acknowledge."""
        try:
            theirs = History.from_tuples(gens.generations)
        except ValueError as exc:
            raise jp.ProtocolError(f"GENERATIONS: {exc}") from None
        st = self.roles.state
        cur, new = st.history.current, theirs.current
        if not st.primary or not (st.promotion or {}).get("handover"):
            raise Refused(jp.ErrorCode.SEQUENCE, f"no failback of source {self.source_id} is under way")
        if new is None or cur is None or theirs.successor(cur) != new:
            raise Refused(jp.ErrorCode.SEQUENCE, f"generation {new and new.label} does not follow this copy's "
                          f"{cur and cur.label}")
        ts = self.session.state
        ts.applied_seq = ts.write_limit = self.session.written_seq = new.fork_seq
        self.session.reapply_until = 0
        self.session.forget_unsynced()
        self.store.sync()
        if self.relay is not None:  # the upstream's records after the fork follow what was relayed
            self.relay.promotion_ends(new.fork_seq)
        self.store.save_state(ts)
        crash_point("failback.handed_back")
        if self.history is not None:  # its seqs are the promoted copy's, not the source's: start anew
            if self.history in self.store.hooks:
                self.store.hooks.remove(self.history)
            self.history.close()
            self.history = None
            shutil.rmtree(history_dir(self.unit.cfg.state_dir, self.source_id), ignore_errors=True)
        self.roles.drop_bitmap(self.source_id)
        self.roles.update(primary=False, history=theirs, promotion=None, split_brain=None, resolution=None,
                          last_resync={"failback_ns": time.time_ns(), "to": self.peer or "the local unit",
                                       "fork_seq": new.fork_seq, "bytes_compared": bytes_compared})
        log.warning("failback complete: the local unit is primary again source=%s generation=%s applied_seq=%d",
                    self.source_id, new.label, new.fork_seq)
        return new.fork_seq

    def _serving_text(self) -> str:
        return serving_text(self.roles.state.promotion or {})

    def status(self) -> dict[str, Any]:
        st, ses = self.state, self.session
        pct = None
        if st.resync_active and ses.resync_regions_total:
            pct = 100.0 * ses.resync_regions_done / ses.resync_regions_total
        return {
            "source_id": self.source_id,
            "target": self.path,
            "state": "primary" if self.roles.state.primary else
                     ("resyncing" if st.resync_active else "connected") if self.active else
                     ("error" if self.last_error else "idle"),
            "consistent": ses.consistent,
            "reapplying_until": ses.reapply_until if ses.reapplying else None,
            "rollback_available": st.resync_active and st.resync_undo,
            "peer": self.peer,
            "applied_seq": st.applied_seq,
            "volume_uuid": st.volume_uuid,
            "generation": st.generation,
            "records_applied": ses.records_applied,
            "duplicates_skipped": ses.duplicates_skipped,
            "bytes_applied": ses.bytes_applied,
            "connections": self.connections,
            "resync_percent": pct,
            "last_error": self.last_error,
            "seconds_since_ack": None if self.last_ack_time is None else time.monotonic() - self.last_ack_time,
            "throughput_bps": round(self.throughput_bps(), 1),
            "applied_record_age_s": (None if not ses.last_record_ts_ns
                                     else max(0.0, time.time() - ses.last_record_ts_ns / 1e9)),
            **self.roles.state.status(),
            **({"promoted_io": self.promoted.status()} if self.promoted is not None else {}),
            **({"promotion_error": self.promotion_error} if self.promotion_error else {}),
            **(self.history.status_keys() if self.history is not None else
               history_status_keys(None, self.unit.cfg.history_size, self.unit.cfg.history_age_s, time.time_ns())),
            **({"forward": self.relay.status()} if self.relay is not None else {}),
        }

    def close(self) -> None:
        self.end_promotion_io()
        if self.relay is not None:
            self.relay.close()
        self.roles.close()
        self.store.close()
        if self.history is not None:
            self.history.close()
            self.history = None


def serving_text(promo: dict[str, Any]) -> str:
    """How a promoted copy is served, in words (from its role state's `promotion`)."""
    if promo.get("handover"):
        return "no longer served: a failback is under way"
    if promo.get("iscsi"):
        return f"served over iSCSI on {promo['iscsi']} target {promo.get('iscsi_target')}"
    if promo.get("gadget") is not None:
        return f"served through the USB gadget (UDC {promo['gadget'] or 'the first one'})"
    if promo.get("usbip"):
        return f"served over USB/IP on {promo['usbip']} busid {promo.get('busid') or '1-1'}"
    return "not served"


def _iso(t: float | None) -> str:
    if t is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class _Flusher:
    """Carries out MakeDurable off the receive path (group commit): sync the target, store the
    position, then `waker.wake()` so the connection's driver reports `durable(seq)` and ACKs."""

    def __init__(self, target: SourceTarget) -> None:
        self.target = target
        self.cond = threading.Condition()
        self.requested = 0
        self.done = 0
        self.busy = False
        self.error: BaseException | None = None
        self._stop = False
        self.waker = Waker()
        self.thread = threading.Thread(target=self._run, name="remote-flusher", daemon=True)
        self.thread.start()

    def request(self, seq: int) -> None:
        with self.cond:
            self.requested = seq
            self.busy = True
            self.cond.notify_all()

    def wait_idle(self) -> None:
        with self.cond:
            while self.busy:
                self.cond.wait(0.5)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.busy and not self._stop:
                    self.cond.wait()
                if self._stop:
                    return
                seq = self.requested
            t = self.target
            try:
                t.store.make_durable(t.state, seq)
                self.done = max(self.done, seq)
            except BaseException as exc:  # handed to the connection thread, which reports it
                self.error = exc
            with self.cond:
                self.busy = False
                self.cond.notify_all()
            self.waker.wake()

    def stop(self) -> None:
        with self.cond:
            while self.busy:
                self.cond.wait(0.5)
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=10)
        self.waker.close()


class _Connection:
    """One accepted connection, served by its own thread: the driver of a target session.

    It turns frames into `TargetSession` calls and carries out the actions they return on the
    target's `TargetStore` (apply, sync, state file, undo log) and the link."""

    def __init__(self, unit: RemoteUnit, sock: socket.socket, peer: str) -> None:
        self.unit = unit
        self.link = LinkTransport(sock, jp.Role.REMOTE, timeout=unit.cfg.heartbeat_timeout_s)
        self.peer = peer
        self.target: SourceTarget | None = None
        self.session: TargetSession | None = None  # the target's, or a verify connection's own
        self.replicating = False
        self.fetching = False  # a failback's FETCH connection: holds the target's lock
        self.bytes_digested = 0  # bytes of the target a failback's FETCH connection read to compare digests
        self.refusing: tuple[SourceTarget, Refused] | None = None  # primary: refuse after the source's GENERATIONS
        self.closing = False
        self.flusher: _Flusher | None = None

    def kill(self) -> None:
        self.closing = True
        self.link.shutdown()

    def run(self) -> None:
        try:
            self._serve()
        except Refused as exc:
            self.unit.refused += 1
            self.unit.log_refusal(self.peer, exc)
            self._note_error(f"{exc.code.name}: {exc}")
            self.link.try_send(jp.Error(exc.code, str(exc)))
        except jp.ProtocolError as exc:
            log.warning("protocol error peer=%s code=%s reason=%s", self.peer, exc.code.name, exc)
            self._note_error(f"protocol: {exc}")
            self.link.try_send(jp.Error(exc.code, str(exc)))
        except StorageError as exc:
            code = jp.ErrorCode.TARGET_FULL if isinstance(exc, SpaceExhausted) else jp.ErrorCode.TARGET_IO
            log.error("target failure source=%s code=%s reason=%s", self.target and self.target.source_id,
                      code.name, exc)
            self._note_error(f"{code.name}: {exc}")
            self.link.try_send(jp.Error(code, str(exc)))
        except (OSError, TimeoutError) as exc:
            if not self.closing:
                log.info("connection lost peer=%s reason=%s", self.peer, exc)
        except Exception:
            log.exception("unexpected failure peer=%s", self.peer)
            self.link.try_send(jp.Error(jp.ErrorCode.INTERNAL, "internal error"))
        finally:
            if self.flusher is not None:
                self.flusher.stop()
            self._release()
            self.link.close()

    def _note_error(self, message: str) -> None:
        if self.target is not None:
            self.target.last_error = message

    def _release(self) -> None:
        t = self.target
        if t is not None and self.fetching:
            self.fetching = False
            t.lock.release()
            return
        if t is None or not self.replicating or t.active is not self:
            return
        t.active = None
        last = t.session.connection_lost()
        if last is not None and t.store.volume is not None:
            try:
                t.store.make_durable(t.state, last.seq)
                t.session.durable(last.seq)  # the ACK it returns has no connection to go to
            except (StorageError, OSError) as exc:
                log.warning("could not save the applied position source=%s error=%s", t.source_id, exc)
        t.session.forget_unsynced()
        if t.session.settle_write_limit() and t.store.volume is not None:
            try:  # a stop now leaves a target the next start knows is consistent
                t.store.save_state(t.state)
            except (StorageError, OSError) as exc:
                log.warning("could not save the write limit source=%s error=%s", t.source_id, exc)
        t.lock.release()

    # -- the loop -------------------------------------------------------------------------------
    def _serve(self) -> None:
        """Receive and apply in this thread (the `LinkDriver`); make durable in the flusher thread
        (group commit), so the link keeps flowing while the target syncs. Only this thread touches
        the socket."""
        timeout = self.unit.cfg.heartbeat_timeout_s
        driver = LinkDriver(self.link, self)
        while not self.closing:
            if self.flusher is not None and not driver.wakers:
                driver.wakers.append(self.flusher.waker)
            if not driver.pump(timeout):
                raise TimeoutError(f"nothing heard for {timeout} s")

    # -- the driver's channel -------------------------------------------------------------------
    def on_wake(self, waker: Waker) -> None:
        self._flush_done()

    def on_events(self, events: Sequence[jp.Event]) -> None:
        if self.replicating and self.target is not None:
            self.target.last_heard = time.monotonic()
            ahead = [ev.records[-1].seq for ev in events if isinstance(ev, jp.Batch) and ev.records]
            if ahead and self.session is not None:  # one write-limit save covers every batch at hand
                self.session.write_ahead = max(ahead)
        for ev in events:
            self._event(ev)
            if self.closing:
                return
        self._maybe_flush()

    def _event(self, ev: jp.Event) -> None:
        if isinstance(ev, jp.Hello):
            self._hello(ev)
            return
        if self.refusing is not None:
            rt, refusal = self.refusing
            if not isinstance(ev, jp.Generations):
                raise refusal
            rt.note_primary_peer(ev)
            raise refusal
        t, ses = self.target, self.session
        if t is None or ses is None:
            raise jp.ProtocolError(f"{type(ev).__name__} before HELLO")
        if isinstance(ev, jp.Generations):
            if self.replicating:
                t.adopt_history(ev)
            elif self.fetching:
                self.link.send(jp.Ack(t.handed_back(ev, bytes_compared=self.bytes_digested)))
            return
        if isinstance(ev, jp.DirtyRequest):
            if not self.fetching:
                raise jp.ProtocolError("DIRTY_REQUEST outside a failback")
            for frame in t.dirty_regions_frames():
                self.link.send(frame)
            return
        if isinstance(ev, jp.RegionRead):
            if not self.fetching:
                raise jp.ProtocolError("REGION_READ outside a failback")
            ses._check_range(ev.lba, ev.count)
            vol = t.store.volume
            if vol is None:
                raise Refused(jp.ErrorCode.TARGET_IO, "the target is not open")
            self.link.send(jp.RegionData(ev.lba, vol.read(ev.lba, ev.count)))
            return
        if isinstance(ev, jp.ResyncBegin | jp.ResyncEnd):
            self._quiesce()
        self._do(t, ses, ses.event(ev))
        if isinstance(ev, jp.ResyncBegin) and t.history is not None and self.replicating:
            t.store.resync_begins(ses.state.resync_base_seq)  # the history keeps the image from before it

    def _do(self, t: SourceTarget, ses: TargetSession, actions: list[TargetAction]) -> None:
        """Carry out a session's actions, in order."""
        store = t.store
        for a in actions:
            if isinstance(a, ApplyRecords):
                store.apply(a.records)
                ses.applied_ok(a.records)
            elif isinstance(a, Send):
                self.link.send(a.event)
                if isinstance(a.event, jp.Ack) and self.replicating:
                    t.note_ack()
            elif isinstance(a, CopyRegion):
                store.copy_region(a.lba, a.data)
            elif isinstance(a, ReadDigests):
                self.link.send(jp.RegionDigests(a.first_region, a.region_blocks,
                                                store.digests(a.first_region, a.count, a.region_blocks)))
                if self.fetching:  # what a failback made this side read
                    n = t.state.num_blocks
                    lo, hi = min(n, a.first_region * a.region_blocks), min(n, (a.first_region + a.count) * a.region_blocks)
                    self.bytes_digested += (hi - lo) * t.state.block_size
            elif isinstance(a, SyncNow):
                store.sync()
            elif isinstance(a, SaveState):
                store.save_state(ses.state)
            elif isinstance(a, MakeDurable):
                self._request_flush(a.seq)
            elif isinstance(a, Undo):
                self._undo(t, ses.state, a.step)
            elif isinstance(a, Close):
                log.warning("closing source=%s reason=%s", t.source_id, a.reason)
                self.closing = True
            else:  # pragma: no cover - every action is handled above
                raise AssertionError(f"unhandled action {a!r}")

    def _undo(self, t: SourceTarget, st: TargetState, step: UndoStep) -> None:
        if step is UndoStep.DISCARD:
            t.store.undo_discard()
        elif step is UndoStep.OPEN:
            t.store.undo_open(st.block_size or 512)
        else:
            t.store.undo_discard()
            if t.history is not None:
                t.history.resync_end(st.applied_seq, time.time_ns())
            log.info("resync complete source=%s applied_seq=%d", t.source_id, st.applied_seq)

    def _hello(self, hello: jp.Hello) -> None:
        sock = self.link.sock
        ident = peer_identity(sock) if isinstance(sock, ssl.SSLSocket) else ("source", hello.source_id)
        t = self.unit.targets.get(hello.source_id)
        # the source itself, or a remote of the same CA relaying it (cascade, firmware/relay.py)
        if ident is None or not (ident == ("source", hello.source_id) or ident[0] == "remote"):
            raise Refused(jp.ErrorCode.PERMISSION_DENIED,
                          f"certificate names {ident and ':'.join(ident)!r}, not source {hello.source_id!r} "
                          "or a remote relaying it")
        if t is None:
            raise Refused(jp.ErrorCode.UNKNOWN_SOURCE, f"no target for source {hello.source_id!r}")
        if t.relay is not None and hello.purpose in (jp.Purpose.REPLICATE, jp.Purpose.FETCH):
            t.relay.check_upstream(ident, self.peer)
        roles = t.roles.state
        handover = bool((roles.promotion or {}).get("handover"))
        if hello.purpose is jp.Purpose.FETCH:
            if not roles.primary or not handover:
                raise Refused(jp.ErrorCode.SEQUENCE, f"no failback of source {hello.source_id} is under way on "
                              f"remote {self.unit.cfg.name} (`usbmirror failback` starts one)")
            if not t.lock.acquire(timeout=max(5.0, self.unit.cfg.heartbeat_timeout_s)):
                raise Refused(jp.ErrorCode.BUSY, "another connection holds this source's target")
            self.target = t
            self.fetching = True
            t.peer = self.peer
            session = TargetSession(dataclasses.replace(t.state), remote_name=self.unit.cfg.name)
        elif roles.primary:
            cur = roles.history.current
            if jp.Feature.GENERATIONS in hello.features:
                flags = jp.GenerationsFlag.PRIMARY
                if t.promoted is not None and t.promoted.status()["dirty_regions"]:
                    flags |= jp.GenerationsFlag.DIRTY
                if handover:
                    flags |= jp.GenerationsFlag.HANDOVER
                self.link.send(jp.Generations(roles.history.as_tuples(), flags))
            refusal = Refused(jp.ErrorCode.PRIMARY,
                              f"remote {self.unit.cfg.name} is primary for source {hello.source_id} now (promoted "
                              f"in generation {cur.label if cur else '?'} at seq "
                              f"{(roles.promotion or {}).get('fork_seq', '?')}): it takes no writes from this "
                              "unit; this unit must become its replica (docs/FAILOVER.md)")
            if jp.Feature.GENERATIONS in hello.features and hello.purpose is jp.Purpose.REPLICATE:
                self.refusing = (t, refusal)  # the source's GENERATIONS follow: read them, then refuse
                return
            raise refusal
        elif hello.purpose is jp.Purpose.REPLICATE:
            old = t.active
            if old is not None:
                log.info("new connection supersedes the old one source=%s", t.source_id)
                old.kill()
            if not t.lock.acquire(timeout=max(5.0, self.unit.cfg.heartbeat_timeout_s)):
                raise Refused(jp.ErrorCode.BUSY, "another connection still replicates this source")
            self.target = t
            self.replicating = True
            t.active = self
            t.connections += 1
            t.peer = self.peer
            self.flusher = _Flusher(t)
            session = t.session
        else:
            self.target = t
            # a verify connection reads digests only: a session of its own over a copy of the state
            session = TargetSession(dataclasses.replace(t.state), remote_name=self.unit.cfg.name)
        self.session = session
        try:
            vol = t.store.open(hello.volume_size, hello.block_size)
        except VolumeError as exc:
            raise Refused(jp.ErrorCode.VOLUME_MISMATCH, str(exc)) from None
        except StorageError as exc:
            raise Refused(jp.ErrorCode.TARGET_IO, str(exc)) from None
        if hello.purpose is jp.Purpose.REPLICATE:
            t.open_history(hello)
            if t.relay is not None:
                t.relay.upstream_hello(hello)
        actions = session.hello(hello, target_id=t.store.target_id, target_blocks=vol.num_blocks)
        self._do(t, session, actions)
        log.info("source connected source=%s peer=%s cert=%s purpose=%s applied_seq=%d", t.source_id, self.peer,
                 ":".join(ident), hello.purpose.name, session.state.applied_seq)

    # -- group commit ---------------------------------------------------------------------------
    def _request_flush(self, seq: int) -> None:
        assert self.flusher is not None
        self.flusher.request(seq)

    def _maybe_flush(self) -> None:
        t = self.target
        if t is None or self.flusher is None:
            return
        want = t.session.want_flush(self.flusher.busy)
        if want is not None:
            self.flusher.request(want.seq)

    def _flush_done(self) -> None:
        """The flusher made a position durable: the session acknowledges it (and finishes a resync at Q)."""
        f, t = self.flusher, self.target
        assert f is not None and t is not None
        f.waker.clear()
        err = f.error
        if err is not None:
            f.error = None
            raise err
        self._do(t, t.session, t.session.durable(f.done))
        self._maybe_flush()

    def _quiesce(self) -> None:
        """Wait for a flush in progress and acknowledge it (before resync state changes)."""
        f, t = self.flusher, self.target
        if f is not None and t is not None and (f.busy or f.done > t.session.acked):
            f.wait_idle()
            self._flush_done()


class RemoteUnit:
    """The remote unit server. `with RemoteUnit(cfg) as ru: ru.serve_forever()` (or start()/stop())."""

    def __init__(self, cfg: RemoteUnitConfig) -> None:
        self.cfg = cfg
        seen: dict[str, str] = {}
        for sid, path in cfg.targets.items():
            real = os.path.realpath(path)
            if real in seen:
                raise ValueError(f"sources {seen[real]!r} and {sid!r} both map to {path}: each source needs "
                                 "its own target")
            seen[real] = sid
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        self.targets = {sid: SourceTarget(self, sid, path) for sid, path in cfg.targets.items()}
        self._ctx: ssl.SSLContext | None = None
        if cfg.tls_dir is not None:
            self._ctx = server_context(TlsFiles.for_remote(cfg.tls_dir, cfg.name))
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[_Connection] = set()
        self._mutex = threading.Lock()
        self.refused = 0
        # a refusal repeated by a retrying source is logged once a minute, with how often it came
        self._refusals_logged: dict[str, tuple[float, int]] = {}
        self.started = time.monotonic()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        for tgt in self.targets.values():  # before any upstream can connect
            tgt.start_relay()
        host, port = self.cfg.listen
        ls = socket.create_server((host, port), reuse_port=False, backlog=16)
        ls.settimeout(0.2)
        self._listener = ls
        t = threading.Thread(target=self._accept_loop, name="remote-accept", daemon=True)
        t.start()
        self._accept_thread = t
        log.info("remote unit listening name=%s address=%s:%d targets=%s tls=%s", self.cfg.name, host, self.port,
                 ",".join(self.targets), self._ctx is not None)

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        if self._listener is None:
            self.start()
        while not self._stop.is_set() and not (stop is not None and stop.is_set()):
            self._stop.wait(0.5)

    def stop(self) -> None:
        """Stop accepting first (a source that reconnects at once must not get a connection that
        outlives the stop), then end every connection."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=10)
        with self._mutex:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            c.kill()
        for t in threads:
            t.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
        for tgt in self.targets.values():
            tgt.end_promotion_io()
            if tgt.lock.acquire(timeout=5):
                tgt.close()
                tgt.lock.release()

    def __enter__(self) -> RemoteUnit:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def rollback_resync(self, source_id: str) -> bool:
        return self.targets[source_id].rollback_resync()

    def promote(self, source_id: str, **kw: Any) -> dict[str, Any]:
        """`usbmirror promote` (see `SourceTarget.promote`); PromoteError says why not."""
        t = self.targets.get(source_id)
        if t is None:
            raise PromoteError(f"unknown source {source_id!r}; this remote serves {', '.join(sorted(self.targets))}")
        return t.promote(**kw)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    time.sleep(0.1)
                continue
            if self._stop.is_set():
                sock.close()
                return
            th = threading.Thread(target=self._serve_conn, args=(sock, f"{addr[0]}:{addr[1]}"),
                                  name=f"remote-conn-{addr[1]}", daemon=True)
            with self._mutex:
                self._threads = [t for t in self._threads if t.is_alive()] + [th]
            th.start()

    def _serve_conn(self, raw: socket.socket, peer: str) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket = raw
        if self._ctx is not None:
            raw.settimeout(self.cfg.handshake_timeout_s)
            try:
                sock = self._ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.refused += 1
                log.warning("refused peer=%s reason=TLS handshake failed: %s", peer, exc)
                raw.close()
                return
        c = _Connection(self, sock, peer)
        with self._mutex:
            if self._stop.is_set():  # stop() has already ended the connections it knew of
                c.link.close()
                return
            self._conns.add(c)
        try:
            c.run()
        finally:
            with self._mutex:
                self._conns.discard(c)

    def log_refusal(self, peer: str, exc: Refused) -> None:
        """A WARNING for a refused connection; the same refusal again within a minute (a source
        retrying while this unit is primary for it) only counts, and the next line says how often."""
        key = f"{exc.code.name}:{exc}"
        now = time.monotonic()
        last, repeats = self._refusals_logged.get(key, (-1e9, 0))
        if now - last < 60.0:
            self._refusals_logged[key] = (last, repeats + 1)
            log.debug("refused source peer=%s code=%s (repeated)", peer, exc.code.name)
            return
        if len(self._refusals_logged) > 256:
            self._refusals_logged.clear()
        self._refusals_logged[key] = (now, 0)
        more = f" repeated={repeats} in the last {now - last:.0f} s" if repeats else ""
        log.warning("refused source peer=%s code=%s reason=%s%s", peer, exc.code.name, exc, more)

    def status(self) -> dict[str, Any]:
        return {
            "role": "remote",
            "name": self.cfg.name,
            "listen": f"{self.cfg.listen[0]}:{self.port if self._listener else self.cfg.listen[1]}",
            "tls": self._ctx is not None,
            "uptime_s": time.monotonic() - self.started,
            "refused_connections": self.refused,
            "resources": process_resources(),
            "sources": (sources := [t.status() for t in self.targets.values()]),
            "warnings": [f"source {s['source_id']}: {s['history_warning']}" for s in sources
                         if s.get("history_warning")],
        }
