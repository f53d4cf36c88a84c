"""Image views: a source's disk as it was at a restore point, read while the remote keeps applying.

A view of point P reads block L from the first before-image of L saved after P, else from the
target. The target keeps changing underneath, so a read from the target is checked afterwards:
the writer makes a before-image durable in the history *before* it overwrites the target, so if
the target read saw a newer block, the history holds that block's before-image by the time the
read returns; the view takes in the records appended meanwhile and answers from them. Trimming
never removes what an open view needs (the view pins its start, see `store.HistoryReader.pin`).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from firmware.atomic import fsync_dir
from firmware.history.format import HistoryError
from firmware.history.index import Index
from firmware.history.store import HistoryReader


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where a view starts: the image just after journal record `seq`."""

    seq: int
    start_id: int
    what: str  # for messages: "mark 'before-upgrade' (seq 41)"


def parse_time(text: str) -> float:
    """ISO 8601 (a time without a zone is UTC) or seconds since the epoch, as epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HistoryError(f"time {text!r} is neither ISO 8601 nor seconds since the epoch") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()


def _fmt_time(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")


def describe_oldest(idx: Index) -> str:
    oldest = idx.oldest_restorable()
    if oldest is None:
        return "no point can be restored while the resync that is running has not finished"
    t = idx.oldest_time_ns()
    when = f" ({_fmt_time(t / 1e9)})" if t else ""
    return f"the oldest point available is seq {oldest}{when}"


def resolve(idx: Index, *, mark: str | None = None, at: str | float | None = None,
            seq: int | None = None) -> Resolved:
    """The view start for `--mark NAME`, `--at TIME` or `--seq N`; HistoryError says what is wrong."""
    if sum(x is not None for x in (mark, at, seq)) != 1:
        raise HistoryError("give exactly one of --mark, --at and --seq")
    if mark is not None:
        hits = [p for p in idx.live_points() if p.name == mark and p.kind.name == "MARK"]
        if not hits:
            known = sorted({p.name for p in idx.live_points() if p.kind.name == "MARK"})
            raise HistoryError(f"no mark {mark!r} in the history ({describe_oldest(idx)}; marks: "
                               f"{', '.join(known) if known else 'none'})")
        s = hits[-1].seq
        what = f"mark {mark!r} (seq {s})"
    elif at is not None:
        t = parse_time(at) if isinstance(at, str) else float(at)
        t_ns = int(t * 1e9)
        oldest_t = idx.oldest_time_ns()
        if oldest_t is None or t_ns < oldest_t:
            raise HistoryError(f"time {_fmt_time(t)} is before the history: {describe_oldest(idx)}")
        s = idx.seq_at_time(t_ns)
        what = f"time {_fmt_time(t)} (seq {s})"
    else:
        assert seq is not None
        s = seq
        what = f"seq {s}"
    oldest = idx.oldest_restorable()
    if oldest is None or s < oldest:
        raise HistoryError(f"{what} is not in the history: {describe_oldest(idx)}")
    if s > idx.last_seq:
        raise HistoryError(f"{what} is newer than anything applied (newest seq {idx.last_seq})")
    w = idx.in_window(s)
    if w is not None:
        raise HistoryError(f"{what} lies inside a resync (after seq {w.begin_seq}"
                           f"{'' if w.end_seq is None else f', before seq {w.end_seq}'}): the target never "
                           "held that image")
    return Resolved(s, idx.start_id_after_seq(s), what)


class ImageView:
    """Read-only block access to the image of one point, stable while the target changes."""

    def __init__(self, reader: HistoryReader, start_id: int, *, target: str | None = None) -> None:
        self.reader = reader
        self.start_id = start_id
        self.block_size = reader.meta.block_size
        self.num_blocks = reader.meta.num_blocks
        self._lock = threading.Lock()
        self._pin = reader.pin(start_id)
        path = target or reader.meta.target
        try:
            self._tfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            HistoryReader.unpin(self._pin)
            raise HistoryError(f"cannot open the target {path}: {exc.strerror}") from None

    def _target(self, lba: int, count: int) -> bytes:
        bs = self.block_size
        data = os.pread(self._tfd, count * bs, lba * bs)
        if len(data) < count * bs:  # a sparse image file shorter than the volume reads as zeros
            data += bytes(count * bs - len(data))
        return data

    def read(self, lba: int, count: int) -> bytes:
        if lba < 0 or count < 0 or lba + count > self.num_blocks:
            raise ValueError(f"blocks {lba}+{count} outside the image of {self.num_blocks}")
        bs = self.block_size
        with self._lock:
            idx = self.reader.index
            out = bytearray(count * bs)
            pending: list[tuple[int, int]] = []
            for a, n, rid in idx.runs(self.start_id, lba, count):
                if rid is None:
                    pending.append((a, n))
                else:
                    out[(a - lba) * bs:(a - lba + n) * bs] = self.reader.read_payload(rid, a, n)
            if not pending:
                return bytes(out)
            for a, n in pending:
                out[(a - lba) * bs:(a - lba + n) * bs] = self._target(a, n)
            self.reader.refresh()  # before-images saved while we read the target win
            for a0, n0 in pending:
                for a, n, rid in idx.runs(self.start_id, a0, n0):
                    if rid is not None:
                        out[(a - lba) * bs:(a - lba + n) * bs] = self.reader.read_payload(rid, a, n)
            return bytes(out)

    def close(self) -> None:
        if self._tfd >= 0:
            os.close(self._tfd)
            self._tfd = -1
            HistoryReader.unpin(self._pin)

    def __enter__(self) -> ImageView:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


RESTORE_CHUNK = 1 << 20


def restore(view: ImageView, to: str | os.PathLike[str], *,
            progress: Callable[[int, int], None] | None = None, chunk_bytes: int = RESTORE_CHUNK) -> int:
    """Copy the view to `to` (a new file, or a block device at least as large); returns bytes written.

    A file is written as `<to>.partial` and renamed when complete and synced: a failure (a full
    disk, say) removes the partial file and leaves nothing changed."""
    dest = Path(to)
    total = view.num_blocks * view.block_size
    is_dev = dest.exists() and dest.is_block_device()
    if dest.exists() and not is_dev:
        raise HistoryError(f"{dest} exists already: restore writes a new file (or a block device)")
    tmp = dest if is_dev else dest.with_name(dest.name + ".partial")
    try:
        fd = os.open(tmp, (os.O_WRONLY if is_dev else os.O_WRONLY | os.O_CREAT | os.O_EXCL) | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise HistoryError(f"cannot create {tmp}: {exc.strerror}") from None
    done = 0
    try:
        if is_dev and os.lseek(fd, 0, os.SEEK_END) < total:
            raise HistoryError(f"{dest} holds fewer than the image's {total} bytes")
        step = max(1, chunk_bytes // view.block_size)
        zero = bytes(step * view.block_size)
        lba = 0
        while lba < view.num_blocks:
            n = min(step, view.num_blocks - lba)
            data = view.read(lba, n)
            if is_dev or data != zero[:len(data)]:
                at = 0
                while at < len(data):
                    at += os.pwrite(fd, data[at:], lba * view.block_size + at)
            lba += n
            done += len(data)
            if progress is not None:
                progress(done, total)
        if not is_dev:
            os.ftruncate(fd, total)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        if not is_dev:
            tmp.unlink(missing_ok=True)
        raise HistoryError(f"writing {dest} failed after {done} of {total} bytes: {exc.strerror}"
                           + ("" if is_dev else "; nothing was left behind")) from None
    except BaseException:
        os.close(fd)
        if not is_dev:
            tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if not is_dev:
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    return done
