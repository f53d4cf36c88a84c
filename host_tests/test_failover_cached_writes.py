"""The old primary comes back with the write cache on: writes its host was answered after the
promotion, still only in the journal's unsynced tail, are writes after the promotion (a split
brain), not nothing. Found by the failover episodes of `make torture` (seed 5): the unit became a
replica, then made those records durable while it pulled the promoted copy, and the next
connection found a split brain the failback could not get past."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from firmware.failover.state import open_roles
from firmware.journal import Journal
from firmware.journal.format import RING_OFFSET
from firmware.journal.sim import CrashMode, SimulatedFlash, SimulatedVolume
from firmware.link import protocol as jp
from firmware.local_roles import LocalRoles
from firmware.local_unit import LocalUnit

BS = 512
UNIT = uuid.UUID("70270e00-0000-4000-8000-000000000005")


@dataclass
class _Spec:
    name: str = "dr1"
    label: str = "dr1"


@dataclass
class _Link:
    acked_seq: int = 0
    remote_name: str = "dr1"
    spec: _Spec = field(default_factory=_Spec)


def test_cached_writes_after_the_promotion_are_a_split_brain(tmp_path: Path) -> None:
    journal = Journal.open(None, size=None, unit_uuid=uuid.uuid4(), block_size=BS,
                           flash=SimulatedFlash(RING_OFFSET + 96 * 1024))
    unit = LocalUnit(SimulatedVolume(SimulatedFlash(64 * BS), block_size=BS), journal, write_cache=True,
                     bitmap_flash=SimulatedFlash(8192), region_blocks=8, background_flush=False)
    with open_roles(tmp_path, "s1", primary=True) as roles:
        local = LocalRoles(roles, unit, journal)
        unit.write(0, b"a" * BS)
        unit.flush()  # reached the remote before it was promoted
        shipped = journal.durable_seq
        peer = roles.state.history.promote(gen_id=0x77, now_ns=time.time_ns(), fork_seq=shipped)
        unit.write(1, b"b" * BS)  # answered (cache on), after the promotion, never flushed
        local.on_remote_primary(_Link(acked_seq=shipped), jp.Generations(peer.as_tuples(), jp.GenerationsFlag.PRIMARY),
                                "remote dr1 is primary")
        assert roles.state.split_brain is not None, local.last_message
        assert roles.state.primary and unit.write_refusal is None  # the host keeps its disk
        assert roles.state.split_brain.own_bytes >= BS


def _unit(jflash: SimulatedFlash, vflash: SimulatedFlash, bflash: SimulatedFlash) -> tuple[Journal, LocalUnit]:
    journal = Journal.open(None, size=None, unit_uuid=UNIT, block_size=BS, flash=jflash)
    unit = LocalUnit(SimulatedVolume(vflash, block_size=BS), journal, write_cache=False, bitmap_flash=bflash,
                     region_blocks=8, background_flush=False)
    return journal, unit


def test_blocks_installed_by_a_failback_are_not_replayed_over_after_a_restart() -> None:
    # the failback's pull writes the promoted copy's blocks straight to the volume; a restart
    # right after it must not re-apply older journal records over them (found by make torture:
    # seed 1121756141, a kill after a failback brought back the old primary's lost writes)
    rng = random.Random(1)
    jflash, vflash, bflash = SimulatedFlash(RING_OFFSET + 96 * 1024), SimulatedFlash(64 * BS), SimulatedFlash(8192)
    _, unit = _unit(jflash, vflash, bflash)
    for i in range(4):
        unit.write(i, bytes([0x10 + i]) * BS)  # journaled; the old primary's lost writes
    unit.refuse_writes("a replica")
    promoted = [bytes([0xA0 + i]) * BS for i in range(4)]
    for i, data in enumerate(promoted):
        unit.install(i, data)
    unit.install_done()
    assert unit.read(0, 4) == b"".join(promoted)
    # killed now: the devices keep every write, the process's memory is gone
    _, again = _unit(jflash.rebooted(rng, CrashMode.KEEP), vflash.rebooted(rng, CrashMode.KEEP),
                     bflash.rebooted(rng, CrashMode.KEEP))
    assert again.read(0, 4) == b"".join(promoted)
