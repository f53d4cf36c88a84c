"""Promotion, failback and split brain in the in-process part of `make torture`.

One step of the campaign (`host_tests.torture`) may be a whole failover, over the campaign's own
simulated devices: the local unit's journal, volume and bitmap, the remote's target and state file
(`firmware.journal.sim`). The code that decides and records each role change is the firmware's,
the same the commands drive:

- the remote side is a `firmware.remote_unit.SourceTarget` over the campaign's remote (its target
  store opens the remote's simulated flash; its `TargetSession` is the remote's): `promote()` (with
  its refusals: a resync open, a target torn by a power cut), the `PromotedStore` the standby host
  writes to, `resume_promotion()` after a restart, `note_primary_peer()`, `begin_failback()`,
  `handed_back()` and `resolve("local")`;
- the local side is a `firmware.local_roles.LocalRoles` over the campaign's `LocalUnit` and
  `Journal`: `on_remote_primary()` (remote newer: a replica that refuses host writes; or a split
  brain, decided by `firmware.failover.returning`), its failback (`_fail_back`: pull, take over in a
  new generation) and `resolve()` (`--keep remote`).

Only the FETCH connection's exchange is carried out directly (`SimFetch.fetch_back`, in the
order `Replicator.fetch_back` runs it: the union of the remote's bitmap, `dirty_regions_frames()`,
and the local unit's own changes, `LocalRoles.changes_since` (every region when either cannot be
trusted), the digests of those regions compared, the ones that differ pulled with
`LocalUnit.install`, `install_done`, the take-over's GENERATIONS answered by `handed_back`),
and the role files live in a temporary directory (the project's atomic writer, durable at once):
the power cuts fall on the simulated devices.

An episode: the local site fails (a kill or a power cut), the remote is promoted, the standby host
writes on the promoted copy (with kills and power cuts of the remote between and inside its
writes: each acknowledged write must survive, the one in flight may land per block or not), the
old local unit comes back (in a share of the episodes it first takes host writes of its own: a
split brain, resolved with `resolve --keep remote` on the local unit or `--keep local` on the
remote), `failback` hands the source back (with power cuts of the local unit in the middle of the
pull, and connections that end before the remote heard of the take-over; each attempt compares
again). Then the local disk and the remote's target must both be the promoted image plus the
standby host's writes (or, after `--keep local`, the local unit's disk, the remote resynced from it
by the campaign), and the campaign goes on replicating from the fork position.

Nothing here is used by the firmware.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from firmware.failover.state import RoleStore, open_roles
from firmware.journal.sim import CrashMode, PowerCut, SimulatedVolume
from firmware.link import protocol as jp
from firmware.local_roles import LocalRoles
from firmware.remote_unit import PromoteError, RemoteUnitConfig, SourceTarget
from firmware.storage import WriteProtected

if TYPE_CHECKING:
    from collections.abc import Callable

    from firmware.replicator import LocalChanges
    from firmware.volume import Volume
    from host_tests.torture import Campaign

SOURCE = "src"
REMOTE_NAME = "r1"
FAILBACK_ATTEMPTS = 12  # a failback that has not completed after this many connections is a wedge
_SHM = "/dev/shm" if Path("/dev/shm").is_dir() else None


class Violation(Exception):
    """A property of the model does not hold."""


@dataclass
class _Spec:
    name: str = REMOTE_NAME
    label: str = REMOTE_NAME


@dataclass
class _Link:
    """What `LocalRoles` reads of a replicator's link."""

    rep: SimFetch
    acked_seq: int = 0
    remote_name: str = REMOTE_NAME
    spec: _Spec = field(default_factory=_Spec)


@dataclass
class _Unit:
    """What `SourceTarget` reads of its remote unit."""

    cfg: RemoteUnitConfig


class LinkDropped(ConnectionError):
    """The FETCH connection ended in the middle."""


class SimFetch:
    """The FETCH connection of a failback, between the campaign's local unit and the episode's
    `SourceTarget`, in `Replicator.fetch_back`'s order."""

    def __init__(self, ep: Episode) -> None:
        self.ep = ep

    def fetch_back(self, link: _Link, take_over: Callable[[dict[str, Any]], jp.Generations], *,
                   pull: bool = True, local_changes: LocalChanges | None = None) -> dict[str, Any]:
        ep = self.ep
        camp, t = ep.camp, ep.target
        from host_tests.torture import BS, NBLOCKS, REGION

        roles = t.roles.state
        if not roles.primary or not (roles.promotion or {}).get("handover"):  # as the remote's FETCH HELLO
            raise LinkDropped("refused: no failback is under way")
        if not t.lock.acquire(blocking=False):
            camp.c.wedges += 1
            raise Violation("failback: the promoted copy's target is still held (its lock was never released)")
        try:
            t.store.open(NBLOCKS * BS, BS)
            st = t.state
            reply = jp.HelloReply(REMOTE_NAME, bytes.fromhex(st.volume_uuid), st.applied_seq, st.generation,
                                  jp.Feature.DIRTY_MAP)
            moved = copied = 0
            report: dict[str, Any] = {}
            if pull:
                union, why = self.union(reply, local_changes)
                total = NBLOCKS // REGION
                candidates = range(total) if union is None else sorted(union)
                if union is None:
                    ep.full_compares += 1
                drop_at = ep.rng.randrange(max(1, len(candidates))) if ep.rng.random() < 0.15 else -1
                for n, i in enumerate(candidates):
                    if n == drop_at:
                        raise LinkDropped("the connection ended during the pull")
                    lba = i * REGION
                    if t.store.digests(i, 1, REGION)[0] != jp.region_digest(camp.lu.read(lba, REGION)):
                        assert t.store.volume is not None
                        camp.lu.install(lba, t.store.volume.read(lba, REGION))
                        moved += REGION * BS
                        copied += 1
                camp.lu.install_done()
                report = {"mode": "full" if union is None else "bitmap", "regions_compared": len(candidates),
                          "regions_total": total, **({"mode_reason": why} if union is None else {})}
            report = {"bytes_moved": moved, "bytes_compared": 0, "seconds": 0.0, "regions_copied": copied,
                      "regions_compared": 0, "pieces_compared": 0, "from": REMOTE_NAME, **report}
            gens = take_over(report)
            if ep.rng.random() < 0.15:  # the connection ends before the remote hears of the take-over
                raise LinkDropped("the connection ended before the remote acknowledged the take-over")
            t.handed_back(gens)
            return report
        finally:
            t.lock.release()

    def union(self, reply: jp.HelloReply, local_changes: LocalChanges | None) -> tuple[set[int] | None, str]:
        """The regions either side wrote since they last agreed, as `Replicator._failback_union`
        gathers them: the remote's answer to DIRTY_REQUEST and `local_changes(reply)`; None and why
        when one side's set cannot be trusted (then every region is compared)."""
        from host_tests.torture import NBLOCKS, REGION

        if local_changes is None:
            return None, "this unit does not know what it wrote since the promotion"
        out: set[int] = set()

        def add(lba: int, count: int) -> None:
            if count > 0 and lba < NBLOCKS:
                out.update(range(lba // REGION, (min(NBLOCKS, lba + count) - 1) // REGION + 1))

        for f in self.ep.target.dirty_regions_frames():
            if jp.DirtyFlag.TRUSTED not in f.flags:
                return None, f"the remote's record of its writes cannot be trusted: {f.reason}"
            for k, byte in enumerate(f.bits):
                for b in range(8):
                    if byte >> b & 1:
                        add((f.first_region + 8 * k + b) * f.region_blocks, f.region_blocks)
        mine, why = local_changes(reply)
        if mine is None:
            return None, why
        for lba, count in mine:
            add(lba, count)
        return out, ""


class Episode:
    """One failover: promotion, the standby host's writes, the old primary's return, failback."""

    def __init__(self, camp: Campaign, work: Path) -> None:
        self.camp = camp
        self.rng = camp.rng
        self.work = work
        (work / "remote").mkdir()
        (work / "local").mkdir()
        self.cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name=REMOTE_NAME, targets={SOURCE: "sim-target"},
                                    tls_dir=None, state_dir=str(work / "remote"),
                                    volume_factory=self.open_target)
        self.local_store: RoleStore = open_roles(work / "local", SOURCE, primary=True)
        self.local_roles = LocalRoles(self.local_store, camp.lu, camp.journal)
        self.link = _Link(SimFetch(self))
        self.target = self.start_target()
        self.standby: list[tuple[int, bytes]] = []  # the standby host's acknowledged writes, in order
        self.full_compares = 0

    # -- the two sides ---------------------------------------------------------------------------
    def open_target(self, path: str, size: int, block_size: int) -> Volume:
        """The remote's target store opens the campaign remote's simulated flash (as it is now)."""
        return cast("Volume", SimulatedVolume(self.camp.remote.flash, block_size=block_size))

    def start_target(self) -> SourceTarget:
        """The remote unit (re)starts: its target's role state from the state dir, its session the
        campaign remote's (restored from its own state file when it restarted)."""
        t = SourceTarget(_Unit(self.cfg), SOURCE, "sim-target")  # type: ignore[arg-type]
        t.session = self.camp.remote.session
        return t

    def restart_target(self) -> None:
        """The remote unit restarts: a promoted copy is served again (`resume_promotion`)."""
        self.target.promoted = None  # the old process is gone with its lock
        self.target.roles.close()
        self.target = self.start_target()
        try:
            self.target.resume_promotion()
        except PromoteError as exc:
            self.camp.c.wedges += 1
            raise Violation(f"the promoted remote could not serve its copy again after a restart: {exc}") from None

    def restart_local(self, mode: CrashMode | None) -> None:
        """The local unit restarts (after a kill, or a power cut with `mode`) in the role its state says."""
        camp = self.camp
        if mode is None:
            camp.c.kills += 1
        else:
            camp.c.cuts += 1
        camp.recover_local(mode or CrashMode.KEEP, inflight=None, check=self.local_checked)
        self.local_roles = LocalRoles(self.local_store, camp.lu, camp.journal)
        self.local_roles.at_start()

    local_checked = True  # the local disk is an image of the host's writes (not in the middle of a failback)

    def remote_generations(self) -> jp.Generations:
        """What the promoted remote sends before ERROR PRIMARY (as its connection's HELLO does)."""
        t = self.target
        roles = t.roles.state
        flags = jp.GenerationsFlag.PRIMARY
        if t.promoted is not None and t.promoted.status()["dirty_regions"]:
            flags |= jp.GenerationsFlag.DIRTY
        if (roles.promotion or {}).get("handover"):
            flags |= jp.GenerationsFlag.HANDOVER
        return jp.Generations(roles.history.as_tuples(), flags)

    def local_connects(self) -> None:
        """The old local unit's connection: HELLO, its GENERATIONS (read by the promoted remote), the
        remote's GENERATIONS and ERROR PRIMARY."""
        self.link.acked_seq = self.camp.session.acked_seq
        self.target.note_primary_peer(self.local_roles.generations())
        self.local_roles.on_remote_primary(self.link, self.remote_generations(),
                                           f"remote {REMOTE_NAME} is primary for source {SOURCE} now")

    def expected_promoted(self) -> bytearray:
        from host_tests.torture import BS

        disk = bytearray(self.image)
        for lba, data in self.standby:
            disk[lba * BS:lba * BS + len(data)] = data
        return disk

    # -- the episode -----------------------------------------------------------------------------
    def run(self) -> None:
        camp, c, rng = self.camp, self.camp.c, self.rng
        # the remote follows the source's generations (sent after every HELLO)
        self.target.adopt_history(self.local_roles.generations())
        # the local site fails
        camp.drop_link()
        self.restart_local(None if rng.random() < 0.5 else camp.crash_mode())
        try:
            self.target.promote(serving={"usbip": "127.0.0.1:0", "busid": "1-1"})
        except PromoteError:
            c.failovers_refused += 1  # a resync open or a target torn by the remote's power cut
            return
        c.promotions += 1
        self.image = bytes(camp.remote.blocks)
        k = camp.model.find(self.image, camp.remote_k)
        if k is None:
            c.prefix_violations += 1
            raise Violation(f"the promoted copy is no image of the host's writes from write {camp.remote_k} on")
        self.k = k
        self.standby_ops()
        if rng.random() < 0.35:  # the old local unit comes back and its host writes before it hears of the promotion
            for _ in range(rng.randint(1, 4)):
                camp.host_write()
            if camp.lu.write_refusal is not None:  # a power cut in those writes left a replica? never
                c.wedges += 1
                raise Violation("the restarted local unit refuses host writes before it heard of the promotion")
        self.local_connects()
        if self.local_store.state.split_brain is not None:
            c.split_brains += 1
            self.local_connects()  # the next connection tells the remote (DIRTY)
            if self.resolve():
                return
        if camp.lu.write_refusal is None:
            c.wedges += 1
            raise Violation(f"the old local unit neither became a replica nor saw a split brain: "
                            f"{self.local_roles.last_message}")
        try:
            camp.lu.write(0, bytes(512))
        except WriteProtected:
            pass
        else:
            c.prefix_violations += 1
            raise Violation("the old local unit, a replica of the promoted remote, took a host write")
        self.fail_back()

    def standby_ops(self) -> None:
        """The standby host writes on the promoted copy; the remote is killed or loses power now and then."""
        from host_tests.torture import BS, NBLOCKS

        camp, c, rng = self.camp, self.camp.c, self.rng
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.1:
                c.kills += 1
                camp.remote.kill()
                self.restart_target()
                continue
            if r < 0.2:
                camp.remote.rail.cut_at = camp.remote.rail.ops + rng.randint(1, 6)
            p = self.target.promoted
            assert p is not None
            n = rng.randint(1, 8)
            lba = rng.randrange(NBLOCKS - n + 1)
            data = rng.randbytes(n * BS)
            old = bytes(self.expected_promoted())
            try:
                p.write(lba, data)
            except PowerCut:
                c.cuts += 1
                c.remote_cuts += 1
                camp.remote.power_cut(rng, camp.crash_mode())
                self.restart_target()
                disk = bytes(camp.remote.blocks)
                new = bytearray(old)
                new[lba * BS:(lba + n) * BS] = data
                for b in range(NBLOCKS):
                    got = disk[b * BS:(b + 1) * BS]
                    if got != old[b * BS:(b + 1) * BS] and got != new[b * BS:(b + 1) * BS]:
                        c.lost += 1
                        raise Violation(f"after a power cut of the promoted remote block {b} is neither what the "
                                        f"standby host wrote there last nor what it was writing") from None
                # the write was not answered: each of its blocks is old or new, as a SCSI WRITE may land
                self.standby.append((lba, disk[lba * BS:(lba + n) * BS]))
                continue
            camp.remote.rail.cut_at = None
            self.standby.append((lba, data))
            c.promoted_writes += 1
        camp.remote.rail.cut_at = None
        if bytes(camp.remote.blocks) != self.expected_promoted():
            c.lost += 1
            raise Violation("the promoted copy lost a write the standby host had been answered")

    def resolve(self) -> bool:
        """A split brain: the operator keeps one side (`resolve --keep`). True when the local unit
        was kept (the episode ends: the campaign resyncs the remote)."""
        camp, c = self.camp, self.camp.c
        if self.rng.random() < 0.5:
            before = self.local_store.state
            dry = self.local_roles.resolve({"keep": "remote", "source": SOURCE, "dry_run": True})
            out = self.local_roles.resolve({"keep": "remote", "source": SOURCE})
            if "error" in out or self.local_store.state == before or "error" in dry:
                c.wedges += 1
                raise Violation(f"resolve --keep remote was refused on the local unit: {out.get('error')}")
            c.resolved += 1
            return False
        t = self.target
        try:
            t.resolve("local", dry_run=False)
        except PromoteError as exc:
            c.wedges += 1
            raise Violation(f"resolve --keep local was refused on the remote: {exc}") from None
        c.resolved += 1
        if t.roles.state.primary or t.session.state.volume_uuid:
            c.wedges += 1
            raise Violation("after resolve --keep local the remote is still primary or claims its copy")
        self.local_roles.on_link_up(self.link)  # the remote takes the local unit's HELLO again
        if self.local_store.state.split_brain is not None:
            c.wedges += 1
            raise Violation("the local unit's split brain did not end when the remote took its HELLO")
        camp.remote.save()
        camp.remote.kill()
        return True

    def fail_back(self) -> None:
        """`usbmirror failback` on the remote, then the local unit's connections until it took the source back."""
        from host_tests.torture import NBLOCKS

        camp, c, rng = self.camp, self.camp.c, self.rng
        self.target.begin_failback()
        self.local_checked = False  # from here on a restart finds the disk in the middle of the pull
        for _ in range(FAILBACK_ATTEMPTS):
            r = rng.random()
            if r < 0.25:
                camp.rail.cut_at = camp.rail.ops + rng.randint(1, 40)  # the local unit's power fails in the pull
            elif r < 0.35:
                c.kills += 1
                camp.remote.kill()
                self.restart_target()
            try:
                self.local_connects()
            except PowerCut:
                self.restart_local(camp.crash_mode())
            except LinkDropped:
                c.link_faults += 1
            camp.rail.cut_at = None
            if not self.target.roles.state.primary:
                break
        else:
            c.wedges += 1
            raise Violation(f"failback did not complete in {FAILBACK_ATTEMPTS} connections")
        c.failbacks += 1
        m = camp.model
        if m.durable_idx > self.k:
            c.failover_loss += m.durable_idx - self.k
        m.truncate(self.k)
        for lba, data in self.standby:
            m.add(lba, data)
        m.durable_idx = m.issued
        want = m.disk_at(m.issued)
        if camp.lu.read(0, NBLOCKS) != want:
            c.lost += 1
            raise Violation("after failback the local disk is not the promoted image plus the standby host's writes")
        if bytes(camp.remote.blocks) != want:
            c.prefix_violations += 1
            raise Violation("after failback the remote's target is not the promoted image plus the standby host's "
                            "writes")
        if camp.lu.write_refusal is not None or not self.local_store.state.primary:
            c.wedges += 1
            raise Violation("after failback the local unit still refuses host writes")
        camp.remote.save()  # the replica's position (the fork) on the remote's state file
        camp.remote.kill()
        camp.remote_k = m.issued


def fail_over(camp: Campaign) -> None:
    """One failover episode of campaign `camp` (see the module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="usbmirror-torture-failover-", dir=_SHM))
    ep: Episode | None = None
    try:
        ep = Episode(camp, work)
        ep.run()
    finally:
        if ep is not None:
            with contextlib.suppress(Exception):
                ep.target.promoted = None
                ep.target.roles.close()
            ep.local_store.close()
        camp.lu.refuse_writes(None)  # the campaign's next local unit knows no roles
        camp.rail.cut_at = None
        camp.remote.rail.cut_at = None
        shutil.rmtree(work, ignore_errors=True)
