"""A side's role state for one source, kept crash-safely in its state directory.

Layout (the same on a local unit and on a remote unit; `<source>` is the source id):

    <state_dir>/roles/<source>.json          role state, JSON, replaced atomically
    <state_dir>/roles/<source>.<peer>.bitmap blocks written since this side and <peer> last agreed
                                             (the dirty-bitmap format of docs/JOURNAL.md)

`<source>.json` holds: `version` (1), `source_id`, `primary`, `history` (the data generations, oldest
first: `id` as 16 hex digits, `counter`, `started_ns`, `fork_seq`), `resolution` (an operator's
`resolve` not yet carried out, or null), `split_brain` (the last split brain seen, or null),
`last_resync` and `failover_loss` (reports, or null), and `promotion` (on a promoted remote: how it
serves its standby host and the rollback it still has to finish, or null; absent in older files).
The file is written with the project's atomic
writer (temporary file, fsync, rename, fsync of the directory), so a power cut leaves the old or the
new state, never a mix. A file that does not parse is an error naming the file: the unit refuses to
guess a role.

`RoleStore` is the adapter (files); `RoleState` and its JSON form are plain values.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware.atomic import fsync_dir, write_atomically
from firmware.failover.generations import DataGeneration, History, Keep, Resolution
from firmware.journal.bitmap import DirtyBitmap

log = logging.getLogger(__name__)

ROLES_DIR = "roles"
STATE_VERSION = 1
_NAME_OK = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


@dataclass(frozen=True, slots=True)
class SplitBrain:
    """What a side saw when it found both copies written since they last agreed."""

    peer: str
    own: DataGeneration | None
    peer_generation: DataGeneration | None
    own_bytes: int  # written here since the two last agreed (region granularity)
    peer_bytes: int
    reason: str
    detected_ns: int


@dataclass(frozen=True, slots=True)
class RoleState:
    source_id: str
    primary: bool
    history: History = field(default_factory=History)
    resolution: Resolution | None = None
    split_brain: SplitBrain | None = None
    last_resync: dict[str, Any] | None = None
    failover_loss: dict[str, Any] | None = None
    promotion: dict[str, Any] | None = None  # a promoted remote: serving address, pending rollback, ...

    def status(self) -> dict[str, Any]:
        """The keys both units show: `primary` and `split_brain` (booleans), and the details."""
        cur = self.history.current
        out: dict[str, Any] = {
            "primary": self.primary,
            "split_brain": self.split_brain is not None,
            "data_generation": cur.label if cur is not None else None,
        }
        if self.split_brain is not None:
            sb = self.split_brain
            out["split_brain_detail"] = {
                "peer": sb.peer, "own_generation": _label(sb.own), "peer_generation": _label(sb.peer_generation),
                "own_bytes": sb.own_bytes, "peer_bytes": sb.peer_bytes, "reason": sb.reason,
            }
        if self.resolution is not None:
            out["resolution_pending"] = "keep " + self.resolution.keep.value
        if self.last_resync is not None:
            out["last_resync"] = dict(self.last_resync)
        if self.failover_loss is not None:
            out["failover_loss"] = dict(self.failover_loss)
        if self.promotion is not None:
            out["promotion"] = dict(self.promotion)
        step = self.pending_step()
        if step is not None:
            out["pending_step"] = step
        return out

    def pending_step(self) -> str | None:
        """A role change recorded but not finished (a crash came in the middle), and how it goes on."""
        promo = self.promotion or {}
        if isinstance(promo.get("rollback_to_seq"), int):
            return (f"promote: the rollback to seq {promo['rollback_to_seq']} is unfinished; it resumes when the "
                    "unit starts, before the copy is served")
        if promo.get("handover"):
            return ("failback: the copy is no longer served and is being handed back; it completes when the local "
                    "unit next connects")
        if (self.last_resync or {}).get("needs_full_resync"):
            return ("resolve --keep local: the target is being reset to hold no known image; it resumes when the "
                    "unit starts, then the local unit's next connection compares every region")
        return None


def _label(g: DataGeneration | None) -> str | None:
    return g.label if g is not None else None


# -- JSON form ------------------------------------------------------------------------------------
def _gen_to_json(g: DataGeneration | None) -> dict[str, Any] | None:
    if g is None:
        return None
    return {"id": f"{g.gen_id:016x}", "counter": g.counter, "started_ns": g.started_ns, "fork_seq": g.fork_seq}


def _gen_from_json(raw: Any) -> DataGeneration | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("a generation must be an object")
    gid = raw["id"]
    if not isinstance(gid, str) or not re.fullmatch(r"[0-9a-f]{16}", gid):
        raise ValueError(f"generation id {gid!r} is not 16 hex digits")
    return DataGeneration(int(gid, 16), _int(raw["counter"]), _int(raw["started_ns"]), _int(raw["fork_seq"]))


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{v!r} is not an integer")
    return v


def _dict_or_none(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"{v!r} is not an object")
    return v


def state_to_json(st: RoleState) -> dict[str, Any]:
    res = st.resolution
    sb = st.split_brain
    return {
        "version": STATE_VERSION,
        "source_id": st.source_id,
        "primary": st.primary,
        "history": [_gen_to_json(g) for g in st.history.generations],
        "resolution": None if res is None else {"keep": res.keep.value, "own": _gen_to_json(res.own),
                                                "peer": _gen_to_json(res.peer)},
        "split_brain": None if sb is None else {
            "peer": sb.peer, "own": _gen_to_json(sb.own), "peer_generation": _gen_to_json(sb.peer_generation),
            "own_bytes": sb.own_bytes, "peer_bytes": sb.peer_bytes, "reason": sb.reason,
            "detected_ns": sb.detected_ns},
        "last_resync": st.last_resync,
        "failover_loss": st.failover_loss,
        "promotion": st.promotion,
    }


def state_from_json(raw: Any) -> RoleState:
    """Parse the JSON form; any missing or malformed field is a ValueError saying which."""
    try:
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        if raw.get("version") != STATE_VERSION:
            raise ValueError(f"version {raw.get('version')!r} is not {STATE_VERSION}")
        sid = raw["source_id"]
        primary = raw["primary"]
        if not isinstance(sid, str) or not isinstance(primary, bool):
            raise ValueError("source_id must be a string and primary a boolean")
        hist_raw = raw["history"]
        if not isinstance(hist_raw, list):
            raise ValueError("history must be a list")
        gens: list[DataGeneration] = []
        for g in hist_raw:
            gen = _gen_from_json(g)
            if gen is None:
                raise ValueError("history holds a null generation")
            gens.append(gen)
        history = History(tuple(gens))
        res_raw = raw["resolution"]
        resolution = None
        if res_raw is not None:
            if not isinstance(res_raw, dict):
                raise ValueError("resolution must be an object")
            resolution = Resolution(Keep(res_raw["keep"]), _gen_from_json(res_raw["own"]),
                                    _gen_from_json(res_raw["peer"]))
        sb_raw = raw["split_brain"]
        split = None
        if sb_raw is not None:
            if not isinstance(sb_raw, dict) or not isinstance(sb_raw["peer"], str) \
                    or not isinstance(sb_raw["reason"], str):
                raise ValueError("split_brain must be an object with peer and reason")
            split = SplitBrain(sb_raw["peer"], _gen_from_json(sb_raw["own"]), _gen_from_json(sb_raw["peer_generation"]),
                               _int(sb_raw["own_bytes"]), _int(sb_raw["peer_bytes"]), sb_raw["reason"],
                               _int(sb_raw["detected_ns"]))
        return RoleState(sid, primary, history, resolution, split, _dict_or_none(raw["last_resync"]),
                         _dict_or_none(raw["failover_loss"]), _dict_or_none(raw.get("promotion")))
    except KeyError as exc:
        raise ValueError(f"field {exc} is missing") from None


def fresh_generation_id() -> int:
    """A random non-zero 64-bit generation id."""
    return secrets.randbits(64) or 1


def open_roles(state_dir: str | os.PathLike[str], source_id: str, *, primary: bool) -> RoleStore:
    """Open (and create when missing) a side's role state: a local unit starts primary in its
    first generation; a remote starts as a replica with no generation of its own, and adopts the
    source's history once it has caught up."""
    store = RoleStore(state_dir, source_id)
    try:
        if primary:
            default = RoleState(source_id, True, History.initial(fresh_generation_id(), time.time_ns()))
        else:
            default = RoleState(source_id, False)
        store.load_or_create(default)
    except BaseException:
        store.close()
        raise
    return store


# -- the adapter ----------------------------------------------------------------------------------
def _check_name(what: str, name: str) -> str:
    if not _NAME_OK.match(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r} cannot name a file (letters, digits, . _ : @ -; at most 128)")
    return name


class RoleStore:
    """The role state of one source in one state directory, and its per-peer bitmaps."""

    def __init__(self, state_dir: str | os.PathLike[str], source_id: str) -> None:
        self.source_id = _check_name("source id", source_id)
        self.dir = Path(state_dir) / ROLES_DIR
        self.path = self.dir / f"{source_id}.json"
        self._bitmaps: dict[str, DirtyBitmap] = {}
        self._state: RoleState | None = None

    def __enter__(self) -> RoleStore:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> RoleState | None:
        """The stored state, or None when this side has none yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            st = state_from_json(json.loads(text))
        except ValueError as exc:
            raise ValueError(f"{self.path} is damaged ({exc}); the unit will not guess its role: "
                             "restore the file from a backup") from None
        if st.source_id != self.source_id:
            raise ValueError(f"{self.path} belongs to source {st.source_id!r}, not {self.source_id!r}")
        self._state = st
        return st

    def load_or_create(self, default: RoleState) -> RoleState:
        st = self.load()
        if st is None:
            self.save(default)
            st = default
        return st

    @property
    def state(self) -> RoleState:
        if self._state is None:
            raise RuntimeError("role state not loaded")
        return self._state

    def save(self, st: RoleState) -> None:
        """Durable on return (or the old state stays)."""
        if st.source_id != self.source_id:
            raise ValueError("role state of another source")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(state_to_json(st), sort_keys=True, indent=1).encode() + b"\n")
        self._state = st

    def update(self, **changes: Any) -> RoleState:
        st = replace(self.state, **changes)
        self.save(st)
        return st

    def bitmap_path(self, peer: str) -> Path:
        return self.dir / f"{self.source_id}.{_check_name('peer name', peer)}.bitmap"

    def bitmap(self, peer: str, *, num_blocks: int, region_blocks: int, volume_uuid: uuid.UUID) -> DirtyBitmap:
        """The blocks this side wrote since it and `peer` last agreed (created empty when missing)."""
        bm = self._bitmaps.get(peer)
        if bm is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            bm = DirtyBitmap.open(self.bitmap_path(peer), num_blocks=num_blocks, region_blocks=region_blocks,
                                  unit_uuid=volume_uuid)
            self._bitmaps[peer] = bm
        return bm

    def open_bitmaps(self) -> frozenset[str]:
        """The peers whose bitmaps this store holds open."""
        return frozenset(self._bitmaps)

    def drop_bitmap(self, peer: str) -> None:
        """The two sides agree again: forget the blocks written towards `peer` (the file goes)."""
        bm = self._bitmaps.pop(peer, None)
        if bm is not None:
            bm.close()
        path = self.bitmap_path(peer)
        if path.exists():
            path.unlink()
            fsync_dir(self.dir)

    def peers_with_bitmaps(self) -> list[str]:
        prefix = self.source_id + "."
        out = []
        if self.dir.is_dir():
            for p in sorted(self.dir.iterdir()):
                if p.name.startswith(prefix) and p.name.endswith(".bitmap"):
                    out.append(p.name[len(prefix):-len(".bitmap")])
        return out

    def close(self) -> None:
        for bm in self._bitmaps.values():
            bm.close()
        self._bitmaps.clear()
