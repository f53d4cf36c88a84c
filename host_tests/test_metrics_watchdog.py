"""Operator interfaces of running units: `--metrics HOST:PORT` serves Prometheus text built from the
status (scraped and parsed under a small load), and the systemd notify protocol (READY, STATUS,
WATCHDOG on a fake NOTIFY_SOCKET), with WATCHDOG withheld while a command is wedged."""

from __future__ import annotations

import random
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from firmware.config import UsageError, metrics_listen
from firmware.logical_unit import CommandPlan, CommandResult, Status
from firmware.metrics import StatusCollector
from firmware.monitor import CommandMonitor
from firmware.watchdog import LinkProgress, Watchdog, command_probe
from host_tests.linkkit import wait_until
from host_tests.test_cli_units import attach, write_random
from host_tests.units import Units, drained, free_port, streaming


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u


class NotifySocket:
    """What systemd listens on: a unix datagram socket; collects every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        """Every message queued so far (never waits: a sender faster than any wait would keep it here)."""
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_for(self, pred: object, what: str, start: int = 0) -> int:
        """Index of the first message from `start` on for which pred(message) holds."""
        found: list[int] = []

        def seen() -> bool:
            msgs = self.drain()
            for i in range(start, len(msgs)):
                if pred(msgs[i]):  # type: ignore[operator]
                    found.append(i)
                    return True
            return False

        wait_until(seen, what=what, timeout=60)
        return found[0]

    def close(self) -> None:
        self.sock.close()


def scrape(addr: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=20) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    vals = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(vals) == 1, f"{name}{labels}: {vals} (have {sorted(samples)})"
    return vals[0]


def test_metrics_and_notify_of_running_units(units: Units, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = units.pair("dr1", ["server1"])
    lsock, rsock = NotifySocket(tmp_path / "local.notify"), NotifySocket(tmp_path / "remote.notify")
    try:
        rmetrics, lmetrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        monkeypatch.setenv("NOTIFY_SOCKET", str(rsock.path))
        remote = units.start_remote("dr1", targets={"server1": tmp_path / "target.img"}, tls_dir=tls,
                                    extra=["--metrics", rmetrics])
        monkeypatch.setenv("NOTIFY_SOCKET", str(lsock.path))
        local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                                  remotes=[remote.address], extra=["--metrics", lmetrics])
        local.wait_status(streaming(), what="the link to the remote")
        for ns in (lsock, rsock):
            ready = ns.wait_for(lambda m: m.startswith("READY=1"), what="READY=1")
            ns.wait_for(lambda m: m.startswith("WATCHDOG=1\nSTATUS="), what="a watchdog ping", start=ready)
        # the STATUS line of a ping names the remote and its state (a ping after the link streams)
        lsock.wait_for(lambda m: m.startswith("WATCHDOG=1") and "dr1 streaming" in m, what="the link in STATUS")

        rng = random.Random(3)
        load_done = threading.Event()
        scrapes: list[dict[str, list[tuple[dict[str, str], float]]]] = []

        def scraper() -> None:
            while not load_done.is_set():
                scrapes.append(scrape(lmetrics))

        th = threading.Thread(target=scraper)
        th.start()
        try:
            with attach(local) as c:
                written = write_random(c, rng, 80)
        finally:
            load_done.set()
            th.join(timeout=60)
        assert not th.is_alive(), "a scrape never returned"
        assert scrapes, "no scrape completed during the load"
        local.wait_status(drained, what="the remote to acknowledge every record", timeout=120)
        m = scrape(lmetrics)
        assert one(m, "usbmirror_up") == 1
        assert one(m, "usbmirror_remote_link_up", remote="dr1") == 1
        assert one(m, "usbmirror_remote_link_state", remote="dr1", state="streaming") == 1
        assert one(m, "usbmirror_remote_lag_bytes", remote="dr1") == 0
        assert one(m, "usbmirror_remote_lag_records", remote="dr1") == 0
        assert one(m, "usbmirror_remote_acked_bytes_total", remote="dr1") >= len(written) * 512
        cap = one(m, "usbmirror_journal_capacity_bytes")
        assert 0 < one(m, "usbmirror_journal_used_bytes") <= cap
        assert one(m, "usbmirror_overflow") == 0
        writes = one(m, "usbmirror_scsi_commands_total", opcode="WRITE_10")
        assert writes >= 80
        assert one(m, "usbmirror_scsi_command_duration_seconds_count", opcode="WRITE_10") == writes
        assert one(m, "usbmirror_scsi_command_duration_seconds_bucket", opcode="WRITE_10", le="+Inf") == writes
        assert one(m, "usbmirror_scsi_command_duration_seconds_sum", opcode="WRITE_10") > 0
        assert one(m, "usbmirror_warnings") == 0

        r = scrape(rmetrics)
        assert one(r, "usbmirror_source_connected", source="server1") == 1
        assert one(r, "usbmirror_source_applied_records_total", source="server1") >= 80
        assert one(r, "usbmirror_refused_connections_total") == 0
        assert one(r, "usbmirror_source_consistent", source="server1") == 1
        assert one(r, "usbmirror_history_age_seconds", source="server1") == 86400  # --history-age default
        assert one(r, "usbmirror_history_size_cap_bytes", source="server1") == 1 << 30
        assert one(r, "usbmirror_history_covers_seconds", source="server1") >= 0
        assert local.stop() == 0 and remote.stop() == 0, units.describe()
        assert any(msg.startswith("STOPPING=1") for msg in lsock.drain())
    finally:
        lsock.close()
        rsock.close()


class BlockingUnit:
    """A logical unit whose WRITE(10) blocks until released: a wedged command loop."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def plan(self, cdb: bytes) -> CommandPlan:
        raise NotImplementedError

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        if cdb[0] == 0x2A:
            self.entered.set()
            self.release.wait(60)
        return CommandResult(Status.GOOD)


def test_watchdog_pings_stop_while_a_command_is_wedged(tmp_path: Path) -> None:
    ns = NotifySocket(tmp_path / "notify")
    lu = BlockingUnit()
    mon = CommandMonitor(lu)  # type: ignore[arg-type]
    env = {"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "200000"}
    try:
        with Watchdog({"commands": command_probe(mon, deadline_s=0.5)}, environ=env) as wd:
            assert wd.watchdog_s == 0.2
            wd.ready("serving")
            first = ns.wait_for(lambda m: m.startswith("WATCHDOG=1"), what="a ping")
            mon.execute(bytes([0x00] + [0] * 5))  # a quick command changes nothing
            worker = threading.Thread(target=mon.execute, args=(bytes([0x2A] + [0] * 9),))
            worker.start()
            assert lu.entered.wait(10)
            stalled = ns.wait_for(lambda m: m.startswith("STATUS=stalled: commands: command WRITE_10 running"),
                                  what="the stall reported", start=first)
            # while it is stuck, no WATCHDOG=1 is sent (several ticks go by)
            after = ns.wait_for(lambda m: m.startswith("STATUS=stalled"), what="a later tick", start=stalled + 3)
            assert not [m for m in ns.messages[stalled:after + 1] if m.startswith("WATCHDOG=1")]
            lu.release.set()
            worker.join(10)
            assert not worker.is_alive()
            ns.wait_for(lambda m: m.startswith("WATCHDOG=1"), what="pings to resume", start=after)
            assert mon.latency()["WRITE_10"][0][-1] + sum(mon.latency()["WRITE_10"][0][:-1]) == 1
    finally:
        lu.release.set()  # never leave the worker blocked, whatever failed
        ns.close()


def test_watchdog_without_systemd_does_nothing() -> None:
    wd = Watchdog({"x": lambda: "stuck"}, environ={})
    with wd:
        wd.ready("serving")
    assert not wd.enabled and wd.pings == 0


def test_link_progress_flags_only_a_streaming_link_that_stops_acknowledging() -> None:
    lp = LinkProgress(deadline_s=10)
    r = {"address": "a:1", "state": "streaming", "lag_records": 5, "acked_seq": 10}
    assert lp.check(0.0, [r]) is None
    assert lp.check(9.0, [r]) is None
    assert lp.check(11.0, [dict(r, acked_seq=11)]) is None  # progress
    reason = lp.check(22.0, [dict(r, acked_seq=11)])
    assert reason is not None and "a:1" in reason and "5 records wait" in reason
    assert lp.check(40.0, [dict(r, lag_records=0, acked_seq=11)]) is None  # caught up: idle is fine
    assert lp.check(80.0, [dict(r, state="disconnected")]) is None  # reconnecting is its own loop


def test_collector_survives_a_failing_status_and_parses_listen() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("x")

    fams = list(StatusCollector(broken).collect())
    assert [(f.name, f.samples[0].value) for f in fams] == [("usbmirror_up", 0.0)]
    assert metrics_listen("127.0.0.1:9373") == ("127.0.0.1", 9373)
    assert metrics_listen(":9373") == ("0.0.0.0", 9373)
    assert metrics_listen(None) is None
    with pytest.raises(UsageError, match="HOST:PORT"):
        metrics_listen("9373x")


def test_a_wedged_unit_stops_its_pings_and_a_supervisor_restarts_it(units: Units, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What systemd does with WatchdogSec=, played by the test: a unit frozen on purpose (SIGSTOP) sends
    no WATCHDOG=1; once a watchdog period passes without one it is killed and started again, is READY
    again, and every write acknowledged before the wedge is there."""
    import signal
    import time

    ns = NotifySocket(tmp_path / "local.notify")
    try:
        watchdog_s = 2.0
        monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
        monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog_s * 1e6)))
        local = units.start_local(volume=tmp_path / "volume.img", size="16M")
        ready = ns.wait_for(lambda m: m.startswith("READY=1"), what="READY=1")
        ns.wait_for(lambda m: m.startswith("WATCHDOG=1"), what="a watchdog ping", start=ready)
        with attach(local) as c:
            written = write_random(c, random.Random(5), 20)
        local.signal(signal.SIGSTOP)  # the wedge: nothing of the unit runs any more
        seen = len(ns.drain())
        last_ping = time.monotonic()
        deadline = last_ping + 60
        while time.monotonic() < deadline:  # the supervisor: a ping within every watchdog period, or else
            new = ns.drain()[seen:]
            seen += len(new)
            if any(m.startswith("WATCHDOG=1") for m in new):
                last_ping = time.monotonic()
            if time.monotonic() - last_ping > watchdog_s:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the frozen unit went on pinging the watchdog")
        local.kill9()
        killed_at = len(ns.drain())
        local.launch()
        again = ns.wait_for(lambda m: m.startswith("READY=1"), what="READY=1 after the restart", start=killed_at)
        ns.wait_for(lambda m: m.startswith("WATCHDOG=1"), what="pings after the restart", start=again)
        local.wait_ready()
        with attach(local) as c:
            for lba, data in written.items():
                assert c.read10(lba, 1) == data, f"acknowledged block {lba} lost across the restart"
        assert local.stop() == 0, units.describe()
    finally:
        ns.close()
