"""The data-generation decision: who is newer, split brain, unrelated copies, and the resync plan."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.failover.generations import (
    HISTORY_LIMIT,
    DataGeneration,
    Decision,
    History,
    Keep,
    Outcome,
    Resolution,
    SideView,
    WriteInfo,
    decide,
    divergence,
    regions_of_extents,
    resync_plan,
)

G1 = DataGeneration(0x1111, 1, 100, 0)
G2 = DataGeneration(0x2222, 2, 200, 50)  # promoted from G1 at seq 50
G2B = DataGeneration(0x2BBB, 2, 210, 60)  # another promotion from G1
G3 = DataGeneration(0x3333, 3, 300, 70)
X1 = DataGeneration(0x9999, 1, 100, 0)  # another volume's first generation

H0 = History()
H1 = History((G1,))
H12 = History((G1, G2))
H12B = History((G1, G2B))
H123 = History((G1, G2, G3))
HX = History((X1,))

L, R = Outcome.LOCAL_NEWER, Outcome.REMOTE_NEWER
S, B, U = Outcome.IN_SYNC, Outcome.SPLIT_BRAIN, Outcome.UNRELATED

# local history, local dirty, remote history, remote dirty -> outcome
TABLE = [
    (H1, False, H1, False, S),
    (H1, True, H1, False, L),  # ordinary replication lag
    (H1, False, H1, True, R),
    (H1, True, H1, True, B),
    (H1, False, H12, False, R),  # promoted remote, old primary wrote nothing since
    (H1, False, H12, True, R),  # ... and the standby host wrote: catch up the old primary
    (H1, True, H12, False, B),  # the old primary wrote after the promotion
    (H1, True, H12, True, B),
    (H12, False, H1, False, L),
    (H12, False, H1, True, B),  # the old primary (now the remote) wrote after the promotion
    (H12, True, H1, False, L),  # the promoted side wrote, the old primary did not
    (H12, True, H1, True, B),
    (H1, False, H123, False, R),  # two promotions ahead
    (H123, True, H1, False, L),
    (H12, False, H12B, False, B),  # both promoted from G1: two primaries, even without writes
    (H12, True, H12B, True, B),
    (H12, False, H123, False, R),
    (H1, False, HX, False, U),  # another volume
    (H1, True, HX, True, U),
    (H12, False, HX, False, U),
    (H0, False, H1, False, R),  # a side with no data of its own catches up
    (H1, False, H0, False, L),
    (H1, True, H0, False, L),
    (H1, False, H0, True, B),  # the empty side wrote: never overwrite that silently
    (H0, False, H0, False, S),
]


@pytest.mark.parametrize(("lh", "ld", "rh", "rd", "want"), TABLE)
def test_decision_table(lh: History, ld: bool, rh: History, rd: bool, want: Outcome) -> None:
    d = decide(SideView(lh, ld), SideView(rh, rd))
    assert d.outcome is want, d.reason
    assert not d.resolved
    # the side that catches up never has its (non-empty) bitmap cleared without an operator
    if ld and d.outcome is not L:
        assert not d.may_clear_local
    if rd and d.outcome is not R:
        assert not d.may_clear_remote


def test_messages_name_the_generations() -> None:
    d = decide(SideView(H12, False), SideView(H12B, False))
    assert G1.label in d.reason and G2.label in d.reason and G2B.label in d.reason
    assert d.common == G1
    u = decide(SideView(H1, False), SideView(HX, False))
    assert "share no data generation" in u.reason and u.common is None


def test_resolution_keep_local_and_keep_remote() -> None:
    local = SideView(H1, True)
    remote = SideView(H12, True)
    assert decide(local, remote).outcome is B
    keep_local = decide(SideView(H1, True, Resolution(Keep.SELF, G1, G2)), remote)
    assert keep_local.outcome is L and keep_local.resolved
    assert keep_local.may_clear_local and keep_local.may_clear_remote
    # the same choice made on the remote's side
    assert decide(local, SideView(H12, True, Resolution(Keep.PEER, G2, G1))).outcome is L
    keep_remote = decide(local, SideView(H12, True, Resolution(Keep.SELF, G2, G1)))
    assert keep_remote.outcome is R and keep_remote.resolved
    assert decide(SideView(H1, True, Resolution(Keep.PEER, G1, G2)), remote).outcome is R


def test_conflicting_or_stale_resolutions_change_nothing() -> None:
    both = decide(SideView(H1, True, Resolution(Keep.SELF, G1, G2)), SideView(H12, True, Resolution(Keep.SELF, G2, G1)))
    assert both.outcome is B and "disagree" in both.reason
    # decided against G2, but the remote has moved on to G3 since: ignored
    stale = decide(SideView(H1, True, Resolution(Keep.SELF, G1, G2)), SideView(H123, True))
    assert stale.outcome is B and not stale.resolved
    # a resolution never makes unrelated copies acceptable
    assert decide(SideView(H1, False, Resolution(Keep.SELF, G1, X1)), SideView(HX, False)).outcome is U


def test_history_rules() -> None:
    h = History.initial(0xAB, 5)
    assert h.current == DataGeneration(0xAB, 1, 5, 0)
    p = h.promote(gen_id=0xCD, now_ns=9, fork_seq=41)
    assert p.current == DataGeneration(0xCD, 2, 9, 41) and p.successor(h.generations[0]) == p.current
    assert p.successor(DataGeneration(0xEE, 1)) is None and p.successor(p.generations[-1]) is None
    with pytest.raises(ValueError, match="already"):
        p.promote(gen_id=0xAB, now_ns=10, fork_seq=0)
    with pytest.raises(ValueError, match="increase"):
        History((G2, G1))
    with pytest.raises(ValueError, match="twice"):
        History((G1, DataGeneration(G1.gen_id, 2)))
    with pytest.raises(ValueError, match="64-bit"):
        DataGeneration(0, 1)
    with pytest.raises(ValueError, match="64-bit"):
        DataGeneration(1 << 64, 1)
    with pytest.raises(ValueError, match="counter"):
        DataGeneration(1, 0)
    long = History()
    for i in range(HISTORY_LIMIT + 5):
        long = long.promote(gen_id=i + 1, now_ns=i, fork_seq=i)
    assert len(long.generations) == HISTORY_LIMIT and long.current is not None
    assert long.current.counter == HISTORY_LIMIT + 5


def test_divergence_splits_loss_from_split_brain() -> None:
    promoted = DataGeneration(7, 2, started_ns=1_000, fork_seq=10)
    writes = [WriteInfo(9, 500, 4096),  # shipped before the fork: neither
              WriteInfo(11, 900, 4096), WriteInfo(12, 999, 8192),  # before the promotion: the loss
              WriteInfo(13, 1_000, 512)]  # after it: split brain
    d = divergence(writes, promoted)
    assert (d.lost_writes, d.lost_bytes, d.diverged_writes, d.diverged_bytes) == (2, 12288, 1, 512)
    assert d.diverged
    assert not divergence(writes[:3], promoted).diverged


def test_resync_plan_union_and_digest_skip() -> None:
    plan = resync_plan([1, 2, 5], [2, 3], region_blocks=8)
    assert plan.regions == (1, 2, 3, 5) and plan.copy is None
    assert plan.runs(100) == ((8, 24), (40, 8))
    done = plan.after_digests({1: b"a", 2: b"b", 3: b"c"}, {1: b"a", 2: b"X", 5: b"e"})
    assert done.copy == (2, 3, 5) and done.skipped == (1,)
    assert done.runs(44) == ((16, 16), (40, 4))  # the last region is cut at the volume's end
    assert resync_plan([], [], region_blocks=8).runs(100) == ()
    with pytest.raises(ValueError):
        resync_plan([-1], [], region_blocks=8)
    with pytest.raises(ValueError):
        resync_plan([], [], region_blocks=0)
    assert regions_of_extents([(0, 1), (7, 2), (30, 0), (64, 8)], region_blocks=8) == {0, 1, 8}


# -- properties ---------------------------------------------------------------------------------
def _mirror(d: Decision) -> tuple[Outcome, bool, bool, bool]:
    swap = {L: R, R: L}
    return swap.get(d.outcome, d.outcome), d.resolved, d.may_clear_remote, d.may_clear_local


gen_ids = st.integers(min_value=1, max_value=12)


@st.composite
def histories(draw: st.DrawFn) -> History:
    ids = draw(st.lists(gen_ids, unique=True, max_size=5))
    return History(tuple(DataGeneration(i, n + 1, i, i) for n, i in enumerate(ids)))


def _resolutions(h: History, other: History) -> st.SearchStrategy[Resolution | None]:
    return st.one_of(st.none(), st.builds(Resolution, st.sampled_from(Keep), st.just(h.current),
                                          st.sampled_from([other.current, None])))


@settings(max_examples=400)
@given(data=st.data(), lh=histories(), rh=histories(), ld=st.booleans(), rd=st.booleans())
def test_decision_properties(data: st.DataObject, lh: History, rh: History, ld: bool, rd: bool) -> None:
    lres = data.draw(_resolutions(lh, rh))
    rres = data.draw(_resolutions(rh, lh))
    a, b = SideView(lh, ld, lres), SideView(rh, rd, rres)
    d = decide(a, b)
    # the same facts seen from the other end give the mirrored answer
    assert _mirror(decide(b, a)) == (d.outcome, d.resolved, d.may_clear_local, d.may_clear_remote)
    lc, rc = lh.current, rh.current
    related = lc is None or rc is None or bool(set(lh.generations) & set(rh.generations))
    assert (d.outcome is U) == (not related)
    assert (d.outcome is S) == (related and lc == rc and not ld and not rd)
    if not d.resolved:
        # a one-sided decision never makes a side with writes of its own the copy that is overwritten
        assert not (ld and d.outcome is R) and not (rd and d.outcome is L)
        assert not (ld and d.may_clear_local and d.outcome is not L)
        assert not (rd and d.may_clear_remote and d.outcome is not R)
        if d.outcome is R:
            assert lh.holds(lc) and rh.holds(lc)  # the local's generation is one the remote went through
        if d.outcome is L:
            assert lh.holds(rc)
    else:
        assert d.outcome in (L, R)
        assert lres is not None or rres is not None


@settings(max_examples=300)
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "promote", "sync"]), st.sampled_from([0, 1])),
                    max_size=30))
def test_no_write_is_overwritten_without_an_operator(ops: list[tuple[str, int]]) -> None:
    """Two copies of one source; writes, promotions and syncs in any order. Whenever a sync copies
    one side over the other, the overwritten side held no write the newer side lacks."""
    hist = [History.initial(1, 0), History()]
    data: list[set[int]] = [set(), set()]
    dirty = [False, False]
    primary = [True, False]
    next_id, next_write = 2, 0
    for op, side in ops:
        if op == "write" and primary[side]:
            data[side].add(next_write)
            next_write += 1
            dirty[side] = True
        elif op == "promote" and not primary[side] and hist[side].current is not None:
            hist[side] = hist[side].promote(gen_id=next_id, now_ns=next_id, fork_seq=0)
            next_id += 1
            primary[side] = True
        elif op == "sync":
            d = decide(SideView(hist[0], dirty[0]), SideView(hist[1], dirty[1]))
            if d.outcome in (L, R):
                new, old = (0, 1) if d.outcome is L else (1, 0)
                assert data[old] <= data[new], (d, data)
                data[old] = set(data[new])
                hist[old] = hist[new]
                primary[old] = False
                if d.may_clear_local:
                    dirty[0] = False
                if d.may_clear_remote:
                    dirty[1] = False
                # both sides now agree: nothing remains dirty on either
                assert not dirty[0] and not dirty[1]
            elif d.outcome is S:
                assert data[0] == data[1]
            else:
                assert d.outcome is B
                assert (primary[0] and primary[1]) or data[0] != data[1] or hist[0] != hist[1]
