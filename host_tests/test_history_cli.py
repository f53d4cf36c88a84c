"""`usbmirror history`: the points of a running remote's history, newest first, the oldest
restorable time and the size against the cap; a precise error for a source without history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firmware import cli
from firmware.link import protocol as jp
from host_tests.test_history_remote import _remote, pt, w
from host_tests.test_remote_unit import Source


def test_history_lists_points_newest_first_with_the_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _remote(tmp_path) as ru:
        s = Source(ru.port)
        recs = (w(1, 0, 1, 4), pt(2), w(3, 1, 2, 2), pt(4, "before-upgrade"), w(5, 0, 3, 1), pt(6))
        s.send(jp.Batch(0, recs))
        s.ack_upto(6)
        state = ru.cfg.state_dir
        assert cli.main(["history", "--state-dir", state, "--source", "s1", "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert [(p["seq"], p["kind"], p.get("name")) for p in rep["points"]] == \
            [(6, "flush", None), (4, "mark", "before-upgrade"), (2, "flush", None)]
        assert [p["time"] for p in rep["points"]] == [recs[5].timestamp_ns / 1e9, recs[3].timestamp_ns / 1e9,
                                                      recs[1].timestamp_ns / 1e9]
        assert rep["oldest_seq"] == 0
        assert rep["size_cap_bytes"] == 1 << 20
        assert 0 < rep["size_bytes"] <= 1 << 20
        assert rep["newest_point"]["seq"] == 6
        assert cli.main(["history", "--state-dir", state, "--source", "s1"]) == 0
        text = capsys.readouterr().out
        assert "of 1.0 MiB" in text and "3 points, newest first:" in text
        rows = text.splitlines()
        lines = [ln.split() for ln in rows[rows.index(next(r for r in rows if r.split()[:1] == ["seq"])) + 1:]]
        assert [ln[0] for ln in lines] == ["6", "4", "2"] and lines[1][2:] == ["mark", "before-upgrade"]
        s.close()


def test_history_of_an_unknown_source_names_the_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _remote(tmp_path) as ru:
        s = Source(ru.port)
        s.send(jp.Batch(0, (w(1, 0, 1), pt(2))))
        s.ack_upto(2)
        assert cli.main(["history", "--state-dir", ru.cfg.state_dir, "--source", "nope"]) == 1
        err = capsys.readouterr().err
        assert "no history for source 'nope'" in err and "sources with history: s1" in err
        s.close()
