"""A local unit's role towards its remotes (docs/FAILOVER.md): the adapter between the role state in
its state directory, the replicator's links and the local unit.

- `generations()` is what the replicator sends after each HELLO: this unit's data generations, so a
  replica follows the generation whose writes it applies.
- `on_remote_primary()` runs when a remote refuses this unit because it was promoted: the journal
  records the promoted copy never received are read (times and sizes), `old_primary_returns()`
  decides, the new role state is saved, and as a replica the local unit refuses host writes (DATA
  PROTECT, WRITE PROTECTED); the writes it had acknowledged but never shipped are the failover's
  loss, reported in status (`failover_loss`) and the log, and never shipped.
- `at_start()`: a unit that was a replica when it stopped refuses host writes from the start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from firmware.crash_points import crash_point
from firmware.failover.generations import History, Keep, Resolution, WriteInfo, mib
from firmware.failover.returning import old_primary_returns
from firmware.failover.state import RoleStore, fresh_generation_id
from firmware.journal import JournalError, RecordsGone
from firmware.journal.format import RecordKind

if TYPE_CHECKING:  # the link protocol (and lz4) is imported only by a unit that has remotes
    from firmware.link import protocol as jp

log = logging.getLogger(__name__)

_READ_CHUNK = 4 << 20


class LocalRoles:
    """The role state of one local unit's source, as its replicator and status see it."""

    def __init__(self, roles: RoleStore, unit: Any, journal: Any, *, catch_up_interval_s: float = 0.0) -> None:
        self.roles = roles
        self.unit = unit
        self.journal = journal
        # as a replica of a promoted remote, pull what the promoted copy changed this often while it is
        # served (`--catch-up-interval`; 0: off, the failback pulls it all)
        self.catch_up_interval_s = catch_up_interval_s
        self.last_message = ""
        self.catch_up: dict[str, Any] | None = None  # the last catch-up with a promoted remote, for status
        self._caught_up_at = 0.0  # monotonic time of the last catch-up attempt (0: none yet)

    def generations(self) -> jp.Generations:
        from firmware.link import protocol as jp

        st = self.roles.state
        flags = jp.GenerationsFlag.PRIMARY if st.primary else jp.GenerationsFlag.NONE
        sb = st.split_brain
        if sb is not None:  # the remote learns that this side wrote too, and how much
            flags |= jp.GenerationsFlag.DIRTY
        return jp.Generations(st.history.as_tuples(), flags, sb.own_bytes if sb is not None else 0)

    def replica_reason(self) -> str | None:
        st = self.roles.state
        if st.primary:
            return None
        loss = st.failover_loss or {}
        return (f"this unit is a replica of {loss.get('peer', 'a promoted remote')} (generation "
                f"{loss.get('generation', '?')}): host writes are refused")

    def at_start(self) -> None:
        reason = self.replica_reason()
        if reason is not None:
            self.unit.refuse_writes(reason)

    def _unshipped(self, after_seq: int) -> tuple[list[WriteInfo], bool]:
        """The journal's WRITE and UNMAP records after `after_seq`; False when some were gone."""
        out: list[WriteInfo] = []
        bs = self.unit.block_size
        at = after_seq
        try:
            while True:
                recs = self.journal.read_records(at, _READ_CHUNK)
                if not recs:
                    return out, True
                for r in recs:
                    if r.kind in (RecordKind.WRITE, RecordKind.UNMAP):
                        out.append(WriteInfo(r.seq, r.timestamp_ns, r.count * bs))
                    at = r.seq
        except RecordsGone:
            return out, False

    def on_remote_primary(self, link: Any, gens: jp.Generations | None, message: str) -> bool:
        """A remote refused this unit with ERROR PRIMARY (after its GENERATIONS, when it sent them).
        True when this call made the unit primary again (it failed back): its link reconnects at once."""
        from firmware.link import protocol as jp

        peer = link.spec.name or link.remote_name or link.spec.label
        if gens is None:
            log.error("remote is primary but sent no generations remote=%s message=%s", peer, message)
            return False
        try:
            peer_history = History.from_tuples(gens.generations)
        except ValueError as exc:
            log.error("remote sent bad generations remote=%s error=%s", peer, exc)
            return False
        st = self.roles.state
        cur = st.history.current
        handover = jp.GenerationsFlag.HANDOVER in gens.flags
        if handover and st.primary and peer_history.current is not None \
                and st.history.successor(peer_history.current) == cur:
            # this unit took the source back but the remote never heard: say it again
            self.unit.refuse_writes(None)
            link.rep.fetch_back(link, lambda report: self.generations(), pull=False)
            log.warning("failback: the remote took the hand-back remote=%s generation=%s", peer,
                        cur.label if cur is not None else None)
            return False
        promoted = peer_history.successor(cur) if cur is not None else None
        after = promoted.fork_seq if promoted is not None else link.acked_seq
        synced = True
        try:  # writes answered with the write cache on, still in the journal's unsynced tail, count too
            self.journal.sync()
        except (JournalError, OSError) as exc:
            synced = False
            log.warning("could not make the journal durable before comparing with remote=%s error=%s", peer, exc)
        writes, complete = self._unshipped(after)
        snap = self.unit.dirty_snapshot()
        unknown = snap.blocks * self.unit.block_size if snap.regions else 0
        if not complete or not synced:
            unknown = max(unknown, 1)  # records gone from the journal (or not readable): their times are unknown
        ret = old_primary_returns(st, peer=peer, peer_history=peer_history,
                                  peer_dirty=jp.GenerationsFlag.DIRTY in gens.flags,
                                  peer_dirty_bytes=gens.dirty_bytes, unshipped=writes, unknown_time_bytes=unknown,
                                  now_ns=time.time_ns())
        if ret.state is not st:
            self.roles.save(ret.state)
            log.warning("role change remote=%s outcome=%s lost_writes=%d lost_bytes=%d message=%s", peer,
                        ret.decision.outcome.value, ret.loss.lost_writes, ret.loss.lost_bytes, ret.message)
        self.last_message = ret.message
        if ret.refuse_writes and self.unit.write_refusal is None:
            self.unit.refuse_writes(self.replica_reason() or ret.message)
        if handover and ret.refuse_writes and ret.decision.outcome.value == "remote_newer":
            self._fail_back(link, peer, peer_history, after)
        elif ret.refuse_writes and ret.decision.outcome.value == "remote_newer":
            self._catch_up(link, peer, after)
        return not st.primary and self.roles.state.primary

    def _catch_up(self, link: Any, peer: str, fork_seq: int) -> None:
        """A replica of a promoted remote that still serves its copy: pull the pieces the promoted
        side changed (the failback's comparison without the take-over), at most once per
        `catch_up_interval_s` (the first one at once), so the replica follows the promoted data and
        a later failback has little left to move. Skipped when a side's set of writes cannot be trusted (the failback
        compares every region then). A failure is logged and shown; the next attempt tries again.
        Each catch-up compares every region either side wrote since the promotion's fork (not only
        since the last catch-up), so one cut short by a crash, or one that read a region while the
        promoted host rewrote it, is repaired by the next (or by the failback's comparison)."""
        interval = self.catch_up_interval_s
        if interval <= 0:  # off (`--catch-up-interval 0`): the failback pulls it all
            return
        now = time.monotonic()
        if self._caught_up_at and now - self._caught_up_at < interval:
            return
        self._caught_up_at = now
        if self.unit.write_refusal is None:
            return
        try:
            report = link.rep.fetch_back(link, None,
                                         local_changes=lambda reply: self.changes_since(fork_seq, reply))
        except Exception as exc:  # the link (and its failure handling) goes on; a failback pulls it all anyway
            self.catch_up = {"error": f"{type(exc).__name__}: {exc}", "from": peer, "at_ns": time.time_ns()}
            log.warning("catch-up with the promoted copy failed remote=%s error=%s", peer, self.catch_up["error"])
            return
        self.catch_up = {**report, "at_ns": time.time_ns()}
        if "skipped" in report:
            log.info("catch-up skipped remote=%s reason=%s", peer, report["skipped"])
        else:
            log.info("caught up with the promoted copy remote=%s bytes_moved=%d bytes_compared=%d seconds=%.3f",
                     peer, report["bytes_moved"], report["bytes_compared"], report["seconds"])

    def changes_since(self, fork_seq: int, reply: jp.HelloReply) -> tuple[list[tuple[int, int]] | None, str]:
        """What this unit wrote since it and the promoted remote last agreed, as (lba, count): its
        journal's WRITE and UNMAP records after the promotion's fork position (the failover's loss
        among them) and the dirty regions a journal overflow left. None and why when that set is not
        whole: the journal restarted since the remote followed it, or no longer holds those records,
        or an earlier failback attempt compared every region (it may have installed blocks outside
        any recorded set)."""
        j = self.journal
        pending = self.roles.state.last_resync or {}
        if pending.get("failback_pending") == "full":
            return None, f"an interrupted failback compared every region ({pending.get('mode_reason')})"
        if reply.generation != j.generation:
            return None, (f"this unit's journal restarted (generation {j.generation}; the remote followed "
                          f"generation {reply.generation})")
        if j.durable_seq < fork_seq:
            return None, f"this unit's journal ends at seq {j.durable_seq}, before the promotion's seq {fork_seq}"
        # a promotion at an earlier point (--mark/--at/--seq) rolled back the records the copy had
        # applied after it, and marked every block it rewrote in its bitmap: from this side, only the
        # records after the copy's applied position are needed then (the journal released the others)
        starts = [fork_seq] + ([reply.applied_seq] if reply.applied_seq > fork_seq else [])
        for start in starts:
            out = self._extents_after(start)
            if out is not None:
                out.extend(self.unit.dirty_snapshot().regions)
                return out, ""
        return None, f"this unit's journal no longer holds the records after seq {starts[-1]}"

    def _extents_after(self, after_seq: int) -> list[tuple[int, int]] | None:
        """(lba, count) of the journal's WRITE and UNMAP records after `after_seq`; None when some are gone."""
        out: list[tuple[int, int]] = []
        at = after_seq
        try:
            while True:
                recs = self.journal.read_records(at, _READ_CHUNK)
                if not recs:
                    return out
                for r in recs:
                    if r.kind in (RecordKind.WRITE, RecordKind.UNMAP) and r.count:
                        out.append((r.lba, r.count))
                    at = r.seq
        except RecordsGone:
            return None

    def _fail_back(self, link: Any, peer: str, peer_history: History, fork_seq: int) -> None:
        """The promoted remote hands the source back: pull what differs, then take over in a new
        generation on top of the remote's (recorded before the remote hears of it) and serve the
        host again."""
        log.warning("failback: pulling the changed regions from remote=%s", peer)

        def changes(reply: jp.HelloReply) -> tuple[list[tuple[int, int]] | None, str]:
            mine, why = self.changes_since(fork_seq, reply)
            if mine is None:  # a retry after a crash must compare every region again too
                self.roles.save(replace(self.roles.state, last_resync={"failback_pending": "full",
                                                                       "mode_reason": why}))
            return mine, why

        def take_over(report: dict[str, Any]) -> Any:
            hist = peer_history.promote(gen_id=fresh_generation_id(), now_ns=time.time_ns(),
                                        fork_seq=self.journal.durable_seq)
            self.roles.save(replace(self.roles.state, primary=True, history=hist, split_brain=None,
                                    resolution=None, last_resync=report))
            crash_point("failback.taken_over")
            return self.generations()

        try:
            report = link.rep.fetch_back(link, take_over, local_changes=changes)
        finally:
            if self.roles.state.primary:  # taken over (even if the remote's ACK was lost): serve the host
                self.unit.refuse_writes(None)
        self.last_message = (f"failed back from {peer}: {report['regions_copied']} regions "
                             f"({report['bytes_moved']} bytes) pulled in {report['seconds']} s after comparing "
                             f"{report['bytes_compared']} bytes ({report['mode']}); primary again")
        log.warning("failback complete remote=%s mode=%s bytes_moved=%d bytes_compared=%d regions=%d seconds=%.3f%s",
                    peer, report["mode"], report["bytes_moved"], report["bytes_compared"], report["regions_copied"],
                    report["seconds"], f" reason={report['mode_reason']}" if report.get("mode_reason") else "")

    def resolve(self, req: dict[str, Any]) -> dict[str, Any]:
        """The control command `resolve` on a local unit: `--keep remote` discards what this unit
        wrote since the remote was promoted; it becomes the remote's replica (host writes refused)
        until `usbmirror failback` brings the source back. `--keep local` is decided on the remote,
        whose writes it discards."""
        keep, dry = req.get("keep"), bool(req.get("dry_run"))
        if keep not in ("local", "remote"):
            return {"ok": False, "error": "--keep must be local or remote"}
        st = self.roles.state
        if req.get("source") != st.source_id:
            return {"ok": False, "error": f"this local unit is source {st.source_id}, not {req.get('source')!r}"}
        sb = st.split_brain
        if sb is None:
            return {"ok": False, "error": f"no split brain is recorded for source {st.source_id} on this unit"}
        if keep == "local":
            return {"ok": False, "error": f"--keep local discards what was written on {sb.peer}: run `usbmirror "
                    "resolve --keep local` with that remote unit's state dir"}
        text = (f"would discard {mib(sb.own_bytes)} written on this local unit (source "
                f"{st.source_id}) since {sb.peer} was promoted in generation "
                f"{sb.peer_generation.label if sb.peer_generation else '?'}; this unit becomes {sb.peer}'s replica "
                "and refuses host writes until `usbmirror failback`")
        out = {"source": st.source_id, "keep": keep, "discard_bytes": sb.own_bytes, "dry_run": dry}
        if dry:
            return {**out, "message": text}
        loss = {"writes": None, "bytes": sb.own_bytes, "peer": sb.peer, "discarded_by": "resolve --keep remote",
                "generation": sb.peer_generation.label if sb.peer_generation else None, "detected_ns": time.time_ns()}
        self.roles.save(replace(st, primary=False, split_brain=None, failover_loss=loss,
                                resolution=Resolution(Keep.PEER, st.history.current, sb.peer_generation)))
        crash_point("resolve.saved")
        self.unit.refuse_writes(self.replica_reason())
        log.warning("split brain resolved: keep remote source=%s discarded_bytes=%d peer=%s", st.source_id,
                    sb.own_bytes, sb.peer)
        return {**out, "message": text.replace("would discard", "discarded", 1)}

    def on_link_up(self, link: Any) -> None:
        """A remote took this unit's HELLO: a split brain recorded with it is over (it was resolved
        on the remote, which follows this unit again)."""
        st = self.roles.state
        peer = link.spec.name or link.remote_name or link.spec.label
        if st.split_brain is not None and st.split_brain.peer == peer and st.primary:
            self.roles.save(replace(st, split_brain=None))
            log.warning("split brain over: remote=%s follows this unit again", peer)

    def status(self) -> dict[str, Any]:
        out = self.roles.state.status()
        refusal = self.unit.write_refusal
        out["host_writes"] = "refused" if refusal is not None else "accepted"
        out["host_writes_reason"] = refusal
        if self.last_message:
            out["role_message"] = self.last_message
        if self.catch_up is not None and not self.roles.state.primary:
            out["catch_up"] = self.catch_up
        return out
