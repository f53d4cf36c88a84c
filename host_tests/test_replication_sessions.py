"""The sans-IO replication sessions, driven by hand: a SourceSession and a TargetSession connected in
memory through two JourneyConnections (real frames), an in-memory target, time passed in by the test.

Covers: streaming with acknowledgements, resume after a dropped connection (nothing lost, nothing
applied twice), the window filling up, duplicate and out-of-order ACKs, the resync plans (after HELLO
and from the dirty bitmap), a full resync through both sessions, heartbeats and the dead-link timeout,
and random event sequences (each one either handled or a ProtocolError/Refused, never a crash).
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.journal.format import RecordKind
from firmware.link import protocol as jp
from firmware.replication.source import (
    RECORD_OVERHEAD,
    Confirm,
    LinkDead,
    Resume,
    ResyncPlan,
    ResyncReason,
    SendHeartbeat,
    SourceIdentity,
    SourceSession,
    dirty_plan,
    plan_after_hello,
    regions_of,
)
from firmware.replication.target import (
    ApplyRecords,
    CopyRegion,
    MakeDurable,
    ReadDigests,
    Refused,
    SaveState,
    Send,
    SyncNow,
    TargetAction,
    TargetSession,
    TargetState,
    Undo,
    UndoStep,
)

BS = 512
BLOCKS = 256
UUID = uuid.UUID(int=7).bytes
ME = SourceIdentity("src", UUID, BLOCKS * BS, BS, 1)


def rec(seq: int, lba: int, fill: int, count: int = 1) -> jp.Record:
    return jp.Record(seq, RecordKind.WRITE, lba, count, seq * 1000, bytes([fill]) * (count * BS))


def bound_state(applied: int = 0) -> TargetState:
    return TargetState("src", volume_uuid=UUID.hex(), generation=1, applied_seq=applied, block_size=BS,
                       num_blocks=BLOCKS)


class MemTarget:
    """What a target adapter does, in memory: blocks, a 'durable' copy, a saved state, an undo log."""

    def __init__(self, session: TargetSession) -> None:
        self.session = session
        self.blocks: dict[int, bytes] = {}
        self.durable_blocks: dict[int, bytes] = {}
        self.saved: list[TargetState] = []
        self.undo: list[UndoStep] = []
        self.overwrites: list[tuple[int, int]] = []  # the hook point: before blocks change
        self.pending_durable: list[int] = []
        self.sent: list[jp.Event] = []

    def do(self, actions: list[TargetAction]) -> None:
        for a in actions:
            if isinstance(a, ApplyRecords):
                for r in a.records:
                    if r.kind is RecordKind.WRITE:
                        self.overwrites.append((r.lba, r.count))
                        for i in range(r.count):
                            self.blocks[r.lba + i] = r.payload[i * BS:(i + 1) * BS]
                self.session.applied_ok(a.records)
            elif isinstance(a, CopyRegion):
                self.overwrites.append((a.lba, len(a.data) // BS))
                for i in range(len(a.data) // BS):
                    self.blocks[a.lba + i] = a.data[i * BS:(i + 1) * BS]
            elif isinstance(a, Send):
                self.sent.append(a.event)
            elif isinstance(a, MakeDurable):
                self.pending_durable.append(a.seq)
            elif isinstance(a, SyncNow):
                self.durable_blocks = dict(self.blocks)
            elif isinstance(a, SaveState):
                self.saved.append(TargetState(**vars(self.session.state)))
            elif isinstance(a, Undo):
                self.undo.append(a.step)
            elif isinstance(a, ReadDigests):
                digests = tuple(jp.region_digest(b"".join(self.blocks.get(lba, bytes(BS))
                                                          for lba in range(i * a.region_blocks,
                                                                           (i + 1) * a.region_blocks)))
                                for i in range(a.first_region, a.first_region + a.count))
                self.sent.append(jp.RegionDigests(a.first_region, a.region_blocks, digests))

    def flush(self) -> None:
        """The flusher finished every MakeDurable asked so far."""
        while self.pending_durable:
            seq = self.pending_durable.pop(0)
            self.durable_blocks = dict(self.blocks)
            self.session.state.applied_seq = max(self.session.state.applied_seq, seq)
            self.do(self.session.durable(seq))


class Pair:
    """A source session and a target session on one in-memory connection."""

    def __init__(self, source: SourceSession, target: TargetSession, mem: MemTarget) -> None:
        self.source, self.target, self.mem = source, target, mem
        self.now = 100.0
        self.confirmed: list[int] = []
        self.connect()

    def connect(self) -> None:
        self.src_conn = jp.JourneyConnection(jp.Role.SOURCE)
        self.tgt_conn = jp.JourneyConnection(jp.Role.REMOTE)
        self.source.connection_made(self.now)

    def to_target(self, ev: jp.Event) -> None:
        self.tgt_conn.receive_data(self.src_conn.send(ev))
        while not isinstance(got := self.tgt_conn.next_event(), jp.NeedData):
            if isinstance(got, jp.Hello):
                self.mem.do(self.target.hello(got, target_id="mem", target_blocks=BLOCKS))
            else:
                self.mem.do(self.target.event(got))
            want = self.target.want_flush(flusher_busy=False)
            if want is not None:
                self.mem.do([want])

    def to_source(self) -> list[jp.Event]:
        """Deliver what the target sent; ACKs go into the source session. Returns the other events."""
        others: list[jp.Event] = []
        for ev in self.mem.sent:
            self.src_conn.receive_data(self.tgt_conn.send(ev))
            got = self.src_conn.next_event()
            assert not isinstance(got, jp.NeedData)
            if isinstance(got, jp.Ack):
                _, confirms = self.source.ack(got.seq, self.now)
                self.confirmed += [c.seq for c in confirms]
            else:
                others.append(got)
        self.mem.sent.clear()
        return others

    def handshake(self, journal_records: list[jp.Record]) -> Resume | ResyncPlan:
        self.to_target(self.source.hello())
        (reply,) = self.to_source()
        assert isinstance(reply, jp.HelloReply)
        head = journal_records[-1].seq if journal_records else 0
        tail = journal_records[0].seq if journal_records else 1
        confirms, plan = self.source.hello_reply(reply, self.now, durable_seq=head, tail_seq=tail,
                                                 has_records_after=True, total_regions=BLOCKS // 64)
        self.confirmed += [c.seq for c in confirms]
        return plan

    def ship(self, records: list[jp.Record]) -> None:
        self.to_target(self.source.batch(records))

    def drop(self) -> None:
        """The connection breaks: both ends forget what was in flight."""
        last = self.target.connection_lost()
        if last is not None:  # the target makes what it applied durable on the way out
            self.mem.do([last])
            self.mem.flush()
        self.target.forget_unsynced()
        self.mem.sent.clear()
        self.source.connection_lost()


def new_pair(*, applied: int = 0, window: int = 1 << 20) -> Pair:
    target = TargetSession(bound_state(applied), remote_name="r1")
    source = SourceSession(ME, acked_seq=0, window_bytes=window, heartbeat_interval_s=5.0, dead_after_s=20.0)
    return Pair(source, target, MemTarget(target))


JOURNAL = [rec(i, (i * 3) % BLOCKS, i) for i in range(1, 41)]


def test_stream_apply_in_order_and_acknowledge() -> None:
    p = new_pair()
    assert p.handshake(JOURNAL) == Resume(0)
    p.ship(JOURNAL[:10])
    p.ship(JOURNAL[10:20])
    assert p.target.applied == 20 and p.target.state.applied_seq == 0  # applied, not yet durable
    p.mem.flush()
    p.to_source()
    assert p.source.acked_seq == p.target.state.applied_seq == 20
    assert p.confirmed and p.confirmed[-1] == 20 and p.source.in_flight_bytes == 0
    assert p.mem.overwrites[0] == (JOURNAL[0].lba, 1)  # the hook point saw every overwrite, in order
    assert len(p.mem.overwrites) == 20


def test_resume_after_a_drop_loses_nothing_and_applies_nothing_twice() -> None:
    p = new_pair()
    p.handshake(JOURNAL)
    p.ship(JOURNAL[:10])
    p.mem.flush()
    p.to_source()  # 1..10 acknowledged
    p.ship(JOURNAL[10:25])  # applied on the target, never acknowledged: the link breaks
    p.drop()
    assert p.source.sent_seq == p.source.acked_seq == 10 and p.source.in_flight_bytes == 0
    durable_before = p.target.state.applied_seq
    assert durable_before == 25  # the target made what it applied durable on the way out
    p.connect()
    plan = p.handshake(JOURNAL)
    assert plan == Resume(25)  # the remote's word is the truth
    assert p.source.acked_seq == 25 and p.confirmed[-1] == 25
    p.ship(JOURNAL[25:])
    p.mem.flush()
    p.to_source()
    assert p.source.acked_seq == 40 and p.target.records_applied == 40 and p.target.duplicates_skipped == 0
    for r in JOURNAL:  # each block holds its last write
        last = [x for x in JOURNAL if x.lba == r.lba][-1]
        assert p.mem.blocks[r.lba] == last.payload


def test_records_sent_again_after_a_drop_are_skipped_not_reapplied() -> None:
    p = new_pair()
    p.handshake(JOURNAL)
    p.ship(JOURNAL[:10])
    p.mem.flush()
    p.to_source()
    p.source.connection_lost()  # the source forgets in-flight state, the target kept its position
    p.source.connection_made(p.now)
    p.source.sent_seq = 5  # a source that resumes too early (say, from an old position)
    p.to_target(jp.Batch(5, tuple(JOURNAL[5:12])))
    assert p.target.duplicates_skipped == 5 and p.target.applied == 12 and p.target.records_applied == 12


def test_window_full_then_reopened_by_acks() -> None:
    p = new_pair(window=3 * (BS + RECORD_OVERHEAD))
    p.handshake(JOURNAL)
    p.ship(JOURNAL[:2])
    assert p.source.window_open
    p.ship(JOURNAL[2:3])
    assert not p.source.window_open  # three records in flight fill the window
    p.mem.flush()
    p.to_source()
    assert p.source.window_open and p.source.in_flight_bytes == 0


def test_duplicate_and_out_of_order_acks_change_nothing() -> None:
    s = SourceSession(ME, acked_seq=0, window_bytes=1 << 20, heartbeat_interval_s=5, dead_after_s=20)
    s.connection_made(0.0)
    s.batch(JOURNAL[:5])
    s.batch(JOURNAL[5:10])
    assert s.ack(5, 1.0) == (5 * (BS + RECORD_OVERHEAD), [Confirm(5)])
    assert s.ack(5, 2.0) == (0, [])  # the same again
    assert s.ack(3, 3.0) == (0, [])  # an older one after a newer one
    assert s.acked_seq == 5
    _, confirms = s.ack(10, 4.0)
    assert confirms == [Confirm(10)] and s.in_flight_bytes == 0
    with pytest.raises(jp.ProtocolError, match="only seq=10 was sent"):
        s.ack(11, 5.0)  # a position never sent


def test_batches_must_follow_what_was_sent() -> None:
    s = SourceSession(ME, acked_seq=3, window_bytes=1 << 20, heartbeat_interval_s=5, dead_after_s=20)
    with pytest.raises(ValueError, match="do not follow"):
        s.batch(JOURNAL[:2])
    assert s.batch(JOURNAL[3:5]).prev_seq == 3


def test_heartbeats_and_dead_link_with_time_passed_in() -> None:
    s = SourceSession(ME, acked_seq=0, window_bytes=1 << 20, heartbeat_interval_s=5, dead_after_s=20)
    assert s.tick(1000.0) == []  # not connected: nothing to do
    s.connection_made(0.0)
    assert s.tick(4.9) == []
    (hb,) = s.tick(5.1)
    assert isinstance(hb, SendHeartbeat)
    assert s.tick(6.0) == []  # just sent one
    s.data_received(15.0)
    assert not any(isinstance(a, LinkDead) for a in s.tick(30.0))
    (dead,) = s.tick(35.5)
    assert isinstance(dead, LinkDead) and "nothing heard from the remote for 20.5 s" in dead.reason


@pytest.mark.parametrize(("flags", "uuid_", "gen", "applied", "has_after", "tail", "reason"), [
    (jp.ReplyFlag.RESYNC_IN_PROGRESS, UUID, 1, 5, True, 1, ResyncReason.INTERRUPTED),
    (jp.ReplyFlag.NEW_TARGET, bytes(16), 0, 0, True, 1, ResyncReason.INITIAL),
    (jp.ReplyFlag.NONE, uuid.UUID(int=8).bytes, 1, 5, True, 1, ResyncReason.INITIAL),
    (jp.ReplyFlag.NONE, UUID, 2, 5, True, 1, ResyncReason.INITIAL),
    (jp.ReplyFlag.NONE, UUID, 1, 50, True, 1, ResyncReason.REMOTE_AHEAD),
    (jp.ReplyFlag.NONE, UUID, 1, 5, True, 10, ResyncReason.RECORDS_GONE),
    (jp.ReplyFlag.NONE, UUID, 1, 5, False, 1, ResyncReason.RECORDS_GONE),
])
def test_resync_plan_after_hello(flags: jp.ReplyFlag, uuid_: bytes, gen: int, applied: int, has_after: bool,
                                 tail: int, reason: ResyncReason) -> None:
    reply = jp.HelloReply("r1", uuid_, applied, gen, jp.Feature.NONE, flags)
    plan = plan_after_hello(reply, ME, durable_seq=40, tail_seq=tail, has_records_after=has_after, total_regions=4)
    assert plan == ResyncPlan(reason, (0, 1, 2, 3), 40)


def test_resume_plan_when_the_journal_holds_what_follows() -> None:
    reply = jp.HelloReply("r1", UUID, 5, 1, jp.Feature.NONE)
    assert plan_after_hello(reply, ME, durable_seq=40, tail_seq=6, has_records_after=True,
                            total_regions=4) == Resume(5)


def test_resync_plan_from_the_dirty_bitmap() -> None:
    assert regions_of([(0, 1), (63, 2), (200, 0), (10_000, 5)], 64, 4) == (0, 1, 3)
    snap = (7, ((0, 64), (130, 3)))
    plan = dirty_plan(snap, covered_token=None, resync_open=False, overflowing=False, position=12,
                      region_blocks=64, total_regions=4)
    assert plan == ResyncPlan(ResyncReason.OVERFLOW, (0, 2), 12)
    assert dirty_plan(snap, covered_token=7, resync_open=False, overflowing=False, position=12,
                      region_blocks=64, total_regions=4) is None  # the remote has it already
    during = dirty_plan(snap, covered_token=3, resync_open=False, overflowing=True, position=12,
                        region_blocks=64, total_regions=4)
    assert during is not None and during.reason is ResyncReason.OVERFLOW_CONTINUING
    # a round left open while the overflow lasted: one final round once it ends, even with nothing new
    final = dirty_plan(None, covered_token=7, resync_open=True, overflowing=False, position=20,
                       region_blocks=64, total_regions=4)
    assert final == ResyncPlan(ResyncReason.OVERFLOW, (), 20)


def test_full_resync_through_both_sessions_with_undo_and_hook_order() -> None:
    p = new_pair()
    p.handshake(JOURNAL)
    p.ship(JOURNAL[:10])
    p.mem.flush()
    p.to_source()
    # the remote keeps a consistent image at 10; a resync at P=30 copies two regions
    p.to_target(jp.ResyncBegin(30, 64, 2))
    assert p.mem.undo == [UndoStep.DISCARD, UndoStep.OPEN]  # a fresh undo log, opened after the state save
    assert p.mem.saved[-1].resync_active and p.mem.saved[-1].resync_base_seq == 10
    p.to_target(jp.DigestRequest(0, 2, 64))
    (digests,) = p.to_source()
    assert isinstance(digests, jp.RegionDigests) and len(digests.digests) == 2
    with pytest.raises(jp.ProtocolError, match="before the end of the resync copy"):
        p.target.event(jp.Batch(30, (JOURNAL[30],)))
    p.to_target(jp.RegionData(0, b"\x01" * (64 * BS)))
    p.to_target(jp.RegionData(64, b"\x02" * (64 * BS)))
    p.source.resync_copy_done(30)
    p.to_target(jp.ResyncEnd(35))
    p.to_source()
    assert p.source.acked_seq == 30 and p.target.state.resync_end == 35 and p.target.state.resync_active
    p.ship(JOURNAL[30:35])
    p.mem.flush()
    p.to_source()
    assert not p.target.state.resync_active and p.mem.undo[-1] is UndoStep.DROP
    assert p.mem.saved[-1].resync_active is False and p.source.acked_seq == 35


def test_target_refusals_and_protocol_errors() -> None:
    t = TargetSession(bound_state(5), remote_name="r1")
    with pytest.raises(jp.ProtocolError, match="before HELLO"):
        t.event(jp.Batch(5, (JOURNAL[5],)))
    hello = jp.Hello("src", UUID, BLOCKS * BS, BS, 1, 0)
    with pytest.raises(Refused) as small:
        t.hello(hello, target_id="mem", target_blocks=BLOCKS - 1)
    assert small.value.code is jp.ErrorCode.VOLUME_MISMATCH
    (reply,) = [a for a in t.hello(hello, target_id="mem", target_blocks=BLOCKS) if isinstance(a, Send)]
    assert isinstance(reply.event, jp.HelloReply) and reply.event.applied_seq == 5
    with pytest.raises(Refused) as gap:
        t.event(jp.Batch(9, (JOURNAL[9],)))
    assert gap.value.code is jp.ErrorCode.SEQUENCE
    with pytest.raises(jp.ProtocolError, match="outside the volume"):
        t.event(jp.Batch(5, (rec(6, BLOCKS - 1, 1, count=2),)))
    with pytest.raises(jp.ProtocolError, match="REGION_DATA outside a resync"):
        t.event(jp.RegionData(0, bytes(BS)))
    with pytest.raises(jp.ProtocolError, match="RESYNC_END without RESYNC_BEGIN"):
        t.event(jp.ResyncEnd(9))
    assert t.applied == 5  # nothing of a refused batch counts as applied


def test_verify_connection_cannot_write() -> None:
    t = TargetSession(bound_state(5), remote_name="r1")
    t.hello(jp.Hello("src", UUID, BLOCKS * BS, BS, 1, 0, purpose=jp.Purpose.VERIFY), target_id="mem",
            target_blocks=BLOCKS)
    assert isinstance(t.event(jp.DigestRequest(0, 1, 64))[0], ReadDigests)
    with pytest.raises(jp.ProtocolError, match="verify connection"):
        t.event(jp.Batch(5, (JOURNAL[5],)))


# -- random event sequences -----------------------------------------------------------------------
_records = st.builds(lambda seq, lba, count, kind: jp.Record(
    seq, kind, lba, count, 0, bytes(count * BS) if kind is RecordKind.WRITE else b""),
    st.integers(1, 60), st.integers(0, BLOCKS + 4), st.integers(1, 4), st.sampled_from(list(RecordKind)))
_events = st.one_of(
    st.builds(lambda prev, recs: jp.Batch(prev, tuple(sorted({r.seq: r for r in recs}.values(),
                                                             key=lambda r: r.seq))),
              st.integers(0, 60), st.lists(_records, min_size=1, max_size=4)),
    st.builds(jp.ResyncBegin, st.integers(0, 60), st.sampled_from([0, 16, 64]), st.integers(0, 8)),
    st.builds(lambda lba, n: jp.RegionData(lba, bytes(n)), st.integers(-2, BLOCKS + 2),
              st.sampled_from([0, 100, BS, 4 * BS])),
    st.builds(jp.ResyncEnd, st.integers(0, 70)),
    st.builds(jp.DigestRequest, st.integers(0, 8), st.integers(0, 4), st.sampled_from([0, 16, 64])),
    st.builds(jp.Heartbeat, st.integers(0, 5)),
    st.just("durable"),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_events, max_size=25), applied=st.integers(0, 10), bound=st.booleans())
def test_random_target_event_sequences_are_handled_or_refused(events: list[object], applied: int,
                                                              bound: bool) -> None:
    state = bound_state(applied) if bound else TargetState("src")
    t = TargetSession(state, remote_name="r1")
    mem = MemTarget(t)
    mem.do(t.hello(jp.Hello("src", UUID, BLOCKS * BS, BS, 1, 0), target_id="mem", target_blocks=BLOCKS))
    for ev in events:
        before = t.applied
        try:
            if ev == "durable":
                want = t.want_flush(flusher_busy=False)
                if want is not None:
                    mem.do([want])
                mem.flush()
            else:
                assert isinstance(ev, jp.Batch | jp.ResyncBegin | jp.RegionData | jp.ResyncEnd | jp.DigestRequest
                                  | jp.Heartbeat)
                mem.do(t.event(ev))
        except (jp.ProtocolError, Refused):
            assert t.applied == before  # a refused frame applies nothing
            return  # the connection ends here
        # invariants: the durable position never passes what was applied, applies stay in order
        assert t.state.applied_seq <= max(t.applied, t.state.resync_begin)
        assert t.applied >= before or isinstance(ev, jp.ResyncEnd)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(st.tuples(st.just("batch"), st.integers(1, 5)),
                              st.tuples(st.just("ack"), st.integers(0, 80)),
                              st.tuples(st.just("drop"), st.just(0)),
                              st.tuples(st.just("tick"), st.integers(0, 30))), max_size=40))
def test_random_source_event_sequences_are_handled_or_refused(ops: list[tuple[str, int]]) -> None:
    s = SourceSession(ME, acked_seq=0, window_bytes=8 * (BS + RECORD_OVERHEAD), heartbeat_interval_s=5, dead_after_s=20)
    now = 0.0
    s.connection_made(now)
    journal = [rec(i, i % BLOCKS, i % 256) for i in range(1, 200)]
    for op, n in ops:
        acked = s.acked_seq
        try:
            if op == "batch" and s.window_open:
                s.batch(journal[s.sent_seq:s.sent_seq + n])
            elif op == "ack":
                s.ack(n, now)
            elif op == "drop":
                s.connection_lost()
                s.connection_made(now)
            elif op == "tick":
                now += n
                for a in s.tick(now):
                    if isinstance(a, LinkDead):
                        s.connection_lost()
                        s.connection_made(now)
        except jp.ProtocolError:
            assert n > s.sent_seq and s.acked_seq == acked  # only an ACK of what was never sent
            s.connection_lost()
            s.connection_made(now)
        assert s.acked_seq >= acked  # acknowledged positions never go back
        assert s.acked_seq <= s.sent_seq or not s.in_flight
        assert s.in_flight_bytes == sum(f.wire_bytes for f in s.in_flight) >= 0
