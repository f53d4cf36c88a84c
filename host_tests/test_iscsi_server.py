"""The iSCSI socket adapter over the local unit: writes from several connections in flight at once share
one journal sync; and the `usbmirror local --iscsi` options (CHAP refusal, the USB+iSCSI refusal,
TOML keys)."""

from __future__ import annotations

import socket
import threading
import uuid
from pathlib import Path

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


def test_writes_in_flight_from_two_connections_share_one_journal_sync(tmp_path: Path) -> None:
    flash = _HeldSyncFlash(RING_OFFSET + 1024 * 1024)
    with Volume(tmp_path / "vol", size=1024 * BS, block_size=BS) as vol, \
            Journal.open(None, size=None, unit_uuid=UNIT, block_size=BS, flash=flash) as j, \
            LocalUnit(vol, j, bitmap_path=str(tmp_path / "dirty")) as unit, \
            serve_unit(unit, UnitIdentity(UNIT), host="127.0.0.1", port=0) as server:
        a = _Initiator(server.port, server.target_name)
        b = _Initiator(server.port, server.target_name)
        flash.hold = True
        a.write(0, b"\x01" * BS, itt=1)  # its sync is held: the flash is "slow"
        assert flash.entered.wait(30)
        before = flash.syncs
        a.write(1, b"\x02" * BS, itt=2)
        b.write(2, b"\x03" * BS, itt=1)
        b.write(3, b"\x04" * BS, itt=2)
        # all three reach the journal while the first sync is in progress
        for _ in range(300):
            if j.head_seq >= 4:
                break
            threading.Event().wait(0.01)
        assert j.head_seq >= 4
        flash.release.set()
        got = [a.recv(), a.recv(), b.recv(), b.recv()]
        assert all(p.opcode == PduOpcode.SCSI_RESPONSE and p.bhs[3] == 0 for p in got)
        # the held sync, then one more that the three waiting writes share
        assert flash.syncs - before == 2
        assert unit.read(0, 4) == b"\x01" * BS + b"\x02" * BS + b"\x03" * BS + b"\x04" * BS
        assert server.status()["commands"]["WRITE_10"] == 4
        a.sock.close()
        b.sock.close()


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
    assert got == {"iscsi": ("0.0.0.0", 3260), "iscsi_chap": ("alice", "s3cret-s3cret"),
                   "iscsi_initiators": ("iqn.2000-01.a:one", "iqn.2000-01.b:two")}
