"""A real network partition: the remote unit runs in its own network namespace behind a veth pair,
and an nft rule in that namespace drops every packet from the source (no FIN, no RST). The source
notices by heartbeat, keeps journaling, reconnects once the rule is gone, and the remote ends equal
to the local volume with every record applied once."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_tests.linkkit import wait_until
from host_tests.test_replicator_e2e import Rig, random_writes, tls_dir  # noqa: F401

pytestmark = [pytest.mark.netns]

_REMOTE = """
import sys, logging, json
sys.path.insert(0, sys.argv[1])
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
logging.basicConfig(level=logging.WARNING)
ru = RemoteUnit(RemoteUnitConfig((sys.argv[2], 0), "r1", {"src-a": sys.argv[3]}, sys.argv[4], sys.argv[5],
                                 heartbeat_timeout_s=5))
ru.start()
print(ru.port, flush=True)
for line in sys.stdin:
    t = ru.targets["src-a"]
    print(json.dumps({"applied": t.state.applied_seq, "records": t.records_applied}), flush=True)
ru.stop()
"""


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Netns:
    def __init__(self) -> None:
        n = random.randrange(1, 250)
        self.name = f"umt{random.randrange(1 << 20):05x}"
        self.host_if, self.ns_if = f"{self.name}h", f"{self.name}n"
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"

    def up(self) -> None:
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        for cmd in (["ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
                    ["ip", "link", "set", self.ns_if, "up"], ["ip", "link", "set", "lo", "up"]):
            _run("ip", "netns", "exec", self.name, *cmd)

    def partition(self) -> None:
        rules = (f"table inet umpart {{\n"
                 f"  chain in {{ type filter hook input priority 0; policy accept; ip saddr {self.host_ip} drop; }}\n"
                 f"  chain out {{ type filter hook output priority 0; policy accept; ip daddr {self.host_ip} drop; }}\n"
                 f"}}\n")
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules.encode(), check=True,
                       capture_output=True)

    def heal(self) -> None:
        _run("ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", "umpart")

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns()
    try:
        ns.up()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        ns.down()
        err = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"network namespaces unavailable here ({err.decode(errors='replace').strip() or exc}); "
                    "the blackholing proxy test covers the same logic")
    yield ns
    ns.down()


def test_partition_by_nft_drop_rule(tmp_path: Path, tls_dir: Path, netns: Netns) -> None:  # noqa: F811
    rng = random.Random(70)
    rig = Rig(tmp_path, tls_dir)
    proc = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", _REMOTE,
                             str(Path(__file__).resolve().parents[1]), netns.ns_ip, str(rig.target), str(tls_dir),
                             str(tmp_path / "rstate")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        rig.start_rep(port=port, host=netns.ns_ip)
        rig.wait_streaming()
        random_writes(rig.unit, 40, rng)
        rig.drain()
        netns.partition()
        random_writes(rig.unit, 40, rng)
        assert rig.rep is not None
        link = rig.rep.links[0]
        wait_until(lambda: link.state.name != "STREAMING", what="partition noticed by heartbeats")
        assert link.acked_seq < rig.journal.head_seq
        netns.heal()
        rig.drain()
        assert rig.same()
        proc.stdin.write("?\n")
        proc.stdin.flush()
        counts = json.loads(proc.stdout.readline())
        assert counts["applied"] == rig.journal.head_seq
        assert counts["records"] == rig.journal.head_seq  # each record applied exactly once
    finally:
        rig.close()
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
