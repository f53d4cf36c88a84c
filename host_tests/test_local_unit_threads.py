"""LocalUnit under concurrency: host writers, a reader, a consumer that reads and confirms records
(like the replicator), the background volume flusher and overflow, all at once on real files.

Each writer owns its blocks and writes increasing counters into them; a reader checks it never sees
a block go back in time once its write was acknowledged; the consumer checks records arrive in seq
order without gaps. At the end, and after a restart, every block holds its last acknowledged value.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from firmware.journal import Journal, RecordKind
from firmware.local_unit import LocalUnit, ThrottlePolicy
from firmware.volume import Volume

UNIT = uuid.UUID("7e57c0de-0000-4000-8000-0000000000a7")
BS = 512
WRITERS = 3
SLOTS = 16  # blocks per writer
ROUNDS = 150


def _val(lu: LocalUnit, lba: int) -> int:
    return int.from_bytes(lu.read(lba, 1)[:8], "little")


def test_concurrent_writers_reader_consumer_and_flusher(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    acked = [[0] * SLOTS for _ in range(WRITERS)]
    done = threading.Event()
    with Volume(tmp_path / "vol", size=WRITERS * SLOTS * 8 * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=16384 + 128 * 1024, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty"), volume_sync_bytes=16 * 1024,
                      throttle=ThrottlePolicy(start_fill=0.9, max_delay_s=0.0, resume_fill=0.3)) as lu:
        j.register_consumer("remote")

        def writer(w: int) -> None:
            try:
                for n in range(1, ROUNDS + 1):
                    s = (n * 7 + w) % SLOTS
                    lba = (w * SLOTS + s) * 8
                    lu.write(lba, n.to_bytes(8, "little") * (8 * BS // 8), fua=(n % 10 == 0))
                    acked[w][s] = n
                    if w == 0 and n % 25 == 0:
                        lu.set_write_cache(n % 50 == 0)
                    if n % 17 == 0:
                        lu.flush()
            except BaseException as exc:
                errors.append(exc)

        def reader() -> None:
            try:
                while not done.is_set():
                    for w in range(WRITERS):
                        for s in range(SLOTS):
                            floor = acked[w][s]
                            got = _val(lu, (w * SLOTS + s) * 8)
                            assert got >= floor, f"block of writer {w} slot {s} went back: {got} < {floor}"
            except BaseException as exc:
                errors.append(exc)

        def consumer() -> None:
            try:
                after = j.consumers()["remote"]
                while not done.is_set() or after < j.durable_seq:
                    recs = j.read_records(after, 64 * 1024) if j.wait_for_records(after, 0.01) else []
                    for r in recs:
                        assert r.seq == after + 1
                        assert r.kind in (RecordKind.WRITE, RecordKind.UNMAP, RecordKind.FLUSH)
                        after = r.seq
                    # lag behind until the journal overflows, then catch up so journaling resumes
                    lag = 0 if lu.overflow else 30
                    j.confirm("remote", max(j.consumers()["remote"], after - lag))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        side = [threading.Thread(target=reader), threading.Thread(target=consumer)]
        for t in threads + side:
            t.start()
        for t in threads:
            t.join(timeout=120)
        done.set()
        for t in side:
            t.join(timeout=120)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads + side)
        for w in range(WRITERS):
            for s in range(SLOTS):
                assert _val(lu, (w * SLOTS + s) * 8) == acked[w][s]
        lu.flush()
    with Volume(tmp_path / "vol", size=WRITERS * SLOTS * 8 * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=None, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as lu:
        for w in range(WRITERS):
            for s in range(SLOTS):
                assert _val(lu, (w * SLOTS + s) * 8) == acked[w][s]
