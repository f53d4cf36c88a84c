"""The point-in-time history: undo log, index, image views and restore, against a model.

The model is a dict of the whole image saved at every point; every listed point must read back
as that image, through reopen, torn tails, trimming and a target that keeps changing.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.history import (
    HistoryError,
    HistoryReader,
    HistoryWriter,
    ImageView,
    resolve,
    restore,
    summary,
)
from firmware.history.format import HistoryCorrupt, Meta, PointKind, decode_header, encode_point, encode_undo, scan

BS = 512
NBLOCKS = 64
T0 = 1_700_000_000 * 10**9


@dataclass(frozen=True)
class Rec:
    seq: int
    kind: int
    lba: int
    count: int
    timestamp_ns: int
    payload: bytes


class Rig:
    """A target file, the history writer in front of it and the model of images at each seq."""

    def __init__(self, root: Path, *, size_cap: int = 1 << 30, age_s: float = 1e9, segment_bytes: int = 1 << 20,
                 now: list[int] | None = None) -> None:
        self.root = root
        self.target = root / "target.img"
        self.target.write_bytes(bytes(NBLOCKS * BS))
        self.hdir = root / "src.history"
        self.clock = now if now is not None else [T0]
        self.kw = dict(size_cap=size_cap, age_s=age_s, segment_bytes=segment_bytes, now=lambda: self.clock[0])
        self.w = self._open_writer()
        self.seq = 0
        self.image = bytearray(NBLOCKS * BS)
        self.images: dict[int, bytes] = {0: bytes(self.image)}
        self.fd = os.open(self.target, os.O_RDWR)

    def _open_writer(self) -> HistoryWriter:
        return HistoryWriter.open(self.hdir, block_size=BS, num_blocks=NBLOCKS, volume_uuid="ab" * 16,
                                  generation=1, target=str(self.target), base_seq=0, **self.kw)  # type: ignore[arg-type]

    def reopen(self) -> None:
        self.w.close()
        self.w = self._open_writer()

    def read(self, lba: int, count: int) -> bytes:
        return os.pread(self.fd, count * BS, lba * BS)

    def make(self, kind: int, lba: int = 0, count: int = 0, fill: int | None = None, name: str = "") -> Rec:
        self.seq += 1
        self.clock[0] += 10**9
        payload = b""
        if kind == 1:
            payload = bytes([fill if fill is not None else self.seq % 251 + 1]) * (count * BS)
        elif kind == 4:
            payload = name.encode()
        return Rec(self.seq, kind, lba, count, self.clock[0], payload)

    def apply(self, recs: list[Rec]) -> None:
        self.w.before_apply(recs, self.read)
        for r in recs:
            if r.kind == 1:
                os.pwrite(self.fd, r.payload, r.lba * BS)
                self.image[r.lba * BS:(r.lba + r.count) * BS] = r.payload
            elif r.kind == 2:
                os.pwrite(self.fd, bytes(r.count * BS), r.lba * BS)
                self.image[r.lba * BS:(r.lba + r.count) * BS] = bytes(r.count * BS)
            self.images[r.seq] = bytes(self.image)

    def view_bytes(self, **point: object) -> bytes:
        with HistoryReader(self.hdir) as rd:
            res = resolve(rd.index, **point)  # type: ignore[arg-type]
            with ImageView(rd, res.start_id) as v:
                return v.read(0, NBLOCKS)

    def close(self) -> None:
        self.w.close()
        os.close(self.fd)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r  # type: ignore[misc]
    r.close()


def test_format_round_trip_and_damage() -> None:
    rec = encode_undo(7, T0, 3, b"\x01" * BS * 2, BS)
    h = decode_header(rec)
    assert h is not None and (h.seq, h.lba, h.count, h.payload_len) == (7, 3, 2, 2 * BS)
    pt = encode_point(8, T0, PointKind.MARK, "x")
    recs, used = scan(rec + pt, 100, verify=True)
    assert [r.pos for r in recs] == [100, 100 + len(rec)] and used == len(rec) + len(pt)
    assert recs[1].name == "x"
    bad = bytearray(rec + pt)
    bad[len(rec) + 10] ^= 1  # the second header's seq
    recs, used = scan(bytes(bad), 0, verify=True)
    assert len(recs) == 1 and used == len(rec)
    torn = rec[:-1]
    assert scan(torn, 0, verify=True) == ([], 0)
    body = bytearray(rec)
    body[100] ^= 0xFF
    assert scan(bytes(body), 0, verify=True)[0] == []  # payload checksum
    with pytest.raises(HistoryCorrupt, match="unsupported version"):
        Meta.decode(b"{}")
    with pytest.raises(HistoryCorrupt):
        Meta.decode(b"not json")


def test_every_point_reads_as_it_was(rig: Rig) -> None:
    rig.apply([rig.make(1, 0, 8), rig.make(1, 4, 8), rig.make(3)])
    rig.apply([rig.make(4, name="before"), rig.make(1, 2, 4, fill=0xEE), rig.make(2, 10, 3), rig.make(3)])
    rig.apply([rig.make(1, 0, NBLOCKS, fill=0x55), rig.make(3)])
    with HistoryReader(rig.hdir) as rd:
        pts = rd.index.live_points()
        assert [p.seq for p in pts] == [3, 4, 7, 9]
        assert [p.kind.name for p in pts] == ["FLUSH", "MARK", "FLUSH", "FLUSH"]
    for s, img in rig.images.items():
        assert rig.view_bytes(seq=s) == img, f"seq {s}"
    assert rig.view_bytes(mark="before") == rig.images[4]


def test_view_stays_fixed_while_target_changes(rig: Rig) -> None:
    rig.apply([rig.make(1, 0, 16), rig.make(4, name="m")])
    want = rig.images[2]
    with HistoryReader(rig.hdir) as rd:
        v = ImageView(rd, resolve(rd.index, mark="m").start_id)
        assert v.read(0, NBLOCKS) == want
        for i in range(20):  # writes after the view opened, some partly over old blocks
            rig.apply([rig.make(1, (i * 5) % (NBLOCKS - 8), 8)])
            assert v.read(0, NBLOCKS) == want
            assert v.read(3, 7) == want[3 * BS:10 * BS]
        v.close()


def test_history_survives_reopen_and_drops_a_torn_tail(rig: Rig) -> None:
    rig.apply([rig.make(1, 0, 8), rig.make(3), rig.make(1, 0, 4, fill=9), rig.make(4, name="m")])
    rig.reopen()
    seg = sorted(rig.hdir.glob("seg-*.log"))[-1]
    good = seg.stat().st_size
    with open(seg, "ab") as f:  # a record cut short by a power cut
        f.write(encode_undo(99, T0, 0, b"\x07" * BS * 4, BS)[:-100])
    rig.reopen()
    assert seg.stat().st_size == good
    for s in (2, 4):
        assert rig.view_bytes(seq=s) == rig.images[s]
    # records sent again after the restart are not logged twice (their before-image is already there)
    rig.apply([rig.make(1, 0, 4)])
    assert rig.view_bytes(mark="m") == rig.images[4]


def test_a_record_seen_before_a_crash_is_not_saved_again(rig: Rig) -> None:
    a = rig.make(1, 0, 4, fill=1)
    b = rig.make(1, 0, 4, fill=2)
    rig.apply([a, b, rig.make(3)])
    # power cut: record 2's write never reached the target's disk, and the remote's durable
    # position is 0, so records 1 and 2 come again; a before-image taken now would be wrong for
    # the flush point 3
    rig.reopen()
    os.pwrite(rig.fd, rig.images[1], 0)
    rig.w.before_apply([a, b], rig.read)
    os.pwrite(rig.fd, a.payload, 0)
    os.pwrite(rig.fd, b.payload, 0)
    for s in (0, 1, 2, 3):
        assert rig.view_bytes(seq=s) == rig.images[s], f"seq {s}"


def test_retention_by_size_trims_oldest_and_keeps_every_listed_point(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size_cap=20 * BS, segment_bytes=8 * BS)
    big = 0
    for i in range(40):
        r = rig.make(1, (i * 3) % (NBLOCKS - 4), 4)
        rig.apply([r, rig.make(3)])
        big = max(big, 4 * BS + 48)
        assert rig.w.index.size <= 20 * BS
    with HistoryReader(rig.hdir) as rd:
        pts = rd.index.live_points()
        oldest = rd.index.oldest_restorable()
        assert pts and oldest is not None and oldest > 0
        for p in pts:
            assert rig.view_bytes(seq=p.seq) == rig.images[p.seq]
        with pytest.raises(HistoryError, match="oldest point available is seq"):
            resolve(rd.index, seq=1)
    assert len(list(rig.hdir.glob("seg-*.log"))) < 40  # old segments were deleted
    rig.close()


def test_retention_by_age(tmp_path: Path) -> None:
    clock = [T0]
    rig = Rig(tmp_path, age_s=10.0, now=clock)
    for _ in range(30):  # a record a second
        rig.apply([rig.make(1, 0, 2), rig.make(3)])
    with HistoryReader(rig.hdir) as rd:
        first_time = min(p.time_ns for p in rd.index.live_points())
        assert clock[0] - first_time <= 10 * 10**9
        assert rd.index.base_time_ns >= clock[0] - 12 * 10**9
        with pytest.raises(HistoryError, match="before the history"):
            resolve(rd.index, at=(T0 + 5 * 10**9) / 1e9)
    rig.close()


def test_open_view_holds_trimming(tmp_path: Path) -> None:
    rig = Rig(tmp_path, size_cap=12 * BS, segment_bytes=4 * BS)
    rig.apply([rig.make(1, 0, 4), rig.make(4, name="keep")])
    want = rig.images[2]
    with HistoryReader(rig.hdir) as rd:
        v = ImageView(rd, resolve(rd.index, mark="keep").start_id)
        for _ in range(10):
            rig.apply([rig.make(1, 0, 4)])
        assert v.read(0, NBLOCKS) == want
        v.close()
    rig.apply([rig.make(1, 0, 4)])  # the pin is gone: trimming goes on
    assert rig.w.index.size <= 12 * BS
    rig.close()


def test_at_time_is_every_write_up_to_then(rig: Rig) -> None:
    rig.apply([rig.make(1, 0, 4, fill=1), rig.make(3), rig.make(1, 0, 4, fill=2), rig.make(1, 8, 4, fill=3)])
    t3 = rig.images[3]
    at = (T0 + 3 * 10**9 + 5 * 10**8) / 1e9  # between record 3 and record 4
    assert rig.view_bytes(at=at) == t3
    assert rig.view_bytes(at=str(at)) == t3
    import datetime as dt
    iso = dt.datetime.fromtimestamp(at, dt.UTC).isoformat()
    assert rig.view_bytes(at=iso) == t3


def test_bad_points_are_clear_errors(rig: Rig) -> None:
    rig.apply([rig.make(1, 0, 4), rig.make(4, name="m")])
    with HistoryReader(rig.hdir) as rd:
        with pytest.raises(HistoryError, match=r"no mark 'nope'.*marks: m"):
            resolve(rd.index, mark="nope")
        with pytest.raises(HistoryError, match="newer than anything applied"):
            resolve(rd.index, seq=50)
        with pytest.raises(HistoryError, match="neither ISO 8601"):
            resolve(rd.index, at="yesterday")
        with pytest.raises(HistoryError, match="exactly one"):
            resolve(rd.index, seq=1, mark="m")


def test_resync_window_keeps_the_image_before_it(rig: Rig) -> None:
    rig.apply([rig.make(1, 0, 8, fill=1), rig.make(3)])
    before = rig.images[2]
    rig.w.resync_begin(2, T0)
    for lba in range(0, NBLOCKS, 16):  # the copy overwrites everything, some chunks twice
        for _ in range(2):
            rig.w.before_region(lba, 16, rig.read)
            os.pwrite(rig.fd, bytes([0x77]) * 16 * BS, lba * BS)
    rig.seq = 10  # the source's position at the resync
    rig.image[:] = bytes([0x77]) * NBLOCKS * BS
    rig.apply([rig.make(1, 0, 2, fill=5), rig.make(3)])
    rig.w.resync_end(12, T0)
    rig.apply([rig.make(3)])
    assert rig.view_bytes(seq=2) == before
    with HistoryReader(rig.hdir) as rd:
        with pytest.raises(HistoryError, match="inside a resync"):
            resolve(rd.index, seq=11)
        assert [p.seq for p in rd.index.live_points()] == [2, 13]
    assert rig.view_bytes(seq=13) == rig.images[13]


def test_restore_writes_the_image_and_reports_progress(rig: Rig, tmp_path: Path) -> None:
    rig.apply([rig.make(1, 0, 8), rig.make(4, name="m"), rig.make(1, 0, 8, fill=3)])
    seen: list[int] = []
    with HistoryReader(rig.hdir) as rd, ImageView(rd, resolve(rd.index, mark="m").start_id) as v:
        n = restore(v, tmp_path / "out.img", progress=lambda done, total: seen.append(done))
        assert n == NBLOCKS * BS and seen[-1] == NBLOCKS * BS
        with pytest.raises(HistoryError, match="exists already"):
            restore(v, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == rig.images[2]


def test_summary_lists_points_newest_first(rig: Rig) -> None:
    rig.apply([rig.make(1, 0, 8), rig.make(3), rig.make(4, name="m")])
    s = summary(rig.w.index, 1 << 30, 86400.0, T0 + 10 * 10**9)
    assert [p["seq"] for p in s["points"]] == [3, 2]  # type: ignore[index]
    assert s["points"][0] == {"seq": 3, "time": (T0 + 3 * 10**9) / 1e9, "kind": "mark", "name": "m"}  # type: ignore[index]
    assert s["size_bytes"] == rig.w.index.size and s["size_cap_bytes"] == 1 << 30


ops = st.lists(st.tuples(st.sampled_from(["w", "w", "w", "u", "f", "m", "reopen", "trim"]),
                         st.integers(0, NBLOCKS - 1), st.integers(1, 12)), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops, st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_model(tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, int]], batch: int,
               seed: int) -> None:
    """Random writes, unmaps, flushes and marks in random batches, reopen and trimming: every
    point the history lists (and every seq it says it can restore) reads as the model image."""
    root = tmp_path_factory.mktemp("h")
    rnd = random.Random(seed)
    cap = rnd.choice([1 << 30, 40 * BS, 16 * BS])
    rig = Rig(root, size_cap=cap, segment_bytes=rnd.choice([6 * BS, 1 << 20]))
    try:
        pending: list[Rec] = []
        for op, lba, n in steps:
            n = min(n, NBLOCKS - lba)
            if op == "w":
                pending.append(rig.make(1, lba, n))
            elif op == "u":
                pending.append(rig.make(2, lba, n))
            elif op == "f":
                pending.append(rig.make(3))
            elif op == "m":
                pending.append(rig.make(4, name=f"m{rig.seq + 1}"))
            elif op == "reopen":
                rig.apply(pending)
                pending = []
                rig.reopen()
            if len(pending) >= batch:
                rig.apply(pending)
                pending = []
            assert rig.w.index.size <= cap + NBLOCKS * BS + 48
        rig.apply(pending)
        with HistoryReader(rig.hdir) as rd:
            idx = rd.index
            oldest = idx.oldest_restorable()
            assert oldest is not None
            for p in idx.live_points():
                assert rig.view_bytes(seq=p.seq) == rig.images[p.seq]
            for s in range(oldest, rig.seq + 1):
                with ImageView(rd, resolve(idx, seq=s).start_id) as v:
                    assert v.read(0, NBLOCKS) == rig.images[s], f"seq {s}"
    finally:
        rig.close()


class _Cut(Exception):
    pass


@pytest.mark.parametrize("cut_at", [1, 47, 48, 300, 1000, 2047])
def test_power_cut_while_saving_a_before_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_at: int) -> None:
    """The history write is cut after `cut_at` bytes (the target write after it never happens):
    on reopen the torn tail is dropped and every listed point restores as it was."""
    import firmware.history.store as store
    rig = Rig(tmp_path, size_cap=30 * BS, segment_bytes=10 * BS)
    for i in range(6):
        rig.apply([rig.make(1, i * 4, 4), rig.make(3)])
    real = os.pwrite

    def torn(fd: int, data: bytes, off: int) -> int:
        real(fd, bytes(data)[:cut_at], off)
        raise _Cut

    monkeypatch.setattr(store.os, "pwrite", torn)
    with pytest.raises(_Cut):
        rig.w.before_apply([rig.make(1, 0, 8, fill=0xAB), rig.make(3)], rig.read)
    monkeypatch.setattr(store.os, "pwrite", real)
    rig.seq -= 2
    rig.reopen()
    with HistoryReader(rig.hdir) as rd:
        pts = rd.index.live_points()
        assert pts
        for p in pts:
            assert rig.view_bytes(seq=p.seq) == rig.images[p.seq]
    rig.apply([rig.make(1, 0, 8, fill=0xAB), rig.make(3)])  # the source sends them again
    assert rig.view_bytes(seq=rig.seq) == rig.images[rig.seq]
    assert rig.view_bytes(seq=rig.seq - 2) == rig.images[rig.seq - 2]
    rig.close()


@pytest.mark.parametrize("where", ["before_meta", "after_meta"])
def test_power_cut_while_trimming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import firmware.history.store as store
    rig = Rig(tmp_path, size_cap=24 * BS, segment_bytes=6 * BS)
    for i in range(5):
        rig.apply([rig.make(1, i * 4, 4), rig.make(3)])
    if where == "before_meta":
        monkeypatch.setattr(store, "write_atomically", lambda *a, **k: (_ for _ in ()).throw(_Cut()))
    else:
        monkeypatch.setattr(store._Segments, "drop_below", lambda self, pos: (_ for _ in ()).throw(_Cut()))
    batch = [rig.make(1, 20, 4, fill=0x33), rig.make(3)]
    with pytest.raises(_Cut):
        rig.apply(batch)  # the before-images are durable, the cut comes while trimming
    monkeypatch.undo()
    rig.reopen()
    rig.apply(batch)  # the source sends the records again; the target gets them now
    rig.apply([rig.make(1, 0, 2, fill=0x11), rig.make(3)])
    with HistoryReader(rig.hdir) as rd:
        for p in rd.index.live_points():
            assert rig.view_bytes(seq=p.seq) == rig.images[p.seq], f"seq {p.seq}"
    assert rig.w.index.size <= 24 * BS
    rig.close()
