"""Role state on disk: round trip, crash safety, damaged files, per-peer bitmaps."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.failover.generations import DataGeneration, History, Keep, Resolution
from firmware.failover.state import RoleState, RoleStore, SplitBrain, state_from_json, state_to_json

G1 = DataGeneration(0xFEDCBA9876543210, 1, 5, 0)
G2 = DataGeneration(0x0123456789ABCDEF, 2, 77, 12)

u64 = st.integers(min_value=1, max_value=(1 << 64) - 1)
nonneg = st.integers(min_value=0, max_value=(1 << 63))
gens = st.builds(DataGeneration, u64, st.integers(min_value=1, max_value=1000), nonneg, nonneg)


@st.composite
def role_states(draw: st.DrawFn) -> RoleState:
    raw = draw(st.lists(gens, max_size=6, unique_by=lambda g: g.gen_id))
    raw.sort(key=lambda g: g.counter)
    dedup: list[DataGeneration] = []
    for g in raw:
        if not dedup or g.counter > dedup[-1].counter:
            dedup.append(g)
    hist = History(tuple(dedup))
    opt_gen = st.one_of(st.none(), gens)
    res = draw(st.one_of(st.none(), st.builds(Resolution, st.sampled_from(Keep), opt_gen, opt_gen)))
    sb = draw(st.one_of(st.none(), st.builds(SplitBrain, st.text(max_size=8), opt_gen, opt_gen, nonneg, nonneg,
                                             st.text(max_size=20), nonneg)))
    report = st.one_of(st.none(), st.fixed_dictionaries({"bytes_moved": nonneg, "seconds": st.floats(0, 1e6)}))
    return RoleState(draw(st.text(min_size=1, max_size=10)), draw(st.booleans()), hist, res, sb,
                     draw(report), draw(report))


@given(role_states())
def test_json_round_trip(s: RoleState) -> None:
    assert state_from_json(json.loads(json.dumps(state_to_json(s)))) == s


def test_store_saves_and_reloads(tmp_path: Path) -> None:
    st0 = RoleState("db1", True, History((G1,)))
    with RoleStore(tmp_path, "db1") as store:
        assert store.load() is None
        assert store.load_or_create(st0) == st0
        store.update(primary=False, history=History((G1, G2)), last_resync={"bytes_moved": 4096, "seconds": 0.5})
    with RoleStore(tmp_path, "db1") as again:
        got = again.load()
    assert got is not None and not got.primary and got.history.current == G2
    assert got.status() == {"primary": False, "split_brain": False, "data_generation": G2.label,
                            "last_resync": {"bytes_moved": 4096, "seconds": 0.5}}
    assert (tmp_path / "roles" / "db1.json").is_file()
    assert not list((tmp_path / "roles").glob("*.tmp"))


def test_power_cut_during_save_leaves_the_old_state(tmp_path: Path) -> None:
    with RoleStore(tmp_path, "db1") as store:
        store.save(RoleState("db1", True, History((G1,))))
    # a cut after the temporary file was written but before the rename: the old state stays
    (tmp_path / "roles" / "db1.json.tmp").write_bytes(b'{"version": 1, "source_id": "db1", "prim')
    with RoleStore(tmp_path, "db1") as store:
        got = store.load()
        assert got is not None and got.primary and got.history.current == G1
        store.update(primary=False)  # the next save replaces the leftover
    with RoleStore(tmp_path, "db1") as store:
        got = store.load()
        assert got is not None and not got.primary


@pytest.mark.parametrize("text", [
    "", "{", "[]", '{"version": 2}',
    '{"version": 1, "source_id": "db1", "primary": "yes", "history": [], "resolution": null, '
    '"split_brain": null, "last_resync": null, "failover_loss": null}',
    '{"version": 1, "source_id": "db1", "primary": true, "history": [{"id": "zz", "counter": 1, '
    '"started_ns": 0, "fork_seq": 0}], "resolution": null, "split_brain": null, "last_resync": null, '
    '"failover_loss": null}',
    '{"version": 1, "source_id": "db1", "primary": true, "history": []}',
])
def test_damaged_state_is_a_precise_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "roles").mkdir()
    (tmp_path / "roles" / "db1.json").write_text(text)
    with RoleStore(tmp_path, "db1") as store, pytest.raises(ValueError, match=r"db1\.json is damaged"):
        store.load()


def test_state_of_another_source_is_refused(tmp_path: Path) -> None:
    with RoleStore(tmp_path, "db1") as store:
        store.save(RoleState("db1", True))
    (tmp_path / "roles" / "db1.json").rename(tmp_path / "roles" / "db2.json")
    with RoleStore(tmp_path, "db2") as other, pytest.raises(ValueError, match="belongs to source 'db1'"):
        other.load()


@pytest.mark.parametrize("name", ["", "..", "a/b", "x" * 129, "sp ace"])
def test_names_that_cannot_be_files_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cannot name a file"):
        RoleStore(tmp_path, name)
    with RoleStore(tmp_path, "db1") as store, pytest.raises(ValueError, match="cannot name a file"):
        store.bitmap_path(name)


def test_peer_bitmaps_persist(tmp_path: Path) -> None:
    vol = uuid.uuid4()
    with RoleStore(tmp_path, "db1") as store:
        bm = store.bitmap("r1", num_blocks=1000, region_blocks=64, volume_uuid=vol)
        bm.mark(70, 3)
        bm.mark(999, 1)
        assert store.bitmap("r1", num_blocks=1000, region_blocks=64, volume_uuid=vol) is bm
    with RoleStore(tmp_path, "db1") as store:
        assert store.peers_with_bitmaps() == ["r1"]
        bm = store.bitmap("r1", num_blocks=1000, region_blocks=64, volume_uuid=vol)
        snap = bm.snapshot()
        assert snap.region_indices == (1, 15)
        bm.clear(snap)
    with RoleStore(tmp_path, "db1") as store:
        assert store.bitmap("r1", num_blocks=1000, region_blocks=64, volume_uuid=vol).dirty_regions == 0


def test_split_brain_status() -> None:
    sb = SplitBrain("r1", G1, G2, 1 << 20, 3 << 20, "both wrote", 9)
    s = RoleState("db1", True, History((G1,)), Resolution(Keep.PEER, G1, G2), sb).status()
    assert s["split_brain"] is True and s["primary"] is True
    assert s["split_brain_detail"]["peer_bytes"] == 3 << 20
    assert s["split_brain_detail"]["peer_generation"] == G2.label
    assert s["resolution_pending"] == "keep peer"


def test_status_says_which_half_done_step_resumes() -> None:
    base = RoleState("db1", True, History((G1, G2)))
    assert "pending_step" not in base.status()
    rolling = RoleState("db1", True, History((G1, G2)), promotion={"rollback_to_seq": 12})
    assert rolling.status()["pending_step"].startswith("promote: the rollback to seq 12 is unfinished; it resumes")
    handing = RoleState("db1", True, History((G1, G2)), promotion={"rollback_to_seq": None, "handover": True})
    assert handing.status()["pending_step"].startswith("failback: ")
    done = RoleState("db1", True, History((G1, G2)), promotion={"rollback_to_seq": None, "rolled_back_blocks": 3})
    assert "pending_step" not in done.status()
    resetting = RoleState("db1", False, History((G1,)), last_resync={"needs_full_resync": True})
    assert resetting.status()["pending_step"].startswith("resolve --keep local: ")
