"""The remote unit driven by a hand-written source over a plaintext loopback socket: in-order apply,
duplicates skipped, gaps and out-of-range records refused, position durable across restarts, and the
resync undo log restoring the consistent image when a resync is interrupted."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from firmware.link import protocol as jp
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from firmware.storage import WriteError

BS = 512
SIZE = 1 << 20
UUID = bytes(range(16))


class Source:
    """A minimal source speaking the journey protocol over a blocking socket."""

    def __init__(self, port: int, source_id: str = "s1", gen: int = 1) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = jp.JourneyConnection(jp.Role.SOURCE)
        self.sock.sendall(self.conn.send(jp.Hello(source_id, UUID, SIZE, BS, gen, 0)))
        self.reply = self.recv()

    def send(self, ev: jp.Event) -> None:
        self.sock.sendall(self.conn.send(ev))

    def recv(self) -> jp.Event:
        while True:
            ev = self.conn.next_event()
            if not isinstance(ev, jp.NeedData):
                return ev
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("closed")
            self.conn.receive_data(data)

    def ack_upto(self, seq: int) -> None:
        """Read cumulative ACKs until `seq` is acknowledged (the remote may split them)."""
        while True:
            ev = self.recv()
            assert isinstance(ev, jp.Ack), ev
            if ev.seq >= seq:
                assert ev.seq == seq
                return

    def close(self) -> None:
        self.sock.close()


def w(seq: int, lba: int, fill: int, count: int = 1) -> jp.Record:
    return jp.Record(seq, jp.RecordKind.WRITE, lba, count, 0, bytes([fill]) * (BS * count))


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[RemoteUnit]:
    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", targets={"s1": str(tmp_path / "t.img")},
                           tls_dir=None, state_dir=str(tmp_path / "state"), heartbeat_timeout_s=5)
    with RemoteUnit(cfg) as ru:
        yield ru


def restart(ru: RemoteUnit) -> RemoteUnit:
    ru.stop()
    new = RemoteUnit(ru.cfg)
    new.start()
    return new


def block(path: str, lba: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(BS)


def test_new_target_then_in_order_apply_and_duplicates_skipped(remote: RemoteUnit) -> None:
    s = Source(remote.port)
    assert isinstance(s.reply, jp.HelloReply)
    assert s.reply.flags & jp.ReplyFlag.NEW_TARGET and s.reply.applied_seq == 0
    s.send(jp.Batch(0, (w(1, 0, 1), w(2, 1, 2), w(3, 0, 3))))
    s.ack_upto(3)
    s.send(jp.Batch(1, (w(2, 1, 2), w(3, 0, 3), w(4, 2, 4))))  # overlaps what is applied
    s.ack_upto(4)
    t = remote.targets["s1"]
    assert t.records_applied == 4 and t.duplicates_skipped == 2
    assert block(t.path, 0) == bytes([3]) * BS and block(t.path, 2) == bytes([4]) * BS
    state = json.loads(Path(remote.cfg.state_dir, "s1.json").read_text())
    assert state["applied_seq"] == 4 and state["volume_uuid"] == UUID.hex()
    s.close()


def test_gap_and_out_of_range_refused(remote: RemoteUnit) -> None:
    s = Source(remote.port)
    s.send(jp.Batch(0, (w(1, 0, 1),)))
    s.ack_upto(1)
    s.send(jp.Batch(5, (w(6, 0, 9),)))  # records 2..5 missing
    ev = s.recv()
    assert isinstance(ev, jp.Error) and ev.code is jp.ErrorCode.SEQUENCE
    s.close()
    s = Source(remote.port)
    assert isinstance(s.reply, jp.HelloReply) and s.reply.applied_seq == 1
    s.send(jp.Batch(1, (w(2, SIZE // BS, 1),)))  # past the end of the volume
    ev = s.recv()
    assert isinstance(ev, jp.Error) and ev.code is jp.ErrorCode.BAD_FRAME and "outside" in ev.message
    s.close()
    assert block(remote.targets["s1"].path, 0) == bytes([1]) * BS


def test_position_survives_restart(remote: RemoteUnit) -> None:
    s = Source(remote.port)
    s.send(jp.Batch(0, tuple(w(i, i, i) for i in range(1, 11))))
    s.ack_upto(10)
    s.close()
    ru = restart(remote)
    try:
        s = Source(ru.port)
        assert isinstance(s.reply, jp.HelloReply)
        assert s.reply.applied_seq == 10 and not s.reply.flags & jp.ReplyFlag.NEW_TARGET
        s.close()
    finally:
        ru.stop()


def test_interrupted_resync_keeps_consistent_image_via_undo(remote: RemoteUnit) -> None:
    s = Source(remote.port)
    s.send(jp.Batch(0, tuple(w(i, i * 8, 0x10 + i, 8) for i in range(1, 6))))
    s.ack_upto(5)
    t = remote.targets["s1"]
    consistent = Path(t.path).read_bytes()
    # a resync starts, copies two regions, then the link dies before the copy is finished
    s.send(jp.ResyncBegin(5, 128, 16))
    s.send(jp.DigestRequest(0, 2, 128))
    d = s.recv()
    assert isinstance(d, jp.RegionDigests) and d.digests[0] == jp.region_digest(consistent[: 128 * BS])
    s.send(jp.RegionData(0, b"\xee" * (128 * BS)))
    s.send(jp.RegionData(128, b"\xdd" * (128 * BS)))
    s.send(jp.Heartbeat(1))
    assert s.recv() == jp.Heartbeat(1)
    s.close()
    ru = restart(remote)
    try:
        s = Source(ru.port)
        assert isinstance(s.reply, jp.HelloReply) and s.reply.flags & jp.ReplyFlag.RESYNC_IN_PROGRESS
        s.close()
        st = ru.status()["sources"][0]
        assert st["consistent"] is False and st["rollback_available"] is True
        assert Path(ru.targets["s1"].path).read_bytes() != consistent
        assert ru.rollback_resync("s1")
        assert Path(ru.targets["s1"].path).read_bytes() == consistent
        assert ru.targets["s1"].state.applied_seq == 5
        assert not Path(ru.cfg.state_dir, "s1.undo").exists()
    finally:
        ru.stop()


def test_completed_resync_drops_undo_log(remote: RemoteUnit) -> None:
    s = Source(remote.port)
    s.send(jp.Batch(0, (w(1, 0, 1),)))
    s.ack_upto(1)
    s.send(jp.ResyncBegin(1, 128, 1))
    s.send(jp.RegionData(0, b"\x07" * (128 * BS)))
    s.send(jp.ResyncEnd(3))
    s.ack_upto(1)
    assert Path(remote.cfg.state_dir, "s1.undo").exists()  # not consistent before seq 3 is applied
    s.send(jp.Batch(1, (w(2, 5, 2), w(3, 6, 3))))
    s.ack_upto(3)
    assert not Path(remote.cfg.state_dir, "s1.undo").exists()
    assert remote.status()["sources"][0]["consistent"] is True
    s.close()


def test_records_before_resync_end_refused(remote: RemoteUnit) -> None:
    s = Source(remote.port)
    s.send(jp.ResyncBegin(0, 128, 1))
    s.send(jp.Batch(0, (w(1, 0, 1),)))
    ev = s.recv()
    assert isinstance(ev, jp.Error) and ev.code is jp.ErrorCode.SEQUENCE
    s.close()


def test_target_smaller_than_volume_refused(tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(bytes(SIZE // 2))
    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", targets={"s1": str(small)}, tls_dir=None,
                           state_dir=str(tmp_path / "state"))
    with RemoteUnit(cfg) as ru:
        s = Source(ru.port)
        assert isinstance(s.reply, jp.Error) and s.reply.code is jp.ErrorCode.VOLUME_MISMATCH
        s.close()
    assert os.path.getsize(small) == SIZE // 2


def test_undo_log_drops_a_torn_tail_and_restores(tmp_path: Path) -> None:
    from firmware.remote_unit import UndoLog
    from firmware.volume import Volume

    with Volume(tmp_path / "v.img", size=SIZE, block_size=BS) as vol:
        vol.write(0, b"\x11" * (SIZE // 2) + b"\x22" * (SIZE // 2))
        original = vol.read(0, SIZE // BS)
        undo = UndoLog(tmp_path / "u.undo", BS)
        undo.protect(vol, SIZE // BS, 10, 3)  # one 64 KiB chunk
        undo.protect(vol, SIZE // BS, 1500, 200)  # blocks 1500..1699: chunks 11, 12, 13
        undo.protect(vol, SIZE // BS, 12, 1)  # already saved: nothing new
        vol.write(0, b"\x99" * (SIZE // 4))
        vol.write(1500, b"\x77" * (200 * BS))
        undo.close()
        with open(tmp_path / "u.undo", "ab") as f:
            f.write(b"\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x02\x00torn")  # a crash mid-append
        again = UndoLog(tmp_path / "u.undo", BS)
        assert again.saved == {0, 11, 12, 13}
        entries = again.entries()
        assert [lba for lba, _ in entries] == [0, 1408, 1536, 1664]
        for lba, data in entries:
            vol.write_nosync(lba, data)
        again.close()
        restored = vol.read(0, SIZE // BS)
    # the chunks the resync touched are back; the rest was not protected and stays as written
    assert restored[:128 * BS] == original[:128 * BS]
    assert restored[1408 * BS:1792 * BS] == original[1408 * BS:1792 * BS]
    assert restored[128 * BS:256 * BS] == b"\x99" * (128 * BS)


def test_two_sources_cannot_share_a_target(tmp_path: Path) -> None:
    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1",
                           targets={"a": str(tmp_path / "t.img"), "b": str(tmp_path / "." / "t.img")},
                           tls_dir=None, state_dir=str(tmp_path / "state"))
    with pytest.raises(ValueError, match="each source needs its own target"):
        RemoteUnit(cfg)


def test_corrupt_frame_answered_with_bad_frame_error(remote: RemoteUnit) -> None:
    s = Source(remote.port)
    frame = bytearray(s.conn.send(jp.Batch(0, (w(1, 0, 1),))))
    frame[30] ^= 0xFF
    s.sock.sendall(bytes(frame))
    ev = s.recv()
    assert isinstance(ev, jp.Error) and ev.code is jp.ErrorCode.BAD_FRAME and "CRC32C" in ev.message
    s.close()
    assert remote.targets["s1"].records_applied == 0
    assert "CRC32C" in remote.status()["sources"][0]["last_error"]


def test_garbage_instead_of_hello_is_refused_with_an_error(remote: RemoteUnit) -> None:
    sock = socket.create_connection(("127.0.0.1", remote.port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn = jp.JourneyConnection(jp.Role.SOURCE)
    conn.state = jp.ConnState.AWAIT_REPLY  # as if it had sent a HELLO: lets it read the answer
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    sock.close()
    conn.receive_data(data)
    ev = conn.next_event()
    assert isinstance(ev, jp.Error) and ev.code is jp.ErrorCode.BAD_FRAME


@pytest.mark.parametrize("restart_between", [False, True])
def test_replaced_target_file_is_not_trusted(remote: RemoteUnit, restart_between: bool) -> None:
    s = Source(remote.port)
    s.send(jp.Batch(0, (w(1, 0, 1),)))
    s.ack_upto(1)
    s.close()
    ru = restart(remote) if restart_between else remote
    try:
        s = Source(ru.port)  # same file: trusted
        assert isinstance(s.reply, jp.HelloReply) and not s.reply.flags & jp.ReplyFlag.NEW_TARGET
        s.close()
        t = Path(ru.targets["s1"].path)
        t.unlink()  # an operator puts another image in its place
        t.write_bytes(bytes(SIZE))
        s = Source(ru.port)
        assert isinstance(s.reply, jp.HelloReply) and s.reply.flags & jp.ReplyFlag.NEW_TARGET
        s.send(jp.Batch(1, (w(2, 3, 2),)))  # a source that ignored the flag is refused
        ev = s.recv()
        assert isinstance(ev, jp.Error) and ev.code is jp.ErrorCode.SEQUENCE
        s.close()
        assert block(str(t), 3) == bytes(BS)
    finally:
        if restart_between:
            ru.stop()


class RecordingHook:
    """An ApplyHook that records what the target held just before each overwrite."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.before: list[tuple[int, bytes]] = []

    def before_apply(self, records: Sequence[jp.RecordLike], read: Callable[[int, int], bytes]) -> None:
        if self.fail:
            raise WriteError("history full")
        self.before += [(r.seq, read(r.lba, r.count)) for r in records if r.kind == jp.RecordKind.WRITE]

    def before_region(self, lba: int, count: int, read: Callable[[int, int], bytes]) -> None:
        self.before.append((-1, read(lba, count)))

    def resync_begin(self, base_seq: int, time_ns: int) -> None:
        pass


def test_apply_hook_sees_the_old_blocks_before_each_overwrite(remote: RemoteUnit) -> None:
    hook = RecordingHook()
    remote.targets["s1"].store.add_hook(hook)
    s = Source(remote.port)
    s.send(jp.Batch(0, (w(1, 3, 0x11), w(2, 3, 0x22))))
    s.ack_upto(2)
    s.send(jp.Batch(2, (w(3, 3, 0x33),)))
    s.ack_upto(3)
    s.close()
    # one call per batch, before any of its records is written: record 2's old block is still
    # what was there before the batch (a history engine lays earlier records of the batch over it)
    assert hook.before == [(1, bytes(BS)), (2, bytes(BS)), (3, bytes([0x22]) * BS)]


def test_a_failing_apply_hook_stops_the_apply_and_the_ack(remote: RemoteUnit) -> None:
    remote.targets["s1"].store.add_hook(RecordingHook(fail=True))
    s = Source(remote.port)
    s.send(jp.Batch(0, (w(1, 3, 0x11),)))
    err = s.recv()
    assert isinstance(err, jp.Error) and err.code is jp.ErrorCode.TARGET_IO and "history full" in err.message
    s.close()
    t = remote.targets["s1"]
    assert block(t.path, 3) == bytes(BS) and t.records_applied == 0 and t.state.applied_seq == 0


def test_a_refusal_repeated_by_a_retrying_source_is_logged_once_a_minute_with_its_count(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from firmware import remote_unit as ru
    from firmware.replication.target import Refused

    clock = [1000.0]
    monkeypatch.setattr(ru.time, "monotonic", lambda: clock[0])
    holder = type("Holder", (), {"_refusals_logged": {}})()
    primary = Refused(jp.ErrorCode.PRIMARY, "remote dr1 is primary for source s1 now")
    caplog.set_level("DEBUG", logger="firmware.remote_unit")
    for step in range(30):  # a source asking every 2 s for a minute
        ru.RemoteUnit.log_refusal(holder, f"10.0.0.2:{40000 + step}", primary)  # type: ignore[arg-type]
        clock[0] += 2.0
    other = Refused(jp.ErrorCode.PERMISSION_DENIED, "not remote:r2")
    ru.RemoteUnit.log_refusal(holder, "10.0.0.3:1", other)  # type: ignore[arg-type]
    ru.RemoteUnit.log_refusal(holder, "10.0.0.2:2", primary)  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings
    assert "code=PRIMARY" in warnings[0] and "repeated" not in warnings[0]
    assert "code=PERMISSION_DENIED" in warnings[1]  # another refusal is not held back
    assert "repeated=29 in the last 60 s" in warnings[2], warnings[2]
