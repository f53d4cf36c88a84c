"""History wired into the remote unit: before-images saved as records are applied, flushes and
marks listed in order, the image at a mark read back while the remote keeps applying, and a
resync keeping the image from before it."""

from __future__ import annotations

import time
from pathlib import Path

from firmware.history import HistoryReader, ImageView, history_dir, resolve
from firmware.link import protocol as jp
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from host_tests.test_remote_unit import BS, Source


def w(seq: int, lba: int, fill: int, count: int = 1) -> jp.Record:
    """A write stamped now (the history trims by age against the remote's clock)."""
    return jp.Record(seq, jp.RecordKind.WRITE, lba, count, time.time_ns(), bytes([fill]) * (BS * count))


def pt(seq: int, name: str = "") -> jp.Record:
    kind = jp.RecordKind.MARK if name else jp.RecordKind.FLUSH
    return jp.Record(seq, kind, 0, 0, time.time_ns(), name.encode())


def _remote(tmp_path: Path) -> RemoteUnit:
    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", targets={"s1": str(tmp_path / "t.img")},
                           tls_dir=None, state_dir=str(tmp_path / "state"), heartbeat_timeout_s=5,
                           history_size=1 << 20)
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


def test_remote_history_options() -> None:
    import pytest

    from firmware.config import parse_duration
    assert parse_duration("24h") == 86400 and parse_duration("90") == 90 and parse_duration("15m") == 900
    for bad in ("", "soon", "-1h", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
