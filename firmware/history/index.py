"""The in-memory index of a history (sans-IO): which before-image answers a read of an old image.

Every record kept gets an *id* (0, 1, 2, ... in log order, never reused). An image at some point
is "the target, except that each block overwritten after the point reads as its first
before-image after the point". So a view starting at id `start` answers a read of block L with the
UNDO record of smallest id >= start covering L, or the target when there is none.

To find that record fast, the block space is cut into buckets of `bucket_blocks` blocks; each
bucket lists (ascending) the ids of the UNDO records touching it. A lookup is one bisection in one
bucket and a short forward scan. Trimming the oldest records only moves `first_id`; bucket lists
drop their stale heads lazily.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from firmware.history.format import HEADER_SIZE, RESYNC_BEGIN, Header, HistoryError, Kind, PointKind

BUCKET_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class Point:
    """A restore point: the image just after journal record `seq`."""

    seq: int
    time_ns: int
    kind: PointKind
    name: str
    id: int

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"seq": self.seq, "time": self.time_ns / 1e9,
                                "kind": "mark" if self.kind is PointKind.MARK else "flush"}
        if self.kind is PointKind.MARK:
            d["name"] = self.name
        return d


@dataclass(frozen=True, slots=True)
class Window:
    """A resync: images after `begin_seq` and before `end_seq` were never whole on the target."""

    begin_seq: int
    end_seq: int | None  # None while the resync has not finished

    def holds(self, seq: int) -> bool:
        return seq > self.begin_seq and (self.end_seq is None or seq < self.end_seq)


class Index:
    def __init__(self, block_size: int, *, base_seq: int = 0, base_time_ns: int = 0) -> None:
        self.block_size = block_size
        self.bucket_blocks = max(1, BUCKET_BYTES // block_size)
        self._off = 0  # id of self._pos[0]
        self._pos: list[int] = []
        self._len: list[int] = []
        self._seq: list[int] = []
        self._time: list[int] = []
        self._lba: list[int] = []
        self._count: list[int] = []
        self._kind: list[int] = []
        self.first_id = 0
        self.next_id = 0
        self.head_pos = 0
        self.tail_pos = 0
        self.buckets: dict[int, list[int]] = {}
        self.points: list[Point] = []  # ascending id; trimmed ones dropped from the front
        self.windows: list[Window] = []
        self.base_seq = base_seq
        self.base_time_ns = base_time_ns
        self.last_seq = base_seq  # newest seq seen (records up to it are in the log)

    # -- building ------------------------------------------------------------------------------
    def add(self, pos: int, h: Header, name: str = "") -> int:
        """Append the record at `pos` (the next one in log order); returns its id."""
        rid = self.next_id
        if pos != self.head_pos and rid > self.first_id:
            raise HistoryError(f"history record at {pos} does not follow {self.head_pos}")
        if rid == self.first_id:
            self.tail_pos = pos
        self.next_id = rid + 1
        kind, flags, seq, lba, count, plen, t, _ = h
        self._pos.append(pos)
        self._len.append(HEADER_SIZE + plen)
        self._seq.append(seq)
        self._time.append(t)
        self._lba.append(lba)
        self._count.append(count)
        self._kind.append(int(kind) | (flags << 8))
        self.head_pos = pos + HEADER_SIZE + plen
        if kind is Kind.UNDO:
            bb = self.bucket_blocks
            buckets = self.buckets
            for b in range(lba // bb, (lba + count - 1) // bb + 1):
                ids = buckets.get(b)
                if ids is None:
                    buckets[b] = [rid]
                else:
                    ids.append(rid)
            if not flags and seq > self.last_seq:
                self.last_seq = seq
        elif kind is Kind.POINT:
            self.points.append(Point(seq, t, PointKind(flags), name, rid))
            self.last_seq = max(self.last_seq, seq)
        elif flags == RESYNC_BEGIN:
            self.windows.append(Window(seq, None))
        elif self.windows and self.windows[-1].end_seq is None:
            self.windows[-1] = Window(self.windows[-1].begin_seq, seq)
        return rid

    def start_empty_at(self, pos: int) -> None:
        """An index with no records whose next record lands at `pos`."""
        self.head_pos = self.tail_pos = pos

    # -- per-record access ---------------------------------------------------------------------
    def _i(self, rid: int) -> int:
        return rid - self._off

    def pos(self, rid: int) -> int:
        return self._pos[self._i(rid)]

    def length(self, rid: int) -> int:
        return self._len[self._i(rid)]

    def seq(self, rid: int) -> int:
        return self._seq[self._i(rid)]

    def time_ns(self, rid: int) -> int:
        return self._time[self._i(rid)]

    def extent(self, rid: int) -> tuple[int, int]:
        i = self._i(rid)
        return self._lba[i], self._count[i]

    def is_undo(self, rid: int) -> bool:
        return self._kind[self._i(rid)] & 0xFF == Kind.UNDO

    def is_region(self, rid: int) -> bool:
        k = self._kind[self._i(rid)]
        return k & 0xFF == Kind.UNDO and bool(k >> 8)

    @property
    def size(self) -> int:
        """Bytes of history kept."""
        return self.head_pos - self.tail_pos

    # -- the read path -------------------------------------------------------------------------
    def lookup(self, start_id: int, lba: int) -> int | None:
        """Id of the first UNDO record at or after `start_id` covering `lba`, or None."""
        lst = self.buckets.get(lba // self.bucket_blocks)
        if not lst:
            return None
        at = bisect.bisect_left(lst, max(start_id, self.first_id))
        lbas, counts, off = self._lba, self._count, self._off
        for rid in lst[at:]:
            i = rid - off
            a = lbas[i]
            if a <= lba < a + counts[i]:
                return rid
        return None

    def runs(self, start_id: int, lba: int, count: int) -> list[tuple[int, int, int | None]]:
        """Cut blocks lba..lba+count into runs `(lba, n, id)`: id None = read the target."""
        end = lba + count
        bb = self.bucket_blocks
        first = max(start_id, self.first_id)
        off, lbas, counts = self._off, self._lba, self._count
        out: list[tuple[int, int, int | None]] = []

        def emit(a: int, n: int, rid: int | None) -> None:
            if out:
                pa, pn, prid = out[-1]
                if prid == rid and pa + pn == a:
                    out[-1] = (pa, pn + n, rid)
                    return
            out.append((a, n, rid))

        cur = lba
        while cur < end:
            b = cur // bb
            seg_end = min(end, (b + 1) * bb)
            lst = self.buckets.get(b)
            at = bisect.bisect_left(lst, first) if lst else 0
            if not lst or at == len(lst):
                emit(cur, seg_end - cur, None)
                cur = seg_end
                continue
            owner: list[int | None] = [None] * (seg_end - cur)
            left = len(owner)
            for rid in lst[at:]:
                i = rid - off
                a, n = lbas[i], counts[i]
                for k in range(max(a, cur) - cur, min(a + n, seg_end) - cur):
                    if owner[k] is None:
                        owner[k] = rid
                        left -= 1
                if not left:
                    break
            k = 0
            while k < len(owner):
                j = k
                while j < len(owner) and owner[j] == owner[k]:
                    j += 1
                emit(cur + k, j - k, owner[k])
                k = j
            cur = seg_end
        return out

    # -- points and positions ------------------------------------------------------------------
    def start_id_after_seq(self, seq: int) -> int:
        """The id a view of the image just after record `seq` starts at."""
        return bisect.bisect_right(self._seq, seq) + self._off

    def seq_at_time(self, time_ns: int) -> int:
        """The newest seq whose local time is at or before `time_ns` (base_seq when no record kept
        is). Resync copies and markers carry no host time of their own and are left out."""
        best = self.base_seq
        for i in range(self.first_id - self._off, len(self._time)):
            k = self._kind[i]
            if (k == Kind.UNDO or k & 0xFF == Kind.POINT) and self._time[i] <= time_ns and self._seq[i] > best:
                best = self._seq[i]
        return best

    def in_window(self, seq: int) -> Window | None:
        for w in self.windows:
            if w.holds(seq):
                return w
        return None

    def oldest_restorable(self) -> int | None:
        """The oldest seq that can still be restored (None: none, a resync is still running)."""
        s = self.base_seq
        for w in self.windows:
            if w.holds(s):
                if w.end_seq is None:
                    return None
                s = w.end_seq
        return s

    def oldest_time_ns(self) -> int | None:
        """The oldest local time a restore by time can place: the oldest restorable image's time
        (for a history started without one, the time of the oldest record kept, since the image at
        the base is known to hold only from then on). None when no time is known yet."""
        oldest = self.oldest_restorable()
        if oldest is None:
            return None
        if oldest == self.base_seq:
            if self.base_time_ns:
                return self.base_time_ns
            for i in range(self.first_id - self._off, len(self._time)):
                k = self._kind[i]
                if k == Kind.UNDO or k & 0xFF == Kind.POINT:
                    return self._time[i]
            return None
        for p in self.live_points():
            if p.seq >= oldest:
                return p.time_ns
        return None

    def live_points(self) -> list[Point]:
        return [p for p in self.points if p.id >= self.first_id]

    # -- trimming ------------------------------------------------------------------------------
    def trim_to(self, new_first: int) -> None:
        """Forget every record below `new_first` (the oldest first)."""
        new_first = min(new_first, self.next_id)
        if new_first <= self.first_id:
            return
        last = new_first - 1
        self.base_seq = max(self.base_seq, self.seq(last))
        self.base_time_ns = max(self.base_time_ns, self.time_ns(last))
        self.first_id = new_first
        self.tail_pos = self.pos(new_first) if new_first < self.next_id else self.head_pos
        while self.points and self.points[0].id < new_first:
            self.points.pop(0)
        while len(self.windows) > 1 and self.windows[0].end_seq is not None \
                and self.windows[0].end_seq <= self.base_seq:
            self.windows.pop(0)
        if new_first - self._off > max(4096, len(self._pos) // 2):
            self._compact()

    def _compact(self) -> None:
        k = self.first_id - self._off
        for lst in (self._pos, self._len, self._seq, self._time, self._lba, self._count, self._kind):
            del lst[:k]
        self._off = self.first_id
        for b in list(self.buckets):
            lst = self.buckets[b]
            at = bisect.bisect_left(lst, self.first_id)
            if at == len(lst):
                del self.buckets[b]
            elif at:
                del lst[:at]

    def trim_plan(self, *, size_cap: int, min_time_ns: int, pin_id: int | None) -> int:
        """The first id to keep so the history fits `size_cap` bytes and holds nothing older than
        `min_time_ns`, never trimming at or past `pin_id` (a view in use)."""
        rid = self.first_id
        limit = self.next_id if pin_id is None else min(pin_id, self.next_id)
        while rid < limit:
            size = self.head_pos - self.pos(rid)
            if size <= size_cap and self.time_ns(rid) >= min_time_ns:
                break
            rid += 1
        return rid
