"""The share of `make torture` run with real processes and real files.

A round starts a real `usbmirror local` / `usbmirror remote` pair (`host_tests.units`: each unit a
`python -m firmware.cli` process, TLS from `usbmirror pair`) on tmp files, writes to the local unit
over USB/IP (WRITE(10) of random data, now and then SYNCHRONIZE CACHE) and, at random moments,
kill -9s either unit and starts it again on the same files. It checks against a model of the host's
writes, as the in-process campaign does:

- after the local unit's restart its disk (read back over USB/IP) is the host's disk after a prefix
  of the writes that holds every acknowledged one (`lost` otherwise);
- a remote killed at a random moment holds, in its target file, the host's disk after some prefix of
  the writes, never older than it was seen at, unless its state file says a resync is open
  (`prefix_violations`);
- at the end of the round, once the pair has drained, the target file equals the local volume and
  the model (`wedges` when the pair does not drain within its deadline).

Some rounds also fail over: the local unit is killed, the remote promoted (`usbmirror promote`, the
standby host writes on the promoted copy over USB/IP), the old local unit comes back as a replica,
`usbmirror failback` returns the role, and then the local volume, the target and the model (the
promoted image plus the standby host's writes) must be one image, and a write through the local
unit must reach the remote again.

The content of round `n` of a campaign depends only on the seed and `n`; how many rounds run depends on
the time (see `host_tests.torture`). Nothing here is used by the firmware.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from host_tests.units import Status, UnitError, UnitProcess, Units, drained, free_port, streaming, usbmirror
from host_tests.usbip_support import UsbipClient

if TYPE_CHECKING:
    from host_tests.torture import Counts, HostModel

BS = 512
SIZE = "1M"
NBLOCKS = (1 << 20) // BS
OPS = 24  # host operations per round
DEADLINE_S = 120.0  # a pair that has not drained, promoted or failed back by then is wedged


class RealViolation(Exception):
    """A property of the model does not hold for the real pair."""


def attach(unit: UnitProcess) -> UsbipClient:
    c = UsbipClient("127.0.0.1", unit.port)
    if c.import_device("1-1").device is None:
        c.close()
        raise UnitError(f"the unit on {unit.address} refused to export busid 1-1")
    c.enumerate()
    c.until_ready()
    return c


def read_disk(c: UsbipClient) -> bytes:
    out = bytearray()
    for lba in range(0, NBLOCKS, 128):
        out += c.read10(lba, 128)
    return bytes(out)


def read_file(path: Path) -> bytes:
    data = path.read_bytes() if path.exists() else b""
    return (data + bytes(NBLOCKS * BS))[: NBLOCKS * BS]


class RealRound:
    def __init__(self, work: Path, rng: random.Random, counts: Counts, model_cls: type[HostModel]) -> None:
        self.work = work
        self.rng = rng
        self.c = counts
        self.model = model_cls(NBLOCKS)
        self.remote_k = 0
        self.units = Units(work)
        self.volume = work / "volume.img"
        self.target = work / "target.img"

    def wait(self, unit: UnitProcess, pred: Callable[[Status], bool], what: str) -> Status:
        try:
            return unit.wait_status(pred, timeout=DEADLINE_S, what=what)
        except UnitError as exc:
            self.c.wedges += 1
            raise RealViolation(f"{what} did not happen within {DEADLINE_S:g} s: {str(exc)[:400]}") from None

    def start(self) -> None:
        self.tls = self.units.pair("dr1", ["server1"])
        self.remote = self.units.start_remote("dr1", targets={"server1": self.target}, tls_dir=self.tls)
        self.local = self.units.start_local(volume=self.volume, size=SIZE, source_id="server1", tls_dir=self.tls,
                                            remotes=[self.remote.address], journal_size="4M")
        self.wait(self.local, streaming(), "the link to the remote")

    def restart_local(self) -> None:
        self.local.launch()
        self.local.wait_ready()

    def restart_remote(self) -> None:
        self.remote.launch()
        self.remote.wait_ready()

    # -- checks ------------------------------------------------------------------------------------
    def check_local(self, disk: bytes) -> None:
        m = self.model
        k = m.find(disk, m.durable_idx)
        if k is None:
            older = m.find(disk, 0)
            if older is not None:
                self.c.lost += 1
                raise RealViolation(f"after kill -9 the local disk is the host's after write {older}, but writes up "
                                    f"to {m.durable_idx} were acknowledged")
            self.c.prefix_violations += 1
            raise RealViolation("after kill -9 the local disk is no prefix of the host's writes")
        m.truncate(k)

    def check_target(self) -> None:
        """The remote is stopped: its target file is a prefix image, or its state says a resync is open."""
        state_file = self.remote.state_dir / "server1.json"
        if state_file.exists() and json.loads(state_file.read_text()).get("resync_active"):
            return
        k = self.model.find(read_file(self.target), self.remote_k)
        if k is None:
            self.c.prefix_violations += 1
            raise RealViolation(f"the killed remote's target is no image of the host's writes from write "
                                f"{self.remote_k} on")
        self.remote_k = k

    # -- the round ---------------------------------------------------------------------------------
    def host_ops(self, ops: int) -> None:
        c = attach(self.local)
        try:
            for _ in range(ops):
                r = self.rng.random()
                if r < 0.75:
                    n = self.rng.randint(1, 16)
                    lba = self.rng.randrange(NBLOCKS - n + 1)
                    data = self.rng.randbytes(n * BS)
                    idx = self.model.add(lba, data)
                    if c.write10(lba, data) != 0:
                        raise RealViolation(f"WRITE(10) lba={lba} blocks={n} failed")
                    self.c.acked += 1
                    self.model.durable_idx = idx  # an acknowledged WRITE survives a kill (the page cache does)
                elif r < 0.80:
                    c.scsi(bytes([0x35]) + bytes(9))  # SYNCHRONIZE CACHE(10)
                elif r < 0.90:
                    c.close()
                    self.c.kills += 1
                    self.local.kill9()
                    self.restart_local()
                    c = attach(self.local)
                    self.check_local(read_disk(c))
                else:
                    self.c.kills += 1
                    self.remote.kill9()
                    self.check_target()
                    self.restart_remote()
        finally:
            c.close()

    def drain_and_compare(self) -> None:
        self.wait(self.local, drained, "the remote to acknowledge every record")
        self.wait(self.remote, lambda s: bool(s["sources"]) and s["sources"][0].get("consistent") is True,
                  "the remote to be consistent")
        want = self.model.disk_at(self.model.issued)
        c = attach(self.local)
        try:
            local = read_disk(c)
        finally:
            c.close()
        if local != want:
            self.c.lost += 1
            raise RealViolation("the local disk differs from the host's writes")
        if read_file(self.target) != want:
            self.c.prefix_violations += 1
            raise RealViolation("drained, yet the remote's target differs from the host's writes")

    def fail_over_and_back(self) -> None:
        """Promote the remote, write on it, bring the old local unit back as a replica, fail back."""
        self.c.kills += 1
        self.local.kill9()
        self.wait(self.remote, lambda s: s["sources"][0]["state"] != "connected", "the source to be gone")
        port = free_port()
        promote = ["promote", "--state-dir", str(self.remote.state_dir), "--source", "server1", "--usbip",
                   f"127.0.0.1:{port}"]
        r = usbmirror(*promote, timeout=DEADLINE_S)
        if r.returncode != 0 and "may hold torn writes" in r.stderr:
            # the remote was killed after applying records it had not synced, and the source died before
            # sending them again: the remote cannot tell a crash from a power cut and rightly refuses.
            # A real round kills but never cuts power, so its target is whole: --force must give an image
            self.c.promotions_refused += 1
            r = usbmirror(*promote, "--force", timeout=DEADLINE_S)
        if r.returncode != 0:
            raise RealViolation(f"promote failed: {r.stderr.strip()}")
        self.c.promotions += 1
        self.c.real_promotions += 1
        # the promoted copy is the host's disk now: what it holds plus the standby host's writes
        image = read_file(self.target)
        k = self.model.find(image, self.remote_k)
        if k is None:
            self.c.prefix_violations += 1
            raise RealViolation("the promoted copy is no image of the host's writes")
        self.model.truncate(k)
        standby = UsbipClient("127.0.0.1", port)
        try:
            if standby.import_device("1-1").device is None:
                raise RealViolation("the promoted remote does not serve the copy")
            standby.enumerate()
            standby.until_ready()
            for _ in range(self.rng.randint(1, 6)):
                n = self.rng.randint(1, 16)
                lba = self.rng.randrange(NBLOCKS - n + 1)
                data = self.rng.randbytes(n * BS)
                idx = self.model.add(lba, data)
                if standby.write10(lba, data) != 0:
                    raise RealViolation("a WRITE(10) on the promoted copy failed")
                self.model.durable_idx = idx
        finally:
            standby.close()
        self.restart_local()
        self.wait(self.local, lambda s: s["host_writes"] == "refused", "the old local unit to become a replica")
        r = usbmirror("failback", "--state-dir", str(self.remote.state_dir), "--source", "server1", "--timeout",
                      str(int(DEADLINE_S)), timeout=DEADLINE_S + 60)
        if r.returncode != 0:
            self.c.wedges += 1
            raise RealViolation(f"failback failed: {r.stderr.strip()}")
        self.c.failbacks += 1
        self.c.real_failbacks += 1
        self.wait(self.local, lambda s: s["host_writes"] == "accepted", "the local unit to serve writes again")
        self.remote_k = self.model.issued
        want = self.model.disk_at(self.model.issued)
        if read_file(self.volume) != want or read_file(self.target) != want:
            self.c.prefix_violations += 1
            raise RealViolation("after failback the local volume or the target is not the promoted image plus "
                                "the standby host's writes")
        self.wait(self.local, streaming(), "replication to resume after failback")

    def run(self, *, fail_over: bool, ops: int) -> None:
        try:
            self.start()
            self.host_ops(ops)
            if fail_over:
                self.fail_over_and_back()
                self.host_ops(max(1, ops // 3))
            self.drain_and_compare()
        except UnitError as exc:
            self.c.wedges += 1
            raise RealViolation(f"a unit did not answer: {str(exc)[:600]}") from None
        finally:
            self.units.close()


def real_round(seed: int, n: int, counts: Counts, model_cls: type[HostModel], *, fail_over: bool | None = None,
               ops: int = OPS) -> None:
    """Round `n` of the campaign `seed` (`fail_over`: None, as the seed decides); raises RealViolation
    with the tail of the units' logs on a failure."""
    rng = random.Random(f"{seed}/real/{n}")
    decide = rng.random() < 0.5
    with tempfile.TemporaryDirectory(prefix="usbmirror-torture-") as tmp:
        rnd = RealRound(Path(tmp), rng, counts, model_cls)
        t0 = time.monotonic()
        try:
            rnd.run(fail_over=decide if fail_over is None else fail_over, ops=ops)
        except RealViolation as exc:
            raise RealViolation(f"real round {n} (after {time.monotonic() - t0:.0f} s): {exc}\n"
                                f"{rnd.units.describe()[-3000:]}") from None
        counts.real_rounds += 1
