"""A remote unit whose power failed while it applied records (its target file holding some sectors of
records it had not synced, its state file as the cut left it) is not a consistent image until the
source sends those records again: status says so, `promote` refuses without --force, and it is
consistent and promotable again once they are applied. Real files and a real `RemoteUnit`; the cut
is the files a cut leaves (the blocks written without a sync torn per sector)."""

from __future__ import annotations

import errno
import json
import random
import time
from pathlib import Path

import pytest

from firmware.failover_serve import PromotionServers
from firmware.link import protocol as jp
from firmware.remote_unit import PromoteError, RemoteUnit
from host_tests.test_history_restore import Scenario, _remote, rec
from host_tests.test_remote_unit import BS, Source


def _power_gone(state: object, seq: int) -> None:
    raise OSError(errno.EIO, "the power failed before the sync")


def _wait_target_holds(path: Path, lba: int, data: bytes) -> None:
    deadline = time.monotonic() + 10
    while path.read_bytes()[lba * BS: lba * BS + len(data)] != data:
        assert time.monotonic() < deadline, "the records never reached the target"
        time.sleep(0.01)


def test_a_target_torn_by_a_power_cut_is_not_served_until_the_records_are_applied_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ru = _remote(tmp_path)
    ru.start()
    sc = Scenario(ru)  # records 1..6 durable: images[6] is the consistent image at seq 6
    state_file = Path(sc.state) / "s1.json"
    good = sc.images[6]
    # the power fails while records 7 and 8 are applied: they reach the target, never a sync
    t = ru.targets["s1"]
    monkeypatch.setattr(t.store, "make_durable", _power_gone)
    r7, r8 = rec(7, 100, 0x77, 16), rec(8, 0, 0x88, 64)
    sc.src.send(jp.Batch(6, (r7, r8)))
    _wait_target_holds(sc.target, 0, r8.payload)
    state_at_cut = state_file.read_bytes()
    assert json.loads(state_at_cut)["applied_seq"] == 6
    # what the disk holds after the cut: the synced image, and each sector written since then or not
    rng = random.Random(8)
    torn = bytearray(good)
    for r in (r7, r8):
        for i in range(r.count):
            if rng.random() < 0.5:
                torn[(r.lba + i) * BS:(r.lba + i + 1) * BS] = r.payload[i * BS:(i + 1) * BS]
    sc.src.close()
    ru.stop()
    monkeypatch.undo()
    sc.target.write_bytes(bytes(torn))
    state_file.write_bytes(state_at_cut)
    assert bytes(torn) != good

    ru = RemoteUnit(ru.cfg)
    ru.start()
    try:
        st = ru.targets["s1"].status()
        assert (st["consistent"], st["applied_seq"], st["reapplying_until"]) == (False, 6, 8)
        with PromotionServers(ru) as servers:
            with pytest.raises(PromoteError, match=r"torn writes of the records after seq 6 \(up to seq 8\).*--force"):
                servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
            assert ru.targets["s1"].roles.state.primary is False
            # the source comes back and sends the records after the durable position again
            src = Source(ru.port)
            assert isinstance(src.reply, jp.HelloReply) and src.reply.applied_seq == 6
            src.send(jp.Batch(6, (r7, r8)))
            src.ack_upto(8)
            src.close()
            deadline = time.monotonic() + 10
            while ru.targets["s1"].active is not None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            st = ru.targets["s1"].status()
            assert (st["consistent"], st["applied_seq"], st["reapplying_until"]) == (True, 8, None)
            want = bytearray(good)
            for r in (r7, r8):
                want[r.lba * BS:(r.lba + r.count) * BS] = r.payload
            assert sc.target.read_bytes()[: len(want)] == bytes(want)
            res = servers.promote({"source": "s1", "usbip": "127.0.0.1:0"})
            assert res["fork_seq"] == 8 and "torn" not in res["warning"]
    finally:
        ru.stop()
    # a clean stop after that leaves a state file the next start takes as consistent
    assert json.loads(state_file.read_text())["write_limit"] <= json.loads(state_file.read_text())["applied_seq"]


def test_force_promotes_a_torn_target_as_it_is_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ru = _remote(tmp_path)
    ru.start()
    sc = Scenario(ru)
    state_file = Path(sc.state) / "s1.json"
    monkeypatch.setattr(ru.targets["s1"].store, "make_durable", _power_gone)
    r7 = rec(7, 0, 0x77, 8)
    sc.src.send(jp.Batch(6, (r7,)))
    _wait_target_holds(sc.target, 0, r7.payload)
    state_at_cut = state_file.read_bytes()
    sc.src.close()
    ru.stop()
    monkeypatch.undo()
    state_file.write_bytes(state_at_cut)
    ru = RemoteUnit(ru.cfg)
    ru.start()
    try:
        with PromotionServers(ru) as servers:
            res = servers.promote({"source": "s1", "usbip": "127.0.0.1:0", "force": True})
        assert res["fork_seq"] == 6 and "may hold torn writes of the records after seq 6" in res["warning"]
        assert ru.targets["s1"].roles.state.promotion["torn_after_seq"] == 6
    finally:
        ru.stop()
