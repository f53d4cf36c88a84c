"""History wired into the remote unit: before-images saved as records are applied, flushes and
marks listed in order, the image at a mark read back while the remote keeps applying, and a
resync keeping the image from before it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from firmware.history import HistoryError, HistoryReader, ImageView, history_dir, resolve
from firmware.link import protocol as jp
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from host_tests.test_remote_unit import BS, Source


def w(seq: int, lba: int, fill: int, count: int = 1) -> jp.Record:
    """A write stamped now (the history trims by age against the remote's clock)."""
    return jp.Record(seq, jp.RecordKind.WRITE, lba, count, time.time_ns(), bytes([fill]) * (BS * count))


def pt(seq: int, name: str = "") -> jp.Record:
    kind = jp.RecordKind.MARK if name else jp.RecordKind.FLUSH
    return jp.Record(seq, kind, 0, 0, time.time_ns(), name.encode())


def _remote(tmp_path: Path, *, history: bool = True) -> RemoteUnit:
    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", targets={"s1": str(tmp_path / "t.img")},
                           tls_dir=None, state_dir=str(tmp_path / "state"), heartbeat_timeout_s=5,
                           history_size=1 << 20 if history else None)
    return RemoteUnit(cfg)


def _image(ru: RemoteUnit, **point: object) -> bytes:
    with HistoryReader(history_dir(ru.cfg.state_dir, "s1")) as rd, \
            ImageView(rd, resolve(rd.index, **point).start_id) as v:  # type: ignore[arg-type]
        return v.read(0, v.num_blocks)


def test_remote_keeps_points_and_the_image_at_a_mark(tmp_path: Path) -> None:
    with _remote(tmp_path) as ru:
        s = Source(ru.port)
        s.send(jp.Batch(0, (w(1, 0, 1, 4), pt(2),
                            pt(3, "good"))))
        s.ack_upto(3)
        at_mark = Path(ru.targets["s1"].path).read_bytes()
        s.send(jp.Batch(3, (w(4, 0, 9, 8), w(5, 2, 7, 1))))
        s.ack_upto(5)
        assert Path(ru.targets["s1"].path).read_bytes() != at_mark
        assert _image(ru, mark="good") == at_mark
        with HistoryReader(history_dir(ru.cfg.state_dir, "s1")) as rd:
            pts = rd.index.live_points()
            assert [(p.seq, p.kind.name, p.name) for p in pts] == [(2, "FLUSH", ""), (3, "MARK", "good")]
        s.close()


def test_history_survives_a_restart_and_a_resync_keeps_the_image_before_it(tmp_path: Path) -> None:
    ru = _remote(tmp_path)
    ru.start()
    try:
        s = Source(ru.port)
        s.send(jp.Batch(0, (w(1, 0, 1, 8), pt(2, "m"))))
        s.ack_upto(2)
        at_mark = Path(ru.targets["s1"].path).read_bytes()
        s.close()
        ru.stop()
        ru = _remote(tmp_path)
        ru.start()
        s = Source(ru.port)
        s.send(jp.ResyncBegin(2, 128, 1))
        s.send(jp.RegionData(0, b"\x07" * (128 * BS)))
        s.send(jp.ResyncEnd(4))
        s.ack_upto(2)
        s.send(jp.Batch(2, (w(3, 5, 2), pt(4))))
        s.ack_upto(4)
        s.send(jp.Batch(4, (w(5, 0, 3, 2), pt(6))))
        s.ack_upto(6)
        assert _image(ru, mark="m") == at_mark
        after = _image(ru, seq=6)
        assert after == Path(ru.targets["s1"].path).read_bytes()
        with HistoryReader(history_dir(ru.cfg.state_dir, "s1")) as rd:
            assert [p.seq for p in rd.index.live_points()] == [2, 6]  # the flush inside the resync is not one
        s.close()
    finally:
        ru.stop()


def test_a_remote_run_without_history_offers_no_stale_point_when_history_is_back(tmp_path: Path) -> None:
    """History off for a while: the target changes without before-images, so the old points no
    longer match it. They stay offered only until the target first changes; with history on again
    only points taken since are listed, and each restores to the image it had."""
    hdir = history_dir(str(tmp_path / "state"), "s1")
    with _remote(tmp_path) as ru:
        s = Source(ru.port)
        s.send(jp.Batch(0, (w(1, 0, 1, 8), pt(2, "m"))))
        s.ack_upto(2)
        at_m = Path(ru.targets["s1"].path).read_bytes()
        s.close()
    with _remote(tmp_path, history=False) as ru:
        assert _image(ru, mark="m") == at_m  # the target has not changed: the history still holds
        s = Source(ru.port)
        s.send(jp.Batch(2, (pt(3),)))
        s.ack_upto(3)
        assert _image(ru, mark="m") == at_m  # a flush changes no block
        with HistoryReader(hdir) as rd, ImageView(rd, resolve(rd.index, mark="m").start_id) as view:
            s.send(jp.Batch(3, (w(4, 0, 5, 4), pt(5))))
            s.ack_upto(5)
            with pytest.raises(HistoryError, match="no history"):
                view.read(0, view.num_blocks)  # an open view fails rather than serve the new blocks
        s.close()
        with pytest.raises(HistoryError, match="no history"):
            HistoryReader(hdir)
    with _remote(tmp_path) as ru:
        s = Source(ru.port)
        s.send(jp.Batch(5, (w(6, 6, 2), pt(7, "n"))))
        s.ack_upto(7)
        at_n = Path(ru.targets["s1"].path).read_bytes()
        s.send(jp.Batch(7, (w(8, 0, 9, 8),)))
        s.ack_upto(8)
        s.close()
        with HistoryReader(hdir) as rd:
            assert [(p.seq, p.name) for p in rd.index.live_points()] == [(7, "n")]
            assert rd.index.oldest_restorable() == 5
            with pytest.raises(HistoryError, match="no mark 'm'"):
                resolve(rd.index, mark="m")
        assert _image(ru, mark="n") == at_n
        assert _image(ru, seq=5) == at_n[:6 * BS] + b"\x01" * BS + at_n[7 * BS:]  # before the write of seq 6


def test_remote_history_options() -> None:
    from firmware.config import parse_duration
    assert parse_duration("24h") == 86400 and parse_duration("90") == 90 and parse_duration("15m") == 900
    for bad in ("", "soon", "-1h", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
