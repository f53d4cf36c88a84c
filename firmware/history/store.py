"""The history's files (the I/O adapter around `format` and `index`).

A history lives in a directory, `<state-dir>/<source id>.history/`:

    meta.json            `format.Meta`, rewritten atomically (tmp + fsync + rename + fsync dir)
    seg-<16 hex>.log     records, appended; the name is the logical position of its first byte
    lock                 flock'ed by the writer while trimming and by a reader while pinning
    pins/<pid>-<n>       one per open image view (flock'ed shared while open): the position it
                         needs; the writer never trims at or past a live pin

The writer (`HistoryWriter`, in the remote unit) appends and fdatasyncs before-images before the
target is overwritten, then trims the oldest records. Readers (`HistoryReader`, the `history`,
`restore` and `expose` commands, in their own processes) scan the same files and follow new
records as they are appended: see `firmware.history.view` for why a view stays fixed while the
target changes under it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from firmware.atomic import fsync_dir, write_atomically
from firmware.history.format import (
    HEADER_SIZE,
    RESYNC_BEGIN,
    RESYNC_END,
    Encoded,
    HistoryCorrupt,
    HistoryError,
    Kind,
    Meta,
    PointKind,
    decode_header,
    encode_record,
    point_record,
    scan,
    undo_record,
)
from firmware.history.index import Index
from firmware.journal.format import RecordKind, RecordLike  # not the link: it needs lz4

log = logging.getLogger(__name__)

DEFAULT_SIZE_CAP = 1 << 30
DEFAULT_AGE_S = 24 * 3600.0
SEGMENT_BYTES = 64 << 20
VERIFY_TAIL_BYTES = 64 << 20  # payload checksums are checked this far back from the end on open
META = "meta.json"
_SEG_RE = re.compile(r"^seg-([0-9a-f]{16})\.log$")
_pin_counter = itertools.count()

_OVERLAY_SHIFT = 7  # blocks per bucket of a batch's overlay lookup (1 << 7)


def history_dir(state_dir: str | os.PathLike[str], source_id: str) -> Path:
    return Path(state_dir) / f"{source_id}.history"


def _seg_name(pos: int) -> str:
    return f"seg-{pos:016x}.log"


_libc: ctypes.CDLL | None = None


def _punch(fd: int, offset: int, length: int) -> None:
    """Free the disk blocks of a byte range (file size unchanged); a no-op where unsupported."""
    global _libc
    if length <= 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fallocate = _libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fallocate(fd, 0x02 | 0x01, offset, length)  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class _Segments:
    """The segment files of one history: positions to (file, offset)."""

    def __init__(self, root: Path, *, writable: bool) -> None:
        self.root = root
        self.writable = writable
        self.starts: list[int] = []
        self._fds: dict[int, int] = {}
        self.reload()

    def reload(self) -> None:
        starts = []
        for p in self.root.iterdir():
            m = _SEG_RE.match(p.name)
            if m:
                starts.append(int(m.group(1), 16))
        self.starts = sorted(starts)
        for s in list(self._fds):
            if s not in self.starts:
                os.close(self._fds.pop(s))

    def fd(self, start: int) -> int:
        fd = self._fds.get(start)
        if fd is None:
            flags = os.O_RDWR if self.writable else os.O_RDONLY
            fd = os.open(self.root / _seg_name(start), flags | os.O_CLOEXEC)
            self._fds[start] = fd
        return fd

    def seg_of(self, pos: int) -> int | None:
        best = None
        for s in self.starts:
            if s <= pos:
                best = s
            else:
                break
        return best

    def size(self, start: int) -> int:
        return os.fstat(self.fd(start)).st_size

    def read(self, pos: int, n: int) -> bytes:
        s = self.seg_of(pos)
        if s is None:
            raise HistoryError(f"history position {pos} is in no segment")
        out = os.pread(self.fd(s), n, pos - s)
        if len(out) != n:
            raise HistoryCorrupt(f"history record at position {pos}: short read ({len(out)} of {n} bytes)")
        return out

    def create(self, start: int) -> None:
        fd = os.open(self.root / _seg_name(start), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._fds[start] = fd
        self.starts.append(start)
        fsync_dir(self.root)

    def drop_below(self, pos: int) -> None:
        """Delete segments wholly before `pos`; free the bytes before `pos` of the one holding it."""
        keep = self.seg_of(pos)
        for s in list(self.starts):
            if keep is not None and s >= keep:
                break
            fd = self._fds.pop(s, None)
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                (self.root / _seg_name(s)).unlink()
            self.starts.remove(s)
        if keep is not None and self.writable:
            _punch(self.fd(keep), 0, (pos - keep) // 4096 * 4096)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _read_meta(root: Path) -> Meta:
    try:
        return Meta.decode((root / META).read_bytes())
    except FileNotFoundError:
        raise HistoryError(f"no history in {root}") from None


def _scan_files(segs: _Segments, idx: Index, *, verify_from: int) -> tuple[int, int] | None:
    """Add every record from `idx.head_pos` on to `idx`. Returns (segment, offset) of a torn tail
    found in the last segment (to be cut by a writer), or None when the log ends cleanly."""
    pos = idx.head_pos
    while True:
        s = segs.seg_of(pos)
        if s is None:
            return None
        fd = segs.fd(s)
        size = os.fstat(fd).st_size
        off = pos - s
        while off < size:
            head = os.pread(fd, HEADER_SIZE, off)
            h = decode_header(head)
            if h is None or off + h.length > size:
                break
            name = ""
            if h.kind is Kind.POINT or s + off + h.length > verify_from:
                body = os.pread(fd, h.payload_len, off + HEADER_SIZE)
                recs, _ = scan(head + body, s + off, verify=True)
                if not recs:
                    break
                name = recs[0].name
            idx.add(s + off, h, name)
            off += h.length
        pos = s + off
        later = [x for x in segs.starts if x > s]
        if off < size:
            if later:
                raise HistoryCorrupt(f"history segment {_seg_name(s)}: damaged record at offset {off} before "
                                     "the newest segment")
            return s, off
        if not later:
            return None
        if later[0] != pos:
            raise HistoryCorrupt(f"history segment {_seg_name(later[0])} does not start where "
                                 f"{_seg_name(s)} ends ({pos})")
        pos = later[0]


def _build(segs: _Segments, meta: Meta, *, tolerate_torn: bool) -> tuple[Index, tuple[int, int] | None]:
    idx = Index(meta.block_size, base_seq=meta.base_seq, base_time_ns=meta.base_time_ns)
    idx.start_empty_at(meta.tail_pos)
    end = segs.starts[-1] + segs.size(segs.starts[-1]) if segs.starts else 0
    torn = _scan_files(segs, idx, verify_from=max(meta.tail_pos, end - VERIFY_TAIL_BYTES))
    if torn is not None and not tolerate_torn:
        raise HistoryCorrupt(f"history: damaged record at position {torn[0] + torn[1]}")
    return idx, torn


class HistoryWriter:
    """The remote unit's side: before-images durable before the target changes, points, trimming.

    `now` gives the wall-clock time in ns (trimming by age); tests pass their own.
    """

    def __init__(self, root: Path, meta: Meta, *, size_cap: int = DEFAULT_SIZE_CAP,
                 age_s: float = DEFAULT_AGE_S, segment_bytes: int = SEGMENT_BYTES,
                 now: Callable[[], int] = time.time_ns) -> None:
        self.root = root
        self.size_cap = size_cap
        self.age_ns = int(age_s * 1e9)
        self.segment_bytes = segment_bytes
        self.now = now
        root.mkdir(parents=True, exist_ok=True)
        (root / "pins").mkdir(exist_ok=True)
        if not (root / META).exists():
            meta.created_ns = meta.created_ns or now()
            write_atomically(root / META, meta.encode())
            fsync_dir(root.parent)
        self.meta = _read_meta(root)
        if (self.meta.size_cap, self.meta.age_s) != (size_cap, age_s):
            self.meta.size_cap, self.meta.age_s = size_cap, age_s
            write_atomically(root / META, self.meta.encode())
        self._lockf = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._mu = threading.Lock()  # the index changes under the applying thread; status reads it
        self.segs = _Segments(root, writable=True)
        self.segs.drop_below(self.meta.tail_pos)
        self.index, torn = _build(self.segs, self.meta, tolerate_torn=True)
        if torn is not None:
            s, off = torn
            log.warning("history: dropping a torn tail dir=%s segment=%s offset=%d", root, _seg_name(s), off)
            os.ftruncate(self.segs.fd(s), off)
            os.fsync(self.segs.fd(s))
        self._region_saved: set[int] = set()
        self._region_chunk = max(1, (64 << 10) // self.meta.block_size)
        if self.index.windows and self.index.windows[-1].end_seq is None:
            self._reload_region_saved()
        self.trim()

    @classmethod
    def open(cls, root: Path, *, block_size: int, num_blocks: int, volume_uuid: str, generation: int,
             target: str, base_seq: int, **kw: object) -> HistoryWriter:
        """Open the history in `root`, starting a new one (at `base_seq`) when there is none or the
        one there belongs to another volume, generation or block size."""
        meta = Meta(block_size=block_size, num_blocks=num_blocks, volume_uuid=volume_uuid, generation=generation,
                    target=target, tail_pos=0, base_seq=base_seq)
        if (root / META).exists():
            try:
                old = _read_meta(root)
                same = (old.block_size, old.volume_uuid, old.generation) == (block_size, volume_uuid, generation)
            except HistoryCorrupt:
                same = False
            if not same:
                log.warning("history: the target now holds another volume; starting a new history dir=%s", root)
                _wipe(root)
        return cls(root, meta, **kw)  # type: ignore[arg-type]

    @classmethod
    def reopen(cls, root: Path, **kw: object) -> HistoryWriter | None:
        """The history already in `root` (a remote unit starting: it keeps trimming by age and
        reports it before its source reconnects), or None when there is none or it cannot be
        read (logged; the source's next connection starts a new one)."""
        if not (root / META).exists():
            return None
        try:
            return cls(root, _read_meta(root), **kw)  # type: ignore[arg-type]
        except (HistoryError, OSError) as exc:
            log.warning("history: cannot reopen dir=%s error=%s", root, exc)
            return None

    # -- appending -----------------------------------------------------------------------------
    def _append(self, records: Sequence[Encoded]) -> None:
        """Write `records` at the head in one write and make them durable, then index them."""
        if not records:
            return
        parts: list[bytes] = []
        for e in records:
            parts.append(e.head)
            parts.append(e.payload)
        data = b"".join(parts)
        head = self.index.head_pos
        s = self.segs.seg_of(head) if self.segs.starts else None
        if s is None or (head - s >= self.segment_bytes and head > s):
            self.segs.create(head)
            s = head
        fd = self.segs.fd(s)
        try:
            at = 0
            while at < len(data):
                at += os.pwrite(fd, data[at:] if at else data, head - s + at)
            os.fdatasync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, head - s)
            raise HistoryError(f"history {self.root}: {exc.strerror}") from exc
        with self._mu:
            pos = head
            for e in records:
                self.index.add(pos, e.header, e.name)
                pos += HEADER_SIZE + len(e.payload)

    def before_apply(self, records: Sequence[RecordLike], read: Callable[[int, int], bytes]) -> None:
        """Save what `records` (in order, about to be applied) will overwrite, and their points,
        durably. `read(lba, count)` reads the target as it is now. Records already in the history
        (seq at or below the newest one kept: sent again after a restart) are skipped, since their
        before-images were saved the first time and the target may already hold them."""
        bs = self.meta.block_size
        out: list[Encoded] = []
        # earlier records of this batch that change blocks, (lba, count, data or None for an unmap),
        # found through the 64 KiB buckets they touch
        overlay: list[tuple[int, int, bytes | None]] = []
        touched: dict[int, list[int]] = {}
        last = self.index.last_seq
        in_resync = bool(self.index.windows and self.index.windows[-1].end_seq is None)
        for r in records:
            kind = int(r.kind)
            if r.seq <= last:
                continue
            last = r.seq
            if kind in (RecordKind.WRITE, RecordKind.UNMAP) and r.count > 0:
                lba, end = r.lba, r.lba + r.count
                buckets = range(lba >> _OVERLAY_SHIFT, ((end - 1) >> _OVERLAY_SHIFT) + 1)
                earlier: set[int] = set()
                for b in buckets:
                    hit = touched.get(b)
                    if hit is not None:
                        earlier.update(hit)
                before = read(lba, r.count)
                if earlier:
                    buf = bytearray(before)
                    for i in sorted(earlier):  # in batch order: the newest wins
                        a, n, data = overlay[i]
                        lo, hi = max(a, lba), min(a + n, end)
                        if lo < hi:
                            buf[(lo - lba) * bs:(hi - lba) * bs] = (
                                data[(lo - a) * bs:(hi - a) * bs] if data is not None else bytes((hi - lo) * bs))
                    before = bytes(buf)
                out.append(undo_record(r.seq, r.timestamp_ns, lba, before, bs))
                i = len(overlay)
                overlay.append((lba, r.count, r.payload if kind == RecordKind.WRITE else None))
                for b in buckets:
                    touched.setdefault(b, []).append(i)
            elif kind == RecordKind.FLUSH and not in_resync:
                out.append(point_record(r.seq, r.timestamp_ns, PointKind.FLUSH))
            elif kind == RecordKind.MARK and not in_resync:
                out.append(point_record(r.seq, r.timestamp_ns, PointKind.MARK,
                                        bytes(r.payload).decode(errors="replace")[:100]))
        self._append(out)
        if out:
            self.trim()

    def resync_begin(self, base_seq: int, time_ns: int) -> None:
        """A resync starts: the image at `base_seq` (the target now) stays restorable while region
        copies overwrite the target; images between it and the resync's end are not whole."""
        if self.index.windows and self.index.windows[-1].end_seq is None:
            return  # a resync restarted: the same window goes on
        self._append([encode_record(Kind.RESYNC, seq=base_seq, time_ns=time_ns, flags=RESYNC_BEGIN)])
        self._region_saved.clear()

    def before_region(self, lba: int, count: int, read: Callable[[int, int], bytes]) -> None:
        """A resync copy is about to overwrite blocks: save each 64 KiB chunk once per resync."""
        if not (self.index.windows and self.index.windows[-1].end_seq is None):
            raise HistoryError("region copy outside a resync")
        w = self.index.windows[-1]
        c = self._region_chunk
        chunks: list[Encoded] = []
        t = self.index.time_ns(self.index.next_id - 1) if self.index.next_id > self.index.first_id else 0
        for k in range(lba // c, (lba + count - 1) // c + 1):
            if k in self._region_saved:
                continue
            a = k * c
            n = min(c, self.meta.num_blocks - a)
            if n <= 0:
                continue
            chunks.append(undo_record(w.begin_seq + 1, t, a, read(a, n), self.meta.block_size, region=True))
            self._region_saved.add(k)
        self._append(chunks)
        if chunks:
            self.trim()

    def resync_end(self, end_seq: int, time_ns: int) -> None:
        """Records up to `end_seq` are applied: the target is whole again."""
        if self.index.windows and self.index.windows[-1].end_seq is None:
            self._append([encode_record(Kind.RESYNC, seq=end_seq, time_ns=time_ns, flags=RESYNC_END)])
            self._region_saved.clear()

    def _reload_region_saved(self) -> None:
        c = self._region_chunk
        begin = max(i for i in range(self.index.first_id, self.index.next_id)
                    if not self.index.is_undo(i)) if self.index.next_id > self.index.first_id else 0
        for i in range(begin, self.index.next_id):
            if self.index.is_region(i):
                self._region_saved.add(self.index.extent(i)[0] // c)

    # -- trimming ------------------------------------------------------------------------------
    def _pins(self) -> int | None:
        """The lowest position a live view needs (stale pin files are removed)."""
        low: int | None = None
        pins = self.root / "pins"
        for p in pins.iterdir():
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    if raw.isdigit():
                        low = int(raw) if low is None else min(low, int(raw))
                    continue
                p.unlink(missing_ok=True)  # its reader is gone
            finally:
                os.close(fd)
        return low

    def trim(self) -> None:
        idx = self.index
        min_time = self.now() - self.age_ns
        if idx.size <= self.size_cap and (idx.next_id == idx.first_id or idx.time_ns(idx.first_id) >= min_time):
            return
        with _flocked(self._lockf):
            pin_pos = self._pins()
            pin_id = None
            if pin_pos is not None:
                pin_id = idx.first_id
                while pin_id < idx.next_id and idx.pos(pin_id) < pin_pos:
                    pin_id += 1
            keep = idx.trim_plan(size_cap=self.size_cap, min_time_ns=min_time, pin_id=pin_id)
            if keep == idx.first_id:
                if pin_id is not None and idx.size > self.size_cap:
                    log.warning("history over its cap while an image view is open dir=%s size=%d cap=%d",
                                self.root, idx.size, self.size_cap)
                return
            with self._mu:
                idx.trim_to(keep)
            self.meta.tail_pos = idx.tail_pos
            self.meta.base_seq = idx.base_seq
            self.meta.base_time_ns = idx.base_time_ns
            write_atomically(self.root / META, self.meta.encode())
        self.segs.drop_below(idx.tail_pos)

    def status(self) -> dict[str, object]:
        with self._mu:
            return summary(self.index, self.size_cap, self.age_ns / 1e9, self.now())

    def status_keys(self) -> dict[str, object]:
        """The `history_*` keys of a source in the remote unit's status (cheap: no point list)."""
        with self._mu:
            return status_keys(self.index, self.size_cap, self.age_ns / 1e9, self.now())

    def close(self) -> None:
        self.segs.close()
        if self._lockf >= 0:
            os.close(self._lockf)
            self._lockf = -1

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _wipe(root: Path) -> None:
    """Remove a history: meta.json first (durably), so a cut midway leaves no history at all rather
    than a meta whose records are partly gone."""
    (root / META).unlink(missing_ok=True)
    fsync_dir(root)
    for p in root.iterdir():
        if p.is_file():
            p.unlink()
    fsync_dir(root)


class DiscardOnChange:
    """An apply hook for a source whose history is kept no more (a remote started without
    `--history-size`): the history on disk matches the target until the target first changes;
    just before that change it is removed, durably, so that `history`, `restore` and `expose`
    never offer an image the target no longer backs. A view open on it meanwhile (a `restore`, an
    `expose`) fails with "no history" at its next read rather than serve a wrong block."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done = False

    def _discard(self, why: str) -> None:
        if self.done:
            return
        if (self.root / META).exists():
            log.warning("history: removing the history of a source kept without history now, %s dir=%s",
                        why, self.root)
            with _flocked_path(self.root / "lock"):
                _wipe(self.root)
        self.done = True

    def before_apply(self, records: Sequence[RecordLike], read: Callable[[int, int], bytes]) -> None:
        if any(int(r.kind) in (RecordKind.WRITE, RecordKind.UNMAP) and r.count > 0 for r in records):
            self._discard("as the target changes")

    def before_region(self, lba: int, count: int, read: Callable[[int, int], bytes]) -> None:
        self._discard("as a resync changes the target")

    def resync_begin(self, base_seq: int, time_ns: int) -> None:
        pass


@contextlib.contextmanager
def _flocked_path(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with _flocked(fd):
            yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flocked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def summary(idx: Index, size_cap: int | None, age_s: float | None, now_ns: int) -> dict[str, object]:
    """What `usbmirror history` and status report about one history."""
    pts = idx.live_points()
    oldest = idx.oldest_restorable()
    ot = idx.oldest_time_ns()
    oldest_time = None if ot is None else ot / 1e9
    newest = pts[-1] if pts else None
    out: dict[str, object] = {
        "points": [p.as_dict() for p in reversed(pts)],
        "oldest_seq": oldest,
        "oldest_time": oldest_time,
        "newest_seq": idx.last_seq,
        "size_bytes": idx.size,
        "size_cap_bytes": size_cap,
        "age_cap_s": age_s,
        "newest_point": None if newest is None else newest.as_dict(),
        "newest_point_age_s": None if newest is None else max(0.0, now_ns / 1e9 - newest.time_ns / 1e9),
        "resync_in_progress": bool(idx.windows and idx.windows[-1].end_seq is None),
    }
    keys = status_keys(idx, size_cap, age_s, now_ns)
    out["covers_s"] = keys["history_covers_s"]
    out["warning"] = keys["history_warning"]
    return out


def status_keys(idx: Index | None, size_cap: int | None, age_s: float | None, now_ns: int) -> dict[str, object]:
    """Per source in a remote unit's status: the history's size and cap, the oldest restorable
    time, the newest restore point and its age (the recovery point objective now), how long the
    history reaches back and a warning when the size cap makes that less than the age asked.
    `idx` None: no history open for the source (all values None, no warning)."""
    if idx is None:
        return {"history_size_bytes": None, "history_cap_bytes": size_cap, "history_age_cap_s": age_s,
                "history_oldest_seq": None, "history_oldest_time": None, "history_newest_point": None,
                "history_newest_point_age_s": None, "history_covers_s": None, "history_warning": ""}
    newest = next((p for p in reversed(idx.points) if p.id >= idx.first_id), None)
    ot = idx.oldest_time_ns()
    covers = None if ot is None else max(0.0, (now_ns - ot) / 1e9)
    warning = ""
    if age_s is not None and covers is not None and idx.base_seq > 0 and covers < age_s \
            and size_cap is not None and idx.size >= size_cap * 0.9:
        warning = (f"history covers {covers:.0f} s, less than the {age_s:.0f} s asked: the size cap "
                   f"({size_cap} bytes) ends it first")
    return {
        "history_size_bytes": idx.size,
        "history_cap_bytes": size_cap,
        "history_age_cap_s": age_s,
        "history_oldest_seq": idx.oldest_restorable(),
        "history_oldest_time": None if ot is None else ot / 1e9,
        "history_newest_point": None if newest is None else newest.as_dict(),
        "history_newest_point_age_s": None if newest is None else max(0.0, (now_ns - newest.time_ns) / 1e9),
        "history_covers_s": covers,
        "history_warning": warning,
    }


class HistoryReader:
    """A read-only view of a history's files, following the writer (another process or not)."""

    def __init__(self, root: Path) -> None:
        if not (root / META).exists():
            raise HistoryError(f"no history in {root}")
        self.root = root
        self.meta = _read_meta(root)
        self._lockf = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with _flocked(self._lockf):
            self.meta = _read_meta(root)
            self.segs = _Segments(root, writable=False)
            self.index, _ = _build(self.segs, self.meta, tolerate_torn=True)

    def refresh(self) -> None:
        """Take in records appended and trims done since the last look."""
        meta = _read_meta(self.root)
        if meta.created_ns != self.meta.created_ns or meta.volume_uuid != self.meta.volume_uuid:
            raise HistoryError("the history was started anew (the target holds another volume now)")
        self.segs.reload()
        _scan_files(self.segs, self.index, verify_from=self.index.head_pos)
        if meta.tail_pos > self.index.tail_pos:
            rid = self.index.first_id
            while rid < self.index.next_id and self.index.pos(rid) < meta.tail_pos:
                rid += 1
            self.index.trim_to(rid)
        self.meta = meta

    def pin(self, start_id: int) -> int:
        """Keep the writer from trimming records at or after `start_id`; returns the pin's fd (held
        until closed). Raises HistoryError when they were trimmed meanwhile."""
        with _flocked(self._lockf):
            self.refresh()
            if start_id < self.index.first_id:
                raise HistoryError("that point was trimmed from the history just now")
            pos = self.index.pos(start_id) if start_id < self.index.next_id else self.index.head_pos
            p = self.root / "pins" / f"{os.getpid()}-{next(_pin_counter)}"
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.write(fd, str(pos).encode())
            return fd

    @staticmethod
    def unpin(fd: int) -> None:
        with contextlib.suppress(OSError):
            path = os.readlink(f"/proc/self/fd/{fd}")
            os.unlink(path)
        os.close(fd)

    def read_payload(self, rid: int, lba: int, count: int) -> bytes:
        idx = self.index
        a, _n = idx.extent(rid)
        bs = self.meta.block_size
        return self.segs.read(idx.pos(rid) + HEADER_SIZE + (lba - a) * bs, count * bs)

    def close(self) -> None:
        self.segs.close()
        if self._lockf >= 0:
            os.close(self._lockf)
            self._lockf = -1

    def __enter__(self) -> HistoryReader:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


