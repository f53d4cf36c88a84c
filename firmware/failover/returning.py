"""The old primary comes back (sans-IO): what a local unit does when its remote answers that it was
promoted, with its data generations.

`old_primary_returns()` takes this side's role state, the remote's generations and this side's
writes that the promoted copy never received (the journal records after the promotion's fork
position, with their times), and returns the role state to persist and what to tell the operator:

- **remote newer** (the remote moved on from this side's generation and every unshipped write is
  from before the promotion): this side becomes a replica and takes no host writes; its unshipped
  writes are the failover's loss, counted (writes and bytes) in `failover_loss`, never shipped over
  the promoted data;
- **split brain** (this side also wrote after the promotion, or wrote at a time it cannot tell,
  or both sides moved on from a common generation): nothing changes; `split_brain` says who wrote
  how much;
- **unrelated** (no generation in common): refused, nothing changes.

No files, sockets or clocks: `now_ns` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from firmware.failover.generations import (
    Decision,
    Divergence,
    History,
    Outcome,
    SideView,
    WriteInfo,
    decide,
    divergence,
)
from firmware.failover.state import RoleState, SplitBrain


@dataclass(frozen=True, slots=True)
class Return:
    decision: Decision
    state: RoleState  # to persist (the same object when nothing changes)
    loss: Divergence
    message: str
    refuse_writes: bool  # this side is a replica: host writes get DATA PROTECT, WRITE PROTECTED


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def old_primary_returns(state: RoleState, *, peer: str, peer_history: History, peer_dirty: bool,
                        peer_dirty_bytes: int, unshipped: Iterable[WriteInfo], unknown_time_bytes: int,
                        now_ns: int) -> Return:
    """See the module docstring. `unshipped` are this side's writes after the fork position of the
    generation that followed its own in the peer's history (all of them when there is none);
    `unknown_time_bytes` are bytes written at a time this side cannot tell (journal overflow)."""
    own = state.history
    cur = own.current
    promoted = peer_history.successor(cur) if cur is not None else None
    writes = tuple(unshipped)
    if promoted is not None:
        loss = divergence(writes, promoted)
    else:
        loss = Divergence(diverged_writes=len(writes), diverged_bytes=sum(w.nbytes for w in writes))
    wrote_after = loss.diverged or unknown_time_bytes > 0
    d = decide(SideView(own, wrote_after, state.resolution), SideView(peer_history, peer_dirty))
    peer_cur = peer_history.current
    if d.outcome is Outcome.REMOTE_NEWER:
        report = {"writes": loss.lost_writes, "bytes": loss.lost_bytes, "peer": peer,
                  "generation": peer_cur.label if peer_cur is not None else None,
                  "first_seq": min((w.seq for w in writes), default=None),
                  "last_seq": max((w.seq for w in writes), default=None), "detected_ns": now_ns}
        same = (not state.primary and state.failover_loss is not None
                and state.failover_loss.get("generation") == report["generation"])
        new = state if same else replace(state, primary=False, failover_loss=report, split_brain=None)
        msg = (f"{peer} holds a newer data generation ({d.reason}): this unit is a replica now and takes no "
               f"host writes; {loss.lost_writes} writes ({loss.lost_bytes} bytes) it acknowledged and never "
               f"shipped are the failover's loss and are not applied on the promoted copy")
        return Return(d, new, loss, msg, True)
    if d.outcome is Outcome.SPLIT_BRAIN:
        own_bytes = loss.diverged_bytes + unknown_time_bytes
        sb = SplitBrain(peer, cur, peer_cur, own_bytes, peer_dirty_bytes, d.reason, now_ns)
        same = state.split_brain is not None and (state.split_brain.own, state.split_brain.peer_generation,
                                                  state.split_brain.own_bytes) == (cur, peer_cur, own_bytes)
        new = state if same else replace(state, split_brain=sb)
        msg = (f"split brain with {peer}: {d.reason}; this unit wrote {_mib(own_bytes)} "
               f"({loss.diverged_writes} writes) after {peer} was promoted, {peer} wrote "
               f"{_mib(peer_dirty_bytes)}; no data changes on either side until an operator decides")
        return Return(d, new, loss, msg, not state.primary)
    if d.outcome is Outcome.UNRELATED:
        return Return(d, state, loss, f"{peer} holds unrelated data: {d.reason}; refused", not state.primary)
    return Return(d, state, loss, f"{peer} is primary, yet {d.reason}", not state.primary)
