"""A `sync` remote that stops answering: what the host's WRITE does.

The write waits for the remote's acknowledgement up to `sync_timeout_s` (`--sync-timeout`); then the
remote is marked degraded (status `degraded: true`, a logged warning) and this write and the next ones
are acknowledged without it, with the records kept in the journal. Once the remote is back and has
caught up, it is a sync remote again (`degraded: false`). docs/REPLICATION.md describes it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from pathlib import Path

import pytest

from host_tests.linkkit import FaultProxy, wait_until
from host_tests.test_replicator_e2e import BS, FAST, Rig, random_writes

SYNC_TIMEOUT_S = 2.0


def test_sync_remote_that_stops_answering_holds_then_degrades(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path, None)
    try:
        rng = random.Random(21)
        rig.start_remote()
        with FaultProxy(("127.0.0.1", rig.port)) as proxy:
            tuning = dataclasses.replace(FAST, sync_timeout_s=SYNC_TIMEOUT_S, dead_after_s=30.0)
            rep = rig.start_rep(port=proxy.port, mode="sync", tuning=tuning)
            rig.wait_streaming()
            random_writes(rig.unit, 10, rng)  # acknowledged by the remote, one by one
            link = rep.links[0]
            assert link.acked_seq == rig.journal.head_seq and not rep.status()["remotes"][0]["degraded"]

            proxy.blackhole = True  # the remote stops answering: no FIN, no RST
            done = threading.Event()

            def host_write() -> None:
                rig.unit.write(7, b"\x5a" * BS)
                done.set()

            writer = threading.Thread(target=host_write, daemon=True)
            with caplog.at_level(logging.WARNING, logger="firmware.replicator"):
                writer.start()
                # the WRITE waits for the remote (it cannot be acknowledged before sync_timeout_s)
                assert not done.wait(SYNC_TIMEOUT_S / 4)
                assert not rep.status()["remotes"][0]["degraded"]
                # then it is acknowledged without the remote, and status says so
                assert done.wait(60), "the host's write never completed"
            writer.join()
            st = rep.status()["remotes"][0]
            assert st["degraded"] is True and st["mode"] == "sync"
            assert any("sync remote unavailable" in r.getMessage() for r in caplog.records)
            assert link.acked_seq < rig.journal.head_seq  # the journal keeps what the remote lacks

            # while degraded, further writes do not wait for the silent remote
            nxt = threading.Thread(target=random_writes, args=(rig.unit, 5, rng), daemon=True)
            nxt.start()
            nxt.join(SYNC_TIMEOUT_S * 30)
            assert not nxt.is_alive()

            proxy.blackhole = False
            proxy.cut_all()  # the old connection is dead: the source reconnects and resumes
            rig.drain()
            wait_until(lambda: not rep.status()["remotes"][0]["degraded"], what="degraded to clear")
            assert rig.same()
    finally:
        rig.close()
