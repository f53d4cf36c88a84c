"""The iSCSI socket adapter over the local unit: writes from several connections in flight at once share
one journal sync; and the `usbmirror local --iscsi` options (CHAP refusal, the USB+iSCSI refusal,
TOML keys)."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware import cli, config
from firmware.identity import UnitIdentity
from firmware.iscsi.pdu import Framer, Pdu, PduOpcode
from firmware.iscsi.server import serve_unit, unit_iqn
from firmware.journal import Journal
from firmware.journal.format import RING_OFFSET
from firmware.journal.sim import SimulatedFlash
from firmware.local_unit import LocalUnit
from firmware.volume import Volume
from host_tests.iscsi_support import INITIATOR, login_pdu, scsi_pdu

UNIT = uuid.UUID("12345678-1234-5678-1234-567812345678")
BS = 512


class _HeldSyncFlash(SimulatedFlash):
    """The first fdatasync after `hold = True` waits for `release`: a slow flash, deterministically."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def sync(self) -> None:
        if self.hold:
            self.hold = False
            self.entered.set()
            self.release.wait(30)
        super().sync()


class _Initiator:
    def __init__(self, port: int, target: str, *, isid: bytes | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.framer = Framer(max_data=1 << 24)
        keys = [("InitiatorName", INITIATOR), ("TargetName", target), ("InitialR2T", "No"),
                ("ImmediateData", "Yes")]
        login = login_pdu(keys, csg=1, nsg=3)
        if isid is not None:  # another initiator port (I_T nexus) of the same initiator
            login.bhs[8:14] = isid
        rsp = self.call(login)
        assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0)
        self.cmdsn = 1

    def send(self, pdu: Pdu) -> None:
        self.sock.sendall(pdu.encode())

    def recv(self) -> Pdu:
        while True:
            item = self.framer.next()
            if item is not None:
                assert isinstance(item, Pdu)
                return item
            data = self.sock.recv(65536)
            assert data, "target closed the connection"
            self.framer.feed(data)

    def call(self, pdu: Pdu) -> Pdu:
        self.send(pdu)
        return self.recv()

    def write(self, lba: int, data: bytes, itt: int) -> None:
        cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + (len(data) // BS).to_bytes(2, "big") + b"\0"
        self.send(scsi_pdu(cdb, itt=itt, cmdsn=self.cmdsn, edtl=len(data), write=True, data=data))
        self.cmdsn += 1


@contextlib.contextmanager
def _served(tmp_path: Path, flash: SimulatedFlash) -> Iterator[tuple[Journal, LocalUnit, Any]]:
    """A local unit with its journal on `flash`, served over iSCSI on a free loopback port."""
    with Volume(tmp_path / "vol", size=1024 * BS, block_size=BS) as vol, \
            Journal.open(None, size=None, unit_uuid=UNIT, block_size=BS, flash=flash) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as unit, \
            serve_unit(unit, UnitIdentity(UNIT), host="127.0.0.1", port=0) as server:
        yield j, unit, server


def test_writes_that_arrive_together_share_one_journal_sync(tmp_path: Path) -> None:
    flash = SimulatedFlash(RING_OFFSET + 1024 * 1024)
    with _served(tmp_path, flash) as (j, unit, server):
        a = _Initiator(server.port, server.target_name)
        before = flash.syncs
        pdus = []
        for i in range(8):
            cdb = bytes([0x2A, 0]) + i.to_bytes(4, "big") + b"\0\0\x01\0"
            pdus.append(scsi_pdu(cdb, itt=i + 1, cmdsn=a.cmdsn + i, edtl=BS, write=True, data=bytes([i + 1]) * BS))
        a.sock.sendall(b"".join(p.encode() for p in pdus))  # one segment on loopback: one batch
        got = sorted((p.itt, p.bhs[3]) for p in (a.recv() for _ in range(8)))
        assert got == [(i + 1, 0) for i in range(8)]
        assert flash.syncs - before == 1  # eight writes, one journal fdatasync
        assert j.durable_seq == j.head_seq == 8
        assert unit.read(0, 8) == b"".join(bytes([i + 1]) * BS for i in range(8))
        assert server.status()["commands"]["WRITE_10"] == 8
        a.sock.close()


def test_reserve_conflicts_across_sessions_and_ends_when_its_session_drops(tmp_path: Path) -> None:
    reserve6, tur = bytes([0x16, 0, 0, 0, 0, 0]), bytes(6)
    with Volume(tmp_path / "vol", size=64 * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=16384 + 128 * 1024, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as unit, \
            serve_unit(unit, UnitIdentity(UNIT), host="127.0.0.1", port=0) as server:
        a = _Initiator(server.port, server.target_name, isid=b"\x80\x00\x00\x00\x00\x01")
        b = _Initiator(server.port, server.target_name, isid=b"\x80\x00\x00\x00\x00\x02")
        assert a.call(scsi_pdu(reserve6, itt=1, cmdsn=1)).bhs[3] == 0
        assert b.call(scsi_pdu(tur, itt=1, cmdsn=1)).bhs[3] == 0x18  # RESERVATION CONFLICT
        assert b.call(scsi_pdu(reserve6, itt=2, cmdsn=2)).bhs[3] == 0x18
        assert a.call(scsi_pdu(tur, itt=2, cmdsn=2)).bhs[3] == 0  # the holder is served
        a.sock.close()  # the holder's nexus is lost: its reservation ends (SPC-2)
        for _ in range(300):
            if len(server.status()["sessions"]) == 1:  # type: ignore[arg-type]
                break
            threading.Event().wait(0.01)
        assert b.call(scsi_pdu(reserve6, itt=3, cmdsn=3)).bhs[3] == 0
        b.sock.close()


def test_chap_refuses_a_login_without_credentials(tmp_path: Path) -> None:
    with Volume(tmp_path / "vol", size=64 * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=16384 + 128 * 1024, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as unit, \
            serve_unit(unit, UnitIdentity(UNIT), host="127.0.0.1", port=0, chap=("alice", "s3cret-s3cret")) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(login_pdu([("InitiatorName", INITIATOR), ("TargetName", unit_iqn(UNIT)),
                                 ("AuthMethod", "None")], csg=0, nsg=1).encode())
            framer = Framer()
            while (rsp := framer.next()) is None:
                data = s.recv(4096)
                assert data
                framer.feed(data)
            assert isinstance(rsp, Pdu) and (rsp.bhs[36], rsp.bhs[37]) == (0x02, 0x01)
            assert s.recv(4096) == b""  # and the connection is closed
        for _ in range(300):
            if srv.status()["logins_refused"] == 1:
                break
            threading.Event().wait(0.01)
        assert srv.status()["logins_refused"] == 1


def _local_opts(*argv: str) -> dict[str, object]:
    ns = cli.build_parser().parse_args(["local", "--volume", "/srv/x.img", *argv])
    return config.merge_options(ns, config.LOCAL_OPTS, {})


def test_iscsi_beside_usb_is_refused_unless_asked_for() -> None:
    with pytest.raises(config.UsageError, match="iscsi-with-usb"):
        config.iscsi_options(_local_opts("--iscsi", "127.0.0.1:3260", "--usbip", "127.0.0.1:3240"))
    got = config.iscsi_options(_local_opts("--iscsi", "127.0.0.1:3260", "--usbip", "127.0.0.1:3240",
                                         "--iscsi-with-usb", "on"))
    assert got["iscsi"] == ("127.0.0.1", 3260)


def test_iscsi_chap_and_acl_options(tmp_path: Path) -> None:
    with pytest.raises(config.UsageError, match="12 to 255"):
        config.iscsi_options(_local_opts("--iscsi", "h:3260", "--iscsi-chap", "alice:short"))
    with pytest.raises(config.UsageError, match="need --iscsi"):
        config.iscsi_options(_local_opts("--iscsi-chap", "alice:s3cret-s3cret"))
    cfg = tmp_path / "local.toml"
    cfg.write_text('volume = "/srv/x.img"\niscsi = "0.0.0.0:3260"\niscsi_chap = "alice:s3cret-s3cret"\n'
                   'iscsi_initiator = ["iqn.2000-01.a:one", "iqn.2000-01.b:two"]\n')
    ns = cli.build_parser().parse_args(["local", "--config", str(cfg)])
    got = config.iscsi_options(config.merge_options(ns, config.LOCAL_OPTS, config.load_config(ns.config)))
    assert got == {"iscsi": ("0.0.0.0", 3260), "iscsi_chap": ("alice", "s3cret-s3cret"), "iscsi_mutual_chap": None,
                   "iscsi_portal": None, "iscsi_initiators": ("iqn.2000-01.a:one", "iqn.2000-01.b:two")}


def test_iscsi_mutual_chap_and_portal_options(tmp_path: Path) -> None:
    with pytest.raises(config.UsageError, match="needs --iscsi-chap"):
        config.iscsi_options(_local_opts("--iscsi", "h:3260", "--iscsi-mutual-chap", "bob:an0ther-s3cret"))
    with pytest.raises(config.UsageError, match="secret of its own"):
        config.iscsi_options(_local_opts("--iscsi", "h:3260", "--iscsi-chap", "alice:s3cret-s3cret",
                                         "--iscsi-mutual-chap", "bob:s3cret-s3cret"))
    with pytest.raises(config.UsageError, match="iscsi-mutual-chap expects USER:SECRET"):
        config.iscsi_options(_local_opts("--iscsi", "h:3260", "--iscsi-chap", "alice:s3cret-s3cret",
                                         "--iscsi-mutual-chap", "bob:short"))
    with pytest.raises(config.UsageError, match="--iscsi-portal"):
        config.iscsi_options(_local_opts("--iscsi", "h:3260", "--iscsi-portal", "no-port"))
    cfg = tmp_path / "local.toml"
    cfg.write_text('volume = "/srv/x.img"\niscsi = "0.0.0.0:3260"\niscsi_chap = "alice:s3cret-s3cret"\n'
                   'iscsi_mutual_chap = "bob:an0ther-s3cret"\niscsi_portal = "203.0.113.9:3260"\n')
    ns = cli.build_parser().parse_args(["local", "--config", str(cfg)])
    got = config.iscsi_options(config.merge_options(ns, config.LOCAL_OPTS, config.load_config(ns.config)))
    assert got["iscsi_mutual_chap"] == ("bob", "an0ther-s3cret") and got["iscsi_portal"] == "203.0.113.9:3260"


def test_sendtargets_advertises_the_configured_portal_else_the_address_reached(tmp_path: Path) -> None:
    from firmware.iscsi.pdu import build_text, parse_text

    def discover(port: int) -> list[tuple[str, str]]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            framer = Framer()

            def call(pdu: Pdu) -> Pdu:
                s.sendall(pdu.encode())
                while (rsp := framer.next()) is None:
                    data = s.recv(65536)
                    assert data
                    framer.feed(data)
                assert isinstance(rsp, Pdu)
                return rsp

            rsp = call(login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery")], csg=1, nsg=3))
            assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0)
            text = Pdu.new(PduOpcode.TEXT_REQUEST, flags=0x80, immediate=True)
            text.set_u32(16, 5)
            text.set_u32(20, 0xFFFFFFFF)
            text.set_u32(24, 1)
            text.data = build_text([("SendTargets", "All")])
            return parse_text(call(text).data)

    with Volume(tmp_path / "vol", size=64 * BS, block_size=BS) as vol:
        with serve_unit(vol, UnitIdentity(UNIT), host="127.0.0.1", port=0, portal="203.0.113.9:3260") as server:
            assert discover(server.port) == [("TargetName", unit_iqn(UNIT)), ("TargetAddress", "203.0.113.9:3260,1")]
        with serve_unit(vol, UnitIdentity(UNIT), host="127.0.0.1", port=0) as server:
            assert discover(server.port) == [("TargetName", unit_iqn(UNIT)),
                                             ("TargetAddress", f"127.0.0.1:{server.port},1")]


class _FailingSyncFlash(SimulatedFlash):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.fail = False

    def sync(self) -> None:
        if self.fail:
            raise OSError(5, "flash gone")
        super().sync()


def _nop_out(itt: int, cmdsn: int, *, ttt: int = 0xFFFFFFFF, immediate: bool = True) -> Pdu:
    pdu = Pdu.new(PduOpcode.NOP_OUT, flags=0x80, immediate=immediate)
    pdu.set_u32(16, itt)
    pdu.set_u32(20, ttt)
    pdu.set_u32(24, cmdsn)
    return pdu


def test_a_write_is_answered_only_once_durable_and_the_connection_stays_served_meanwhile(tmp_path: Path) -> None:
    flash = _HeldSyncFlash(RING_OFFSET + 1024 * 1024)
    with _served(tmp_path, flash) as (j, unit, server):
        a = _Initiator(server.port, server.target_name)
        flash.hold = True
        a.write(5, b"\x05" * BS, itt=1)
        assert flash.entered.wait(30)
        # the record is in the journal but not durable: a ping sent after the write is answered
        # first, the write only once its sync is through
        a.send(_nop_out(0x77, a.cmdsn))
        first = a.recv()
        assert first.opcode == PduOpcode.NOP_IN and first.itt == 0x77
        assert j.durable_seq < j.head_seq
        flash.release.set()
        rsp = a.recv()
        assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.itt == 1 and rsp.bhs[3] == 0
        assert j.durable_seq == j.head_seq
        assert unit.read(5, 1) == b"\x05" * BS
        a.sock.close()


class _GatedSyncFlash(SimulatedFlash):
    """While `gated`, each sync covers the writes made before it started (as fdatasync does) and
    waits for its own gate, handed out in `started`."""

    parallel_syncs = 1

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gated = False
        self.started: queue.Queue[threading.Event] = queue.Queue()

    def sync(self) -> None:
        if not self.gated:
            super().sync()
            return
        covers = self.sync_begin()
        gate = threading.Event()
        self.started.put(gate)
        assert gate.wait(30)
        self.sync_end(covers)


def test_a_write_that_arrives_while_a_sync_is_in_flight_waits_for_a_sync_of_its_own(tmp_path: Path) -> None:
    flash = _GatedSyncFlash(RING_OFFSET + 1024 * 1024)
    with _served(tmp_path, flash) as (j, _unit, server):
        a = _Initiator(server.port, server.target_name)
        flash.gated = True
        a.write(1, b"\x01" * BS, itt=1)
        first = flash.started.get(timeout=30)  # write 1's sync is in flight
        a.write(2, b"\x02" * BS, itt=2)  # journaled now, not covered by that sync
        deadline = time.monotonic() + 30
        while j.head_seq < 2 and time.monotonic() < deadline:  # the reader takes it
            time.sleep(0.005)
        assert j.head_seq == 2
        first.set()
        rsp = a.recv()
        assert (rsp.opcode, rsp.itt, rsp.bhs[3]) == (PduOpcode.SCSI_RESPONSE, 1, 0)
        second = flash.started.get(timeout=30)  # write 2 waits for a sync that started after it
        assert j.durable_seq == 1
        a.send(_nop_out(0x78, a.cmdsn))
        ping = a.recv()  # still no answer to write 2: the ping's comes first
        assert (ping.opcode, ping.itt) == (PduOpcode.NOP_IN, 0x78)
        second.set()
        rsp = a.recv()
        assert (rsp.opcode, rsp.itt, rsp.bhs[3]) == (PduOpcode.SCSI_RESPONSE, 2, 0)
        assert j.durable_seq == 2
        flash.gated = False
        a.sock.close()


def test_writes_whose_journal_sync_fails_get_medium_error_not_good(tmp_path: Path) -> None:
    flash = _FailingSyncFlash(RING_OFFSET + 1024 * 1024)
    with _served(tmp_path, flash) as (j, _unit, server):
        a = _Initiator(server.port, server.target_name)
        flash.fail = True
        a.write(0, b"\x01" * BS, itt=1)
        a.write(1, b"\x02" * BS, itt=2)
        for rsp in (a.recv(), a.recv()):
            assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.bhs[3] == 0x02  # CHECK CONDITION
            sense = rsp.data[2:]
            assert (sense[2] & 0x0F, sense[12]) == (0x03, 0x0C)  # MEDIUM ERROR, WRITE ERROR
        a.sock.close()
        assert j.durable_seq == 0


def test_an_idle_initiator_is_pinged_and_one_that_does_not_answer_is_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Volume(tmp_path / "vol", size=64 * BS, block_size=BS) as vol, \
            Journal.open(tmp_path / "journal", size=16384 + 128 * 1024, unit_uuid=UNIT, block_size=BS) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as unit, \
            serve_unit(unit, UnitIdentity(UNIT), host="127.0.0.1", port=0, nop_interval=0.2, nop_timeout=0.5) as server:
        alive = _Initiator(server.port, server.target_name)
        dead = _Initiator(server.port, server.target_name)
        for _ in range(2):  # two pings in a row, each answered: the connection stays
            ping = alive.recv()
            assert ping.opcode == PduOpcode.NOP_IN and ping.itt == 0xFFFFFFFF and ping.u32(20) != 0xFFFFFFFF
            alive.send(_nop_out(0xFFFFFFFF, alive.cmdsn, ttt=ping.u32(20)))
        ping = dead.recv()
        assert ping.opcode == PduOpcode.NOP_IN and ping.itt == 0xFFFFFFFF
        dead.sock.settimeout(30)
        while dead.sock.recv(4096):  # no answer: the target closes the connection
            pass
        assert server.status()["dropped_idle"] == 1
        assert "no answer to a NOP-In" in caplog.text
        assert alive.call(scsi_pdu(bytes(6), itt=9, cmdsn=alive.cmdsn)).bhs[3] == 0  # still served
        alive.sock.close()


def test_a_logout_releases_the_reservation_before_it_is_answered(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """RESERVE(6) ends with the nexus (libiscsi's Reserve6.Logout): once the initiator has its Logout
    Response, another initiator port may write. The connection's own end is slowed down here, so a
    release that waited for it would be seen as a RESERVATION CONFLICT."""
    import firmware.iscsi.server as srv
    real_shutdown = srv._shutdown

    def slow_shutdown(sock: socket.socket) -> None:
        time.sleep(1.5)
        real_shutdown(sock)

    monkeypatch.setattr(srv, "_shutdown", slow_shutdown)
    with _served(tmp_path, SimulatedFlash(RING_OFFSET + 1024 * 1024)) as (_j, _unit, server):
        a = _Initiator(server.port, server.target_name)
        rsp = a.call(scsi_pdu(bytes([0x16, 0, 0, 0, 0, 0]), itt=1, cmdsn=a.cmdsn))  # RESERVE(6)
        assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.bhs[3] == 0
        a.cmdsn += 1
        b = _Initiator(server.port, server.target_name, isid=b"\x80\x00\x00\x00\x00\x02")
        b.write(7, b"\x07" * BS, itt=1)
        assert b.recv().bhs[3] == 0x18  # RESERVATION CONFLICT while A holds it
        logout = Pdu.new(PduOpcode.LOGOUT_REQUEST, flags=0x80, immediate=True)
        logout.set_u32(16, 2)
        logout.set_u32(24, a.cmdsn)
        rsp = a.call(logout)
        assert rsp.opcode == PduOpcode.LOGOUT_RESPONSE and rsp.bhs[2] == 0
        b.write(7, b"\x07" * BS, itt=2)
        rsp = b.recv()
        assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.bhs[3] == 0, f"status {rsp.bhs[3]:#x} after the logout"
        a.sock.close()
        b.sock.close()
