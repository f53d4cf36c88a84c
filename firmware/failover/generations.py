"""Data generations: which copy of a source's data is newer, and what a resync must move (sans-IO).

Each source's data has exactly one *primary* at a time: the local unit, or a remote unit that an
operator promoted. Every promotion starts a new **data generation** (a random 64-bit id and a
counter one above its parent's), so two copies can be compared without trusting clocks or
positions: each side keeps its generation history (oldest first, the last one is current), and, per
peer, a bitmap of the blocks it wrote since the two last agreed.

`decide(local, remote)` compares both sides' views and returns one `Outcome`:

- **in sync**: same current generation, neither side wrote since they last agreed;
- **local newer** / **remote newer**: one side's history holds the other's current generation (or
  both are in the same one) and only the newer side wrote: the other side catches up and becomes
  (or stays) the replica;
- **split brain**: both sides wrote since they last agreed, or each side moved to a generation the
  other does not know: no data changes until an operator decides (`Resolution`);
- **unrelated**: the histories share no generation (another volume, a reformatted target): refused.

A bitmap that is not empty is never cleared by a one-sided decision: `Decision.may_clear_local` and
`may_clear_remote` say which side's bits the resync may forget once it completed, and they are only
true for the side whose writes reached the other side (the newer one) or, after an operator's
resolution, for the side whose writes were knowingly discarded.

`resync_plan()` turns both bitmaps into the regions that must cross (their union) and, once the
region digests of both sides are known, drops the regions that already match.

Nothing here touches files, sockets, threads or clocks: times and random ids are passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

GENERATION_ID_BITS = 64
HISTORY_LIMIT = 32  # generations kept per side; an agreement older than that counts as unrelated


@dataclass(frozen=True, slots=True)
class DataGeneration:
    """One period with one primary. `fork_seq` is the position in the parent generation's write
    stream where this one began (what the promoted copy had applied); `started_ns` is when, on the
    clock of the unit that started it."""

    gen_id: int
    counter: int
    started_ns: int = 0
    fork_seq: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.gen_id < 1 << GENERATION_ID_BITS:
            raise ValueError(f"generation id {self.gen_id} is not a non-zero 64-bit number")
        if self.counter < 1:
            raise ValueError(f"generation counter {self.counter} must be at least 1")
        if self.started_ns < 0 or self.fork_seq < 0:
            raise ValueError("generation time and fork position must not be negative")

    @property
    def label(self) -> str:
        """How status and messages name it: counter and id, e.g. `3:9f2c...`."""
        return f"{self.counter}:{self.gen_id:016x}"


@dataclass(frozen=True, slots=True)
class History:
    """A side's generations, oldest first; the last is current. Empty: the side holds no data of
    its own yet (a new target), which every history descends from."""

    generations: tuple[DataGeneration, ...] = ()

    def __post_init__(self) -> None:
        if len(self.generations) > HISTORY_LIMIT:
            raise ValueError(f"a history holds at most {HISTORY_LIMIT} generations")
        ids = {g.gen_id for g in self.generations}
        if len(ids) != len(self.generations):
            raise ValueError("a generation id appears twice in one history")
        for a, b in zip(self.generations, self.generations[1:], strict=False):
            if b.counter <= a.counter:
                raise ValueError("generation counters must increase along a history")

    @classmethod
    def initial(cls, gen_id: int, now_ns: int) -> History:
        """The first generation of a source, started by its local unit."""
        return cls((DataGeneration(gen_id, 1, now_ns, 0),))

    @property
    def current(self) -> DataGeneration | None:
        return self.generations[-1] if self.generations else None

    def as_tuples(self) -> tuple[tuple[int, int, int, int], ...]:
        """(id, counter, started_ns, fork_seq) per generation: the GENERATIONS frame's form."""
        return tuple((g.gen_id, g.counter, g.started_ns, g.fork_seq) for g in self.generations)

    @classmethod
    def from_tuples(cls, gens: Iterable[tuple[int, int, int, int]]) -> History:
        """The inverse of `as_tuples`; ValueError when the generations do not make a history."""
        return cls(tuple(DataGeneration(*g) for g in gens))

    def descends_from(self, other: History) -> bool:
        """This history holds `other`'s current generation (or `other` has none): it is `other`'s
        history or one that moved on from it."""
        return self.holds(other.current)

    def holds(self, gen: DataGeneration | None) -> bool:
        """True when `gen` is in this history; the empty generation (None) is in every history."""
        return gen is None or gen in self.generations

    def successor(self, gen: DataGeneration) -> DataGeneration | None:
        """The generation that followed `gen` here (the promotion that ended it), if any."""
        try:
            i = self.generations.index(gen)
        except ValueError:
            return None
        return self.generations[i + 1] if i + 1 < len(self.generations) else None

    def promote(self, *, gen_id: int, now_ns: int, fork_seq: int) -> History:
        """A new generation on top of this one: this side becomes primary. The oldest generations
        are dropped beyond `HISTORY_LIMIT`."""
        counter = self.current.counter + 1 if self.current is not None else 1
        if any(g.gen_id == gen_id for g in self.generations):
            raise ValueError("the new generation id is already in the history")
        gens = (*self.generations, DataGeneration(gen_id, counter, now_ns, fork_seq))
        return History(gens[-HISTORY_LIMIT:])


def common_generation(a: History, b: History) -> DataGeneration | None:
    """The newest generation both histories hold (None if they share none)."""
    theirs = set(b.generations)
    for g in reversed(a.generations):
        if g in theirs:
            return g
    return None


class Keep(enum.Enum):
    """An operator's choice after a split brain, as seen from the side that stores it."""

    SELF = "self"
    PEER = "peer"


@dataclass(frozen=True, slots=True)
class Resolution:
    """`usbmirror resolve`: keep this side's or the peer's data. Valid only for the split brain it was
    decided on: `own` and `peer` are the two current generations at that moment, so a stale
    resolution (either side moved on) is ignored."""

    keep: Keep
    own: DataGeneration | None
    peer: DataGeneration | None


@dataclass(frozen=True, slots=True)
class SideView:
    """What one side knows about itself towards one peer."""

    history: History
    dirty: bool  # its bitmap towards this peer is not empty: it wrote since the two last agreed
    resolution: Resolution | None = None


class Outcome(enum.Enum):
    IN_SYNC = "in_sync"
    LOCAL_NEWER = "local_newer"  # catch up the remote side
    REMOTE_NEWER = "remote_newer"  # catch up the local side, which becomes (or stays) the replica
    SPLIT_BRAIN = "split_brain"  # both wrote: change nothing until an operator resolves
    UNRELATED = "unrelated"  # no common generation: refuse


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: str
    common: DataGeneration | None = None
    resolved: bool = False  # the outcome follows an operator's resolution of a split brain
    may_clear_local: bool = False  # after a complete resync, the local bits may be forgotten
    may_clear_remote: bool = False

    @property
    def newer(self) -> str | None:
        """"local" or "remote": the side the data flows from; None when nothing flows."""
        if self.outcome is Outcome.LOCAL_NEWER:
            return "local"
        if self.outcome is Outcome.REMOTE_NEWER:
            return "remote"
        return None


def _votes(local: SideView, remote: SideView) -> tuple[bool, bool]:
    """(keep local, keep remote) from the resolutions that apply to the present generations."""
    lc, rc = local.history.current, remote.history.current
    keep_local = keep_remote = False
    r = local.resolution
    if r is not None and r.own == lc and r.peer == rc:
        keep_local |= r.keep is Keep.SELF
        keep_remote |= r.keep is Keep.PEER
    r = remote.resolution
    if r is not None and r.own == rc and r.peer == lc:
        keep_remote |= r.keep is Keep.SELF
        keep_local |= r.keep is Keep.PEER
    return keep_local, keep_remote


def decide(local: SideView, remote: SideView) -> Decision:
    """Compare the two sides of one source; see the module docstring for the outcomes."""
    lh, rh = local.history, remote.history
    lc, rc = lh.current, rh.current
    common = common_generation(lh, rh)
    if lc is not None and rc is not None and common is None:
        return Decision(Outcome.UNRELATED, "the two copies share no data generation "
                        f"(local {lc.label}, remote {rc.label}): another volume or a reformatted target")
    ld, rd = local.dirty, remote.dirty
    if lc == rc:
        if not ld and not rd:
            return Decision(Outcome.IN_SYNC, "same generation, no writes since the two last agreed", common)
        if ld and not rd:
            return Decision(Outcome.LOCAL_NEWER, "same generation, only the local side wrote", common,
                            may_clear_local=True)
        if rd and not ld:
            return Decision(Outcome.REMOTE_NEWER, "same generation, only the remote side wrote", common,
                            may_clear_remote=True)
        why = "both sides wrote in the same generation"
    elif rh.holds(lc) and not lh.holds(rc):
        # the remote moved on from the local's current generation (a promotion)
        if not ld:
            return Decision(Outcome.REMOTE_NEWER, f"the remote moved on to generation {_label(rc)}", common,
                            may_clear_remote=True)
        why = f"the remote moved on to generation {_label(rc)} and the local side wrote since"
    elif lh.holds(rc) and not rh.holds(lc):
        if not rd:
            return Decision(Outcome.LOCAL_NEWER, f"the local side moved on to generation {_label(lc)}", common,
                            may_clear_local=True)
        why = f"the local side moved on to generation {_label(lc)} and the remote side wrote since"
    else:
        why = (f"both sides moved on from generation {_label(common)} "
               f"(local {_label(lc)}, remote {_label(rc)})")
    keep_local, keep_remote = _votes(local, remote)
    if keep_local and keep_remote:
        return Decision(Outcome.SPLIT_BRAIN, why + "; the resolutions on the two sides disagree", common)
    if keep_local:
        return Decision(Outcome.LOCAL_NEWER, why + "; resolved: keep local", common, resolved=True,
                        may_clear_local=True, may_clear_remote=True)
    if keep_remote:
        return Decision(Outcome.REMOTE_NEWER, why + "; resolved: keep remote", common, resolved=True,
                        may_clear_local=True, may_clear_remote=True)
    return Decision(Outcome.SPLIT_BRAIN, why, common)


def mib(nbytes: int) -> str:
    """How messages say an amount of data: MiB with 4 significant digits and the exact bytes."""
    return f"{nbytes / (1 << 20):.4g} MiB ({nbytes} bytes)"


def _label(g: DataGeneration | None) -> str:
    return g.label if g is not None else "none"


# -- what a failover lost -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WriteInfo:
    """One write the old primary acknowledged but had not shipped to the peer."""

    seq: int
    timestamp_ns: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Divergence:
    """The old primary's unshipped writes after the peer was promoted, split in two: those from
    before the promotion (the failover's loss, accepted by whoever promoted) and those from after it
    (new writes on both sides: a split brain)."""

    lost_writes: int = 0
    lost_bytes: int = 0
    diverged_writes: int = 0
    diverged_bytes: int = 0

    @property
    def diverged(self) -> bool:
        return self.diverged_writes > 0


def divergence(unshipped: Iterable[WriteInfo], promoted: DataGeneration) -> Divergence:
    """Split the old primary's writes after `promoted.fork_seq` by `promoted.started_ns` (the
    promoting unit's clock against the old primary's record times: keep the units' clocks in step).
    Writes at or before the fork position reached the promoted copy and are neither."""
    lw = lb = dw = db = 0
    for w in unshipped:
        if w.seq <= promoted.fork_seq:
            continue
        if w.timestamp_ns < promoted.started_ns:
            lw += 1
            lb += w.nbytes
        else:
            dw += 1
            db += w.nbytes
    return Divergence(lw, lb, dw, db)


# -- the resync plan ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RegionResyncPlan:
    """Regions (of `region_blocks` blocks) that must be compared, then copied where they differ,
    from the newer side to the older. `regions` is sorted; `copy` is filled by `after_digests`."""

    region_blocks: int
    regions: tuple[int, ...]
    copy: tuple[int, ...] | None = None
    skipped: tuple[int, ...] = field(default=())

    def after_digests(self, newer: Mapping[int, bytes], older: Mapping[int, bytes]) -> RegionResyncPlan:
        """Drop the regions whose digests already match on both sides. A region missing from
        either mapping is copied (never assume equality)."""
        copy: list[int] = []
        skipped: list[int] = []
        for r in self.regions:
            a, b = newer.get(r), older.get(r)
            if a is not None and a == b:
                skipped.append(r)
            else:
                copy.append(r)
        return RegionResyncPlan(self.region_blocks, self.regions, tuple(copy), tuple(skipped))

    def runs(self, num_blocks: int) -> tuple[tuple[int, int], ...]:
        """The regions to copy (all of them before digests are known) as (lba, count) runs."""
        regs = self.copy if self.copy is not None else self.regions
        out: list[tuple[int, int]] = []
        for r in regs:
            lba = r * self.region_blocks
            if lba >= num_blocks:
                continue
            n = min(self.region_blocks, num_blocks - lba)
            if out and out[-1][0] + out[-1][1] == lba:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((lba, n))
        return tuple(out)


def resync_plan(local_regions: Iterable[int], remote_regions: Iterable[int], *, region_blocks: int) -> RegionResyncPlan:
    """The union of both sides' dirty regions: everything either side wrote since they last agreed
    must be made equal to the newer side, whichever side wrote it."""
    if region_blocks <= 0:
        raise ValueError("region_blocks must be positive")
    regions = set(local_regions) | set(remote_regions)
    if any(r < 0 for r in regions):
        raise ValueError("region indices must not be negative")
    return RegionResyncPlan(region_blocks, tuple(sorted(regions)))


def regions_of_extents(extents: Sequence[tuple[int, int]], *, region_blocks: int) -> set[int]:
    """The regions covering (lba, count) extents (e.g. unshipped journal records)."""
    out: set[int] = set()
    for lba, count in extents:
        if count <= 0:
            continue
        out.update(range(lba // region_blocks, (lba + count - 1) // region_blocks + 1))
    return out
