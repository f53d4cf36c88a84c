"""The history in a remote unit's status, per source: size and cap, the oldest restorable time,
the newest restore point and its age (the recovery point objective), and a warning when the size
cap makes the history cover less than the age asked; also after a restart, before the source
reconnects."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from firmware.link import protocol as jp
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from firmware.status_text import render_status
from host_tests.test_remote_unit import BS, Source

AGO = 100  # the records are stamped this many seconds ago


def _remote(tmp_path: Path, size: int | None = 8 << 20) -> RemoteUnit:
    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", targets={"s1": str(tmp_path / "t.img")},
                           tls_dir=None, state_dir=str(tmp_path / "state"), heartbeat_timeout_s=5,
                           history_size=size)
    return RemoteUnit(cfg)


def _recs(t0: int, first: int, n: int) -> tuple[jp.Record, ...]:
    out = []
    for i in range(n):
        seq = first + i
        if seq % 2:
            out.append(jp.Record(seq, jp.RecordKind.WRITE, (seq * 8) % 2048, 8, t0 + seq, bytes([seq % 250 + 1]) * (BS * 8)))
        else:
            out.append(jp.Record(seq, jp.RecordKind.FLUSH, 0, 0, t0 + seq, b""))
    return tuple(out)


def _src(ru: RemoteUnit) -> dict[str, Any]:
    st = ru.status()
    (s,) = st["sources"]
    assert isinstance(s, dict)
    return s


def test_status_reports_size_cap_oldest_time_and_the_newest_point_age(tmp_path: Path) -> None:
    t0 = time.time_ns() - AGO * 10**9
    with _remote(tmp_path) as ru:
        s = Source(ru.port)
        recs = (*_recs(t0, 1, 5), jp.Record(6, jp.RecordKind.MARK, 0, 0, t0 + 6, b"nightly"))
        s.send(jp.Batch(0, recs))
        s.ack_upto(6)
        h = _src(ru)
        assert 0 < h["history_size_bytes"] <= h["history_cap_bytes"] == 8 << 20
        assert h["history_oldest_seq"] == 0
        assert h["history_oldest_time"] == (t0 + 1) / 1e9  # the oldest record's local time
        assert h["history_newest_point"] == {"seq": 6, "time": (t0 + 6) / 1e9, "kind": "mark", "name": "nightly"}
        assert h["history_newest_point_age_s"] >= AGO - 1
        assert h["history_covers_s"] >= AGO - 1
        assert h["history_warning"] == "" and ru.status()["warnings"] == []
        text = render_status(ru.status())
        assert "history " in text and "newest point seq 6" in text
        s.close()


def test_a_size_cap_shorter_than_the_age_asked_is_a_warning(tmp_path: Path) -> None:
    t0 = time.time_ns() - AGO * 10**9
    with _remote(tmp_path, size=64 << 10) as ru:
        s = Source(ru.port)
        s.send(jp.Batch(0, _recs(t0, 1, 60)))
        s.ack_upto(60)
        h = _src(ru)
        assert h["history_size_bytes"] <= 64 << 10
        assert h["history_oldest_seq"] > 0  # trimmed by size
        assert h["history_warning"].startswith("history covers ")
        assert "less than the 86400 s asked" in h["history_warning"]
        st = ru.status()
        assert st["warnings"] == [f"source s1: {h['history_warning']}"]
        assert "WARNING  source s1: history covers" in render_status(st)
        s.close()


def test_status_reports_the_history_after_a_restart_before_the_source_reconnects(tmp_path: Path) -> None:
    t0 = time.time_ns() - AGO * 10**9
    ru = _remote(tmp_path)
    ru.start()
    try:
        s = Source(ru.port)
        s.send(jp.Batch(0, _recs(t0, 1, 4)))
        s.ack_upto(4)
        before = _src(ru)
        s.close()
    finally:
        ru.stop()
    with _remote(tmp_path) as ru2:
        h = _src(ru2)
        assert h["state"] == "idle"
        for k in ("history_size_bytes", "history_oldest_time", "history_newest_point"):
            assert h[k] == before[k]


def test_without_history_the_keys_are_empty(tmp_path: Path) -> None:
    with _remote(tmp_path, size=None) as ru:
        s = Source(ru.port)
        s.send(jp.Batch(0, _recs(time.time_ns(), 1, 2)))
        s.ack_upto(2)
        h = _src(ru)
        assert h["history_size_bytes"] is None and h["history_newest_point"] is None
        assert h["history_warning"] == ""
        assert not (tmp_path / "state" / "s1.history").exists()
        s.close()
