"""kill -9 of a process running a LocalUnit on real files while it writes; the restarted unit holds
every write that was acknowledged (the journal's recovery and replay on real files, in a real
process). A kill keeps the page cache, so this complements, not replaces, the power-cut tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.volume import Volume

UNIT = uuid.UUID("c0ffee00-0000-4000-8000-0000000000c1")
BS = 512
NBLOCKS = 4096

WRITER = textwrap.dedent("""
    import sys, uuid
    sys.path.insert(0, {root!r})
    from firmware.journal import Journal
    from firmware.local_unit import LocalUnit
    from firmware.volume import Volume
    d = {d!r}
    unit = uuid.UUID({unit!r})
    with Volume(d + "/vol", size={size}, block_size=512) as v, \\
            Journal.open(d + "/journal", size=256 * 1024, unit_uuid=unit, block_size=512) as j, \\
            LocalUnit(v, j, bitmap_path=d + "/dirty", write_cache={wc}) as lu:
        i = 0
        while True:
            i += 1
            lba = (i * 8) % {nblocks}
            lu.write(lba, i.to_bytes(4, "little") * (8 * 512 // 4))
            if {wc} and i % 5 == 0:
                lu.flush()
                print("durable", i, flush=True)
            elif not {wc}:
                print("durable", i, flush=True)
""")


@pytest.mark.parametrize("write_cache", [False, True])
def test_kill_9_while_writing_loses_no_acknowledged_write(tmp_path: Path, write_cache: bool) -> None:
    root = str(Path(__file__).resolve().parents[1])
    for attempt in range(2):
        script = WRITER.format(root=root, d=str(tmp_path), unit=str(UNIT), size=NBLOCKS * BS,
                               nblocks=NBLOCKS, wc=write_cache)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        last = 0
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                last = int(line.split()[1])
                if last >= 300 + attempt * 50:
                    break
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert last > 0, "writer produced nothing"
        with Volume(tmp_path / "vol", size=NBLOCKS * BS, block_size=BS) as v, \
                Journal.open(tmp_path / "journal", size=None, unit_uuid=UNIT, block_size=BS) as j, \
                LocalUnit(v, j, bitmap_path=str(tmp_path / "dirty")) as lu:
            # the newest acknowledged write of every slot it wrote must be there (later ones may be too)
            newest: dict[int, int] = {}
            for i in range(1, last + 1):
                newest[(i * 8) % NBLOCKS] = i
            for lba, i in newest.items():
                got = int.from_bytes(lu.read(lba, 1)[:4], "little")
                assert got >= i, f"write {i} at lba {lba} was acknowledged but is gone (found {got})"
