"""`usbmirror restore`: the image of a point written byte for byte (by mark, time or seq), also
while the remote keeps applying; the live target, an existing file and bad points are refused
with a precise error, and a full disk leaves nothing behind."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import time
from pathlib import Path

import pytest

from firmware import cli
from firmware.history import HistoryError
from firmware.history import view as history_view
from firmware.history_cli import _Bar, run_restore
from firmware.link import protocol as jp
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from host_tests.test_remote_unit import BS, SIZE, Source

T = time.time_ns() - 60 * 10**9  # a minute ago: inside the default age cap, and times well apart


def rec(seq: int, lba: int, fill: int, count: int = 1) -> jp.Record:
    return jp.Record(seq, jp.RecordKind.WRITE, lba, count, T + seq * 10**9, bytes([fill]) * (BS * count))


def point(seq: int, name: str = "") -> jp.Record:
    kind = jp.RecordKind.MARK if name else jp.RecordKind.FLUSH
    return jp.Record(seq, kind, 0, 0, T + seq * 10**9, name.encode())


class Scenario:
    """A running remote with three points; `images[seq]` is the target as it was after seq."""

    def __init__(self, ru: RemoteUnit) -> None:
        self.ru = ru
        self.state = ru.cfg.state_dir
        self.target = Path(ru.targets["s1"].path)
        self.src = Source(ru.port)
        self.images: dict[int, bytes] = {}
        self.batch(0, rec(1, 0, 1, 64), point(2, "good"))
        self.batch(2, rec(3, 10, 2, 8), point(4))
        self.batch(4, rec(5, 0, 3, 2048), rec(6, 5, 4, 3))  # the whole disk rewritten after the flush

    def batch(self, after: int, *recs: jp.Record) -> None:
        self.src.send(jp.Batch(after, recs))
        self.src.ack_upto(recs[-1].seq)
        self.images[recs[-1].seq] = self.target.read_bytes()


def _remote(tmp_path: Path) -> RemoteUnit:
    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", targets={"s1": str(tmp_path / "t.img")},
                           tls_dir=None, state_dir=str(tmp_path / "state"), heartbeat_timeout_s=5,
                           history_size=16 << 20)
    return RemoteUnit(cfg)


@pytest.fixture
def sc(tmp_path: Path) -> Scenario:
    with _remote(tmp_path) as ru:
        s = Scenario(ru)
        yield s  # type: ignore[misc]
        s.src.close()


def _restore(sc: Scenario, to: Path, *point_args: str) -> int:
    return cli.main(["restore", "--state-dir", sc.state, "--source", "s1", *point_args, "--to", str(to)])


def test_restore_by_mark_seq_and_time_gives_the_image_of_that_point(sc: Scenario, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert sc.images[2] != sc.images[4] != sc.images[6]
    assert _restore(sc, tmp_path / "mark.img", "--mark", "good") == 0
    out = capsys.readouterr().out
    assert out.startswith("restored source s1 at mark 'good' (seq 2) to ") and "1.0 MiB in" in out
    assert (tmp_path / "mark.img").read_bytes() == sc.images[2]
    assert _restore(sc, tmp_path / "seq.img", "--seq", "4") == 0
    assert (tmp_path / "seq.img").read_bytes() == sc.images[4]
    # every write acknowledged up to half a second after record 4, none after (5 and 6 are later)
    t = (T + 4 * 10**9) / 1e9 + 0.5
    assert _restore(sc, tmp_path / "at.img", "--at", f"{t:.3f}") == 0
    assert (tmp_path / "at.img").read_bytes() == sc.images[4]
    iso = dt.datetime.fromtimestamp(t, dt.UTC).isoformat()
    assert _restore(sc, tmp_path / "iso.img", "--at", iso) == 0
    assert (tmp_path / "iso.img").read_bytes() == sc.images[4]
    capsys.readouterr()
    assert cli.main(["restore", "--state-dir", sc.state, "--source", "s1", "--seq", "6", "--to",
                     str(tmp_path / "j.img"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["seq"], rep["bytes"], rep["source"]) == (6, SIZE, "s1")
    assert (tmp_path / "j.img").read_bytes() == sc.images[6] == sc.target.read_bytes()


def test_restore_while_the_remote_keeps_applying(sc: Scenario, tmp_path: Path) -> None:
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 1:  # one chunk copied: the source rewrites the whole disk, twice
            sc.batch(6, rec(7, 0, 9, 2048), point(8, "later"))
            sc.batch(8, rec(9, 0, 10, 2048))

    r = run_restore(sc.state, "s1", str(tmp_path / "out.img"), mark="good", progress=progress,
                    chunk_bytes=64 << 10)
    assert len(seen) == SIZE // (64 << 10) and seen[-1] == SIZE
    assert (tmp_path / "out.img").read_bytes() == sc.images[2]
    assert sc.target.read_bytes() == sc.images[9] != sc.images[2]
    assert (r.seq, r.bytes) == (2, SIZE)


def test_restore_never_overwrites_the_target_or_a_file(sc: Scenario, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = sc.target.read_bytes()
    assert _restore(sc, sc.target, "--mark", "good") == 1
    err = capsys.readouterr().err
    assert "is the live target of source 's1'" in err
    link = tmp_path / "link.img"
    link.symlink_to(sc.target)
    assert _restore(sc, link, "--seq", "2") == 1
    assert "live target" in capsys.readouterr().err
    assert sc.target.read_bytes() == before
    other = tmp_path / "other.img"
    other.write_bytes(b"keep me")
    assert _restore(sc, other, "--seq", "2") == 1
    assert "exists already" in capsys.readouterr().err
    assert other.read_bytes() == b"keep me"


@pytest.mark.parametrize(("args", "message"), [
    (("--mark", "nope"), "no mark 'nope' in the history (the oldest point available is seq 0"),
    (("--at", "2001-01-01T00:00:00"), "time 2001-01-01T00:00:00+00:00 is before the history: the oldest point"),
    (("--at", "yesterday"), "neither ISO 8601 nor seconds since the epoch"),
    (("--seq", "99"), "seq 99 is newer than anything applied (newest seq 6)"),
])
def test_bad_points_are_clear_errors_and_write_nothing(sc: Scenario, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], args: tuple[str, str],
                                                       message: str) -> None:
    assert _restore(sc, tmp_path / "out.img", *args) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.glob("out.img*")) == []


def test_unknown_source_names_the_sources(sc: Scenario, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["restore", "--state-dir", sc.state, "--source", "s9", "--seq", "2", "--to",
                     str(tmp_path / "out.img")]) == 1
    assert "no history for source 's9'" in capsys.readouterr().err
    assert not (tmp_path / "out.img").exists()


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(sc: Scenario, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    real = os.pwrite
    room = [SIZE // 2]

    def pwrite(fd: int, data: bytes, off: int) -> int:
        if off + len(data) > room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, off)

    monkeypatch.setattr(history_view.os, "pwrite", pwrite)
    assert _restore(sc, tmp_path / "out.img", "--seq", "6") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was left behind" in err
    assert list(tmp_path.glob("out.img*")) == []


def test_point_arguments_are_exclusive_and_required(sc: Scenario, tmp_path: Path) -> None:
    for extra in ([], ["--mark", "good", "--seq", "2"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["restore", "--state-dir", sc.state, "--source", "s1", *extra, "--to", str(tmp_path / "o")])
        assert e.value.code == 2


def test_progress_bar_draws_and_closes() -> None:
    with _Bar("restore s1", True) as bar:
        bar(0, 100)
        bar(100, 100)
    assert bar._p is not None and bar._p.finished
    with pytest.raises(HistoryError):
        run_restore("/nonexistent-state", "s1", "/nonexistent-state/out", seq=1)
