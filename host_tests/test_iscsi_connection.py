"""The sans-IO iSCSI connection: login, negotiation, commands and data, windows, task management,
logout, and bad input (RFC 7143)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.iscsi.connection import TargetConfig
from firmware.iscsi.pdu import RESERVED_TAG, Framer, Pdu, PduOpcode, build_text, crc32c, parse_text
from host_tests.iscsi_support import (
    INITIATOR,
    TARGET,
    Harness,
    chap_response,
    data_out_pdu,
    login_pdu,
    scsi_pdu,
    sense_of,
)

INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
TUR = bytes(6)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def status_sn(rsp: Pdu) -> int:
    return rsp.u32(24)


# ---- PDU framing --------------------------------------------------------------------------------


def test_pdu_roundtrip_with_digests_and_padding() -> None:
    pdu = Pdu.new(PduOpcode.NOP_OUT, flags=0x80)
    pdu.set_u32(16, 7)
    pdu.data = b"abcde"
    raw = pdu.encode(header_digest=True, data_digest=True)
    assert len(raw) == 48 + 4 + 8 + 4
    framer = Framer()
    framer.header_digest = framer.data_digest = True
    for i in range(len(raw)):  # byte by byte: framing never depends on read sizes
        framer.feed(raw[i : i + 1])
        got = framer.next()
        if i < len(raw) - 1:
            assert got is None
    assert isinstance(got, Pdu)
    assert got.itt == 7 and got.data == b"abcde"


def test_crc32c_known_value() -> None:
    # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_text_roundtrip() -> None:
    pairs = [("A", "1"), ("B", ""), ("C", "x=y")]
    assert parse_text(build_text(pairs)) == pairs


# ---- login --------------------------------------------------------------------------------------


def test_login_negotiates_and_enters_full_feature() -> None:
    h = Harness()
    rsp = h.login([("MaxBurstLength", "16777215"), ("FirstBurstLength", "1000000"), ("InitialR2T", "No"),
                   ("ImmediateData", "Yes"), ("MaxOutstandingR2T", "16"), ("MaxRecvDataSegmentLength", "4096"),
                   ("X-com.example.Foo", "1")])
    keys = dict(parse_text(rsp.data))
    assert rsp.flags & 0x80 and rsp.flags & 0x03 == 3
    assert int.from_bytes(rsp.bhs[14:16], "big") != 0  # TSIH
    assert keys["MaxBurstLength"] == str(1024 * 1024)
    assert keys["FirstBurstLength"] == str(256 * 1024)
    assert keys["InitialR2T"] == "No" and keys["ImmediateData"] == "Yes"
    assert keys["MaxOutstandingR2T"] == "8"
    assert keys["X-com.example.Foo"] == "NotUnderstood"
    assert keys["TargetPortalGroupTag"] == "1"
    assert "MaxRecvDataSegmentLength" in keys
    assert h.conn.params.max_recv_data_segment_initiator == 4096
    assert status_sn(rsp) == 100  # the first StatSN is the initiator's ExpStatSN
    assert rsp.u32(28) == 1  # ExpCmdSN: the login's CmdSN


def test_login_to_unknown_target_is_refused() -> None:
    h = Harness()
    (rsp,) = h.send(login_pdu([("InitiatorName", INITIATOR), ("TargetName", "iqn.2000-01.x:other")], csg=1, nsg=3))
    assert (rsp.bhs[36], rsp.bhs[37]) == (0x02, 0x03)
    assert h.conn.closed


def test_login_without_initiator_name_is_refused() -> None:
    h = Harness()
    (rsp,) = h.send(login_pdu([("TargetName", TARGET)], csg=1, nsg=3))
    assert (rsp.bhs[36], rsp.bhs[37]) == (0x02, 0x07)
    assert h.conn.closed


def test_acl_refuses_other_initiators() -> None:
    cfg = TargetConfig(target_name=TARGET, portal="h:1", allowed_initiators=frozenset({"iqn.2000-01.x:allowed"}))
    h = Harness(config=cfg)
    (rsp,) = h.send(login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=1, nsg=3))
    assert (rsp.bhs[36], rsp.bhs[37]) == (0x02, 0x02)
    assert h.conn.closed


def _chap_login(h: Harness, secret: str, user: str = "alice") -> Pdu:
    base = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP,None")]
    (rsp,) = h.send(login_pdu(base, csg=0, nsg=1))
    assert dict(parse_text(rsp.data))["AuthMethod"] == "CHAP"
    assert not rsp.flags & 0x80  # no transit before authentication
    (rsp,) = h.send(login_pdu([("CHAP_A", "5")], csg=0, nsg=1, transit=False))
    keys = dict(parse_text(rsp.data))
    assert keys["CHAP_A"] == "5"
    answer = chap_response(int(keys["CHAP_I"]), secret, keys["CHAP_C"])
    (rsp,) = h.send(login_pdu([("CHAP_N", user), ("CHAP_R", answer)], csg=0, nsg=1))
    return rsp


def test_chap_accepts_the_right_secret() -> None:
    h = Harness(config=TargetConfig(target_name=TARGET, portal="h:1", chap=("alice", "s3cret-s3cret")))
    rsp = _chap_login(h, "s3cret-s3cret")
    assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0) and rsp.flags & 0x80
    (rsp,) = h.send(login_pdu([("HeaderDigest", "None")], csg=1, nsg=3))
    assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0)
    assert h.conn.phase.value == "full_feature"


def test_chap_refuses_a_wrong_secret(caplog: object) -> None:
    h = Harness(config=TargetConfig(target_name=TARGET, portal="h:1", chap=("alice", "s3cret-s3cret")))
    rsp = _chap_login(h, "wrong-secret")
    assert (rsp.bhs[36], rsp.bhs[37]) == (0x02, 0x01)
    assert h.conn.closed


_MUTUAL = TargetConfig(target_name=TARGET, portal="h:1", chap=("alice", "s3cret-s3cret"),
                       mutual_chap=("target-bob", "an0ther-s3cret"))


def _mutual_login(h: Harness, challenge: str) -> Pdu:
    base = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP")]
    h.send(login_pdu(base, csg=0, nsg=1, transit=False))
    (rsp,) = h.send(login_pdu([("CHAP_A", "5")], csg=0, nsg=1, transit=False))
    keys = dict(parse_text(rsp.data))
    answer = chap_response(int(keys["CHAP_I"]), "s3cret-s3cret", keys["CHAP_C"])
    (rsp,) = h.send(login_pdu([("CHAP_N", "alice"), ("CHAP_R", answer), ("CHAP_I", "77"), ("CHAP_C", challenge)],
                              csg=0, nsg=1))
    return rsp


def test_mutual_chap_the_target_proves_its_secret_to_the_initiator() -> None:
    h = Harness(config=_MUTUAL)
    rsp = _mutual_login(h, "0x" + bytes(range(100, 116)).hex())
    assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0) and rsp.flags & 0x80
    keys = dict(parse_text(rsp.data))
    assert keys["CHAP_N"] == "target-bob"
    assert keys["CHAP_R"] == chap_response(77, "an0ther-s3cret", "0x" + bytes(range(100, 116)).hex())
    (rsp,) = h.send(login_pdu([("HeaderDigest", "None")], csg=1, nsg=3))
    assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0) and h.conn.phase.value == "full_feature"


def test_mutual_chap_refusals() -> None:
    # the initiator asks the target to authenticate, but no mutual secret is configured
    h = Harness(config=TargetConfig(target_name=TARGET, portal="h:1", chap=("alice", "s3cret-s3cret")))
    assert _mutual_login(h, "0x" + bytes(16).hex()).bhs[36:38] == b"\x02\x01" and h.conn.closed
    # the target's own challenge sent back (a reflection attack) is refused
    h = Harness(config=_MUTUAL)
    own = "0x" + bytes(range(1, 17)).hex()  # the harness's random bytes: the target's challenge
    assert _mutual_login(h, own).bhs[36:38] == b"\x02\x01" and h.conn.closed
    h = Harness(config=_MUTUAL)
    assert _mutual_login(h, "0xzz").bhs[36:38] == b"\x02\x01" and h.conn.closed  # not a CHAP binary value
    # an initiator that does not ask still logs in with one-way CHAP
    h = Harness(config=_MUTUAL)
    rsp = _chap_login(h, "s3cret-s3cret")
    assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0) and "CHAP_R" not in dict(parse_text(rsp.data))


def test_chap_refuses_skipping_security() -> None:
    h = Harness(config=TargetConfig(target_name=TARGET, portal="h:1", chap=("alice", "s3cret-s3cret")))
    (rsp,) = h.send(login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=1, nsg=3))
    assert rsp.bhs[36] == 0x02
    assert h.conn.closed


def test_command_before_login_drops_the_connection() -> None:
    h = Harness()
    assert h.send(scsi_pdu(TUR, itt=1, cmdsn=1)) == []
    assert h.conn.closed


def test_discovery_send_targets() -> None:
    h = Harness()
    (rsp,) = h.send(login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery")], csg=1, nsg=3))
    assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0)
    text = Pdu.new(PduOpcode.TEXT_REQUEST, flags=0x80)
    text.set_u32(16, 5)
    text.set_u32(20, RESERVED_TAG)
    text.set_u32(24, 1)
    text.data = build_text([("SendTargets", "All")])
    (rsp,) = h.send(text)
    assert rsp.opcode == PduOpcode.TEXT_RESPONSE
    assert parse_text(rsp.data) == [("TargetName", TARGET), ("TargetAddress", "127.0.0.1:3260,1")]
    # a discovery session carries no SCSI
    h.send(scsi_pdu(TUR, itt=6, cmdsn=2))
    assert h.conn.closed


# ---- commands -----------------------------------------------------------------------------------


def test_inquiry_returns_data_in_with_status_and_underflow() -> None:
    h = Harness()
    h.login()
    (din,) = h.send(scsi_pdu(INQUIRY, itt=1, cmdsn=1, edtl=255, read=True))
    assert din.opcode == PduOpcode.DATA_IN and din.flags & 0x81 == 0x81  # F and S
    assert din.flags & 0x02 and din.u32(44) == 255 - len(din.data)  # residual underflow
    assert din.data[8:16] == b"USBMIRR "
    assert status_sn(din) == 101


def test_write_immediate_and_r2t_then_read_back() -> None:
    h = Harness()
    h.login([("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("MaxBurstLength", "1024"),
             ("FirstBurstLength", "512"), ("MaxOutstandingR2T", "1")])
    payload = bytes(range(256)) * 8  # 4 blocks
    out = h.send(scsi_pdu(write10(10, 4), itt=2, cmdsn=1, edtl=2048, write=True, data=payload[:512]))
    (r2t,) = out
    assert r2t.opcode == PduOpcode.R2T and r2t.u32(40) == 512 and r2t.u32(44) == 1024
    assert h.store.read(10, 1) == bytes(512)  # nothing is written before all the data is there
    (r2t2,) = h.send(data_out_pdu(itt=2, ttt=r2t.u32(20), offset=512, data=payload[512:1536]))
    assert (r2t2.u32(40), r2t2.u32(44), r2t2.u32(36)) == (1536, 512, 1)
    (rsp,) = h.send(data_out_pdu(itt=2, ttt=r2t2.u32(20), offset=1536, data=payload[1536:]))
    assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.bhs[3] == 0 and rsp.u32(44) == 0
    assert h.store.read(10, 4) == payload


def test_write_unsolicited_data_out_and_multiple_r2ts() -> None:
    h = Harness()
    h.login([("InitialR2T", "No"), ("ImmediateData", "No"), ("FirstBurstLength", "1024"),
             ("MaxBurstLength", "1024"), ("MaxOutstandingR2T", "2")])
    payload = bytes((i * 7) & 0xFF for i in range(4096))
    assert h.send(scsi_pdu(write10(0, 8), itt=3, cmdsn=1, edtl=4096, write=True, final=False)) == []
    out = h.send(data_out_pdu(itt=3, ttt=RESERVED_TAG, offset=0, data=payload[:1024]))
    r2ts = [p for p in out if p.opcode == PduOpcode.R2T]
    assert [(p.u32(40), p.u32(44)) for p in r2ts] == [(1024, 1024), (2048, 1024)]
    assert [p.u32(36) for p in r2ts] == [0, 1]  # R2TSN
    out = h.send(data_out_pdu(itt=3, ttt=r2ts[0].u32(20), offset=1024, data=payload[1024:2048]))
    (r2t3,) = out
    assert (r2t3.u32(40), r2t3.u32(44)) == (3072, 1024)
    h.send(data_out_pdu(itt=3, ttt=r2ts[1].u32(20), offset=2048, data=payload[2048:3072]))
    (rsp,) = h.send(data_out_pdu(itt=3, ttt=r2t3.u32(20), offset=3072, data=payload[3072:]))
    assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.bhs[3] == 0
    assert h.store.read(0, 8) == payload
    dins = h.send(scsi_pdu(read10(0, 8), itt=4, cmdsn=2, edtl=4096, read=True))
    assert [bool(p.flags & 0x80) for p in dins] == [True] * 4  # each MaxBurstLength sequence ends with F
    assert b"".join(p.data for p in dins) == payload


def test_read_is_split_at_the_initiators_segment_length() -> None:
    h = Harness()
    h.login([("MaxRecvDataSegmentLength", "1024")])
    h.store.write(0, bytes([0xAB]) * 4096)
    out = h.send(scsi_pdu(read10(0, 8), itt=4, cmdsn=1, edtl=4096, read=True))
    assert [p.u32(40) for p in out] == [0, 1024, 2048, 3072]
    assert [p.u32(36) for p in out] == [0, 1, 2, 3]  # DataSN
    assert [bool(p.flags & 0x01) for p in out] == [False, False, False, True]
    assert b"".join(p.data for p in out) == bytes([0xAB]) * 4096


def test_check_condition_carries_sense() -> None:
    h = Harness()
    h.login()
    (rsp,) = h.send(scsi_pdu(read10(5000, 1), itt=1, cmdsn=1, edtl=512, read=True))
    assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.bhs[3] == 0x02
    sense = sense_of(rsp)
    assert sense[2] & 0x0F == 0x05 and sense[12] == 0x21  # ILLEGAL REQUEST, LBA OUT OF RANGE


def test_unknown_lun_is_not_supported() -> None:
    h = Harness()
    h.login()
    (rsp,) = h.send(scsi_pdu(TUR, itt=1, cmdsn=1, lun=3))
    assert rsp.bhs[3] == 0x02 and sense_of(rsp)[12] == 0x25


def test_many_commands_in_flight_and_the_window() -> None:
    h = Harness(auto_run=False)
    h.login()
    window = h.conn.config.limits.cmd_window
    for i in range(window):
        h.send(scsi_pdu(TUR, itt=100 + i, cmdsn=1 + i))
    assert h.conn.in_flight == window
    # beyond MaxCmdSN: ignored, no response, nothing executed
    h.send(scsi_pdu(TUR, itt=999, cmdsn=1 + window))
    assert h.conn.counters["ignored_cmdsn"] == 1
    tasks = h.conn.take_tasks()
    assert len(tasks) == window
    for task in reversed(tasks):  # complete out of order
        h.conn.task_done(task.task_id, 0)
    framer = Framer(max_data=1 << 20)
    framer.feed(h.conn.take_output())
    rsps = []
    while (p := framer.next()) is not None:
        assert isinstance(p, Pdu)
        rsps.append(p)
    assert sorted(p.itt for p in rsps) == [100 + i for i in range(window)]
    assert [status_sn(p) for p in rsps] == list(range(101, 101 + window))
    assert rsps[-1].u32(32) >= 1 + window  # MaxCmdSN opened again


def test_cmdsn_behind_the_window_is_ignored() -> None:
    h = Harness()
    h.login()
    assert h.send(scsi_pdu(TUR, itt=1, cmdsn=1)) != []
    assert h.send(scsi_pdu(TUR, itt=2, cmdsn=1)) == []
    assert h.conn.counters["ignored_cmdsn"] == 1 and not h.conn.closed


def test_nop_out_ping() -> None:
    h = Harness()
    h.login()
    nop = Pdu.new(PduOpcode.NOP_OUT, flags=0x80, immediate=True)
    nop.set_u32(16, 77)
    nop.set_u32(20, RESERVED_TAG)
    nop.set_u32(24, 1)
    nop.data = b"ping"
    (rsp,) = h.send(nop)
    assert rsp.opcode == PduOpcode.NOP_IN and rsp.itt == 77 and rsp.data == b"ping"


def _tmf(function: int, *, itt: int, ref: int, cmdsn: int) -> Pdu:
    pdu = Pdu.new(PduOpcode.TASK_MGMT_REQUEST, flags=0x80 | function, immediate=True)
    pdu.set_u32(16, itt)
    pdu.set_u32(20, ref)
    pdu.set_u32(24, cmdsn)
    return pdu


def test_abort_task_waiting_for_data_and_running() -> None:
    h = Harness(auto_run=False)
    h.login([("InitialR2T", "Yes")])
    h.send(scsi_pdu(write10(0, 1), itt=1, cmdsn=1, edtl=512, write=True))  # waits for data
    (rsp,) = h.send(_tmf(1, itt=50, ref=1, cmdsn=2))
    assert rsp.opcode == PduOpcode.TASK_MGMT_RESPONSE and rsp.bhs[2] == 0
    (rsp,) = h.send(_tmf(1, itt=51, ref=1, cmdsn=2))
    assert rsp.bhs[2] == 1  # task does not exist any more
    # a running task: the TMF response waits for it, its own response is never sent
    h.send(scsi_pdu(TUR, itt=2, cmdsn=2))
    (task,) = h.conn.take_tasks()
    h.conn.receive(_tmf(1, itt=52, ref=2, cmdsn=3).encode())
    assert h.conn.take_output() == b""
    h.conn.task_done(task.task_id, 0)
    framer = Framer()
    framer.feed(h.conn.take_output())
    only = framer.next()
    assert isinstance(only, Pdu) and only.opcode == PduOpcode.TASK_MGMT_RESPONSE and framer.next() is None


def test_lun_reset_aborts_everything() -> None:
    h = Harness(auto_run=False)
    h.login([("InitialR2T", "Yes")])
    h.send(scsi_pdu(write10(0, 1), itt=1, cmdsn=1, edtl=512, write=True))
    h.send(scsi_pdu(TUR, itt=2, cmdsn=2))
    (rsp,) = h.send(_tmf(5, itt=50, ref=RESERVED_TAG, cmdsn=3))
    assert rsp.bhs[2] == 0 and h.conn.in_flight == 0 and h.conn.take_tasks() == []


def test_resets_are_counted_for_the_adapter() -> None:
    h = Harness()
    h.login()
    assert h.conn.resets == 0
    h.send(_tmf(2, itt=50, ref=RESERVED_TAG, cmdsn=1))  # ABORT TASK SET: not a reset
    assert h.conn.resets == 0
    h.send(_tmf(5, itt=51, ref=RESERVED_TAG, cmdsn=1))  # LOGICAL UNIT RESET
    h.send(_tmf(6, itt=52, ref=RESERVED_TAG, cmdsn=1))  # TARGET WARM RESET
    assert h.conn.resets == 2


def test_nexus_is_the_initiator_port_transport_id() -> None:
    h = Harness()
    h.login()
    assert h.conn.nexus == "iqn.2026-01.org.example:host1,i,0x80123456789a"


def _caw(blocks: int) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0, 0, blocks, 0, 0)


def test_compare_and_write_needs_exactly_the_data_its_cdb_names() -> None:
    h = Harness()
    h.login([("ImmediateData", "Yes"), ("InitialR2T", "No")])
    for itt, (blocks, edtl) in enumerate(((1, 512), (0, 512), (1, 2048)), start=1):
        (rsp,) = h.send(scsi_pdu(_caw(blocks), itt=itt, cmdsn=itt, edtl=edtl, write=True, data=bytes(edtl)))
        assert rsp.bhs[3] == 0x02 and sense_of(rsp)[2] == 0x05 and sense_of(rsp)[12] == 0x24
    (rsp,) = h.send(scsi_pdu(_caw(1), itt=9, cmdsn=4, edtl=1024, write=True, data=bytes(512) + b"\x07" * 512))
    assert rsp.bhs[3] == 0 and h.store.read(0, 1) == b"\x07" * 512
    assert h.store.read(1, 3) == bytes(1536)  # nothing written by the refused ones


def test_logout() -> None:
    h = Harness()
    h.login()
    pdu = Pdu.new(PduOpcode.LOGOUT_REQUEST, flags=0x80, immediate=True)
    pdu.set_u32(16, 9)
    pdu.set_u32(24, 1)
    (rsp,) = h.send(pdu)
    assert rsp.opcode == PduOpcode.LOGOUT_RESPONSE and rsp.bhs[2] == 0
    assert h.conn.closed


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_header_digest_drops_the_connection() -> None:
    h = Harness(header_digest=True)
    h.login()
    raw = bytearray(scsi_pdu(TUR, itt=1, cmdsn=1).encode(header_digest=True))
    raw[49] ^= 0xFF
    h.send_raw(bytes(raw))
    assert h.conn.closed


def test_bad_data_digest_is_rejected() -> None:
    h = Harness(data_digest=True)
    h.login([("ImmediateData", "Yes")])
    raw = bytearray(scsi_pdu(write10(0, 1), itt=1, cmdsn=1, edtl=512, write=True, data=bytes(512))
                    .encode(data_digest=True))
    raw[-1] ^= 0xFF
    out = h.send_raw(bytes(raw))
    assert [p.opcode for p in out] == [PduOpcode.REJECT] and out[0].bhs[2] == 0x02
    assert h.conn.closed
    assert h.store.read(0, 1) == bytes(512)


def test_oversized_pdu_is_rejected_before_its_data_arrives() -> None:
    h = Harness()
    h.login()
    header = bytearray(scsi_pdu(TUR, itt=1, cmdsn=1).encode())
    header[5:8] = (1 << 24 - 1).to_bytes(3, "big")
    out = h.send_raw(bytes(header))
    assert [p.opcode for p in out] == [PduOpcode.REJECT]
    assert h.conn.closed


def test_data_out_at_a_wrong_offset_is_a_protocol_error() -> None:
    h = Harness()
    h.login([("InitialR2T", "Yes")])
    (r2t,) = h.send(scsi_pdu(write10(0, 2), itt=1, cmdsn=1, edtl=1024, write=True))
    out = h.send(data_out_pdu(itt=1, ttt=r2t.u32(20), offset=512, data=bytes(512)))
    assert [p.opcode for p in out] == [PduOpcode.REJECT]
    assert h.conn.closed


def test_login_pdu_in_full_feature_phase_is_rejected() -> None:
    h = Harness()
    h.login()
    out = h.send(login_pdu([("InitiatorName", INITIATOR)], csg=1, nsg=3))
    assert [p.opcode for p in out] == [PduOpcode.REJECT]
    assert h.conn.closed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=120), max_size=8), st.booleans())
def test_random_bytes_never_crash_or_wedge(chunks: list[bytes], login_first: bool) -> None:
    h = Harness()
    if login_first:
        h.login()
    for chunk in chunks:
        h.send_raw(chunk)  # strict: any unexpected exception fails the test
    assert h.conn.closed or h.conn.in_flight <= h.conn.config.limits.cmd_window


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0x3F), st.binary(min_size=40, max_size=40), st.binary(max_size=64))
def test_random_pdus_after_login_are_answered_or_dropped(opcode: int, rest: bytes, data: bytes) -> None:
    h = Harness()
    h.login()
    bhs = bytearray([opcode, *rest[:3], 0, 0, 0, 0]) + rest[3:40]
    pdu = Pdu(bhs[:48].ljust(48, b"\0") if len(bhs) < 48 else bytearray(bhs[:48]), b"", data)
    pdu.bhs[4] = 0
    h.send(pdu)
    h.run_tasks()
    assert h.conn.closed or h.conn.in_flight <= h.conn.config.limits.cmd_window


def test_data_out_out_of_datasn_sequence_fails_the_command_unwritten() -> None:
    h = Harness()
    h.login([("InitialR2T", "Yes"), ("MaxBurstLength", "1024")])
    (r2t,) = h.send(scsi_pdu(write10(0, 2), itt=1, cmdsn=1, edtl=1024, write=True))
    h.send(data_out_pdu(itt=1, ttt=r2t.u32(20), offset=0, data=b"x" * 512, final=False, datasn=0))
    (rsp,) = h.send(data_out_pdu(itt=1, ttt=r2t.u32(20), offset=512, data=b"x" * 512, datasn=0))
    assert rsp.opcode == PduOpcode.SCSI_RESPONSE and rsp.bhs[3] == 0x02
    assert sense_of(rsp)[2] & 0x0F == 0x0B and sense_of(rsp)[12] == 0x4B
    assert h.store.read(0, 2) == bytes(1024) and not h.conn.closed


def test_write_shorter_edtl_writes_only_the_blocks_sent() -> None:
    h = Harness()
    h.login([("InitialR2T", "No"), ("ImmediateData", "Yes")])
    h.store.write(0, b"a" * 1024)
    (rsp,) = h.send(scsi_pdu(write10(0, 2), itt=1, cmdsn=1, edtl=512, write=True, data=b"b" * 512))
    assert rsp.bhs[3] == 0 and rsp.flags & 0x04 and rsp.u32(44) == 512  # overflow by one block
    assert h.store.read(0, 2) == b"b" * 512 + b"a" * 512
    (rsp,) = h.send(scsi_pdu(write10(0, 1), itt=2, cmdsn=2, edtl=0, write=True))
    assert rsp.bhs[3] == 0 and rsp.flags & 0x04 and rsp.u32(44) == 512


@pytest.mark.parametrize(("why", "pdu", "status"), [
    ("T and C both set", login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=1, nsg=3, cont=True),
     0x0200),
    ("transit to a stage before the current one", login_pdu([("InitiatorName", INITIATOR)], csg=1, nsg=0), 0x0200),
    ("the reserved stage 2", login_pdu([("InitiatorName", INITIATOR)], csg=2, nsg=3), 0x0200),
    ("full feature phase as the current stage", login_pdu([("InitiatorName", INITIATOR)], csg=3, nsg=3), 0x0200),
    ("a TSIH for a session that does not exist",
     login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=1, nsg=3, tsih=7), 0x020A),
    ("a malformed text key", None, 0x0200),
])
def test_login_state_violations_are_refused_and_the_connection_closed(why: str, pdu: Pdu | None, status: int) -> None:
    h = Harness()
    if pdu is None:
        pdu = login_pdu([], csg=1, nsg=3)
        pdu.data = b"InitiatorName\0"  # no '='
    (rsp,) = h.send(pdu)
    assert rsp.opcode == PduOpcode.LOGIN_RESPONSE, why
    assert (rsp.bhs[36] << 8 | rsp.bhs[37]) == status, why
    assert h.conn.closed, why


def test_login_with_a_newer_protocol_version_only_is_refused() -> None:
    h = Harness()
    pdu = login_pdu([("InitiatorName", INITIATOR), ("TargetName", TARGET)], csg=1, nsg=3)
    pdu.bhs[3] = 1  # Version-min 1: we speak version 0 only
    (rsp,) = h.send(pdu)
    assert (rsp.bhs[36], rsp.bhs[37]) == (0x02, 0x05) and h.conn.closed


def test_login_text_beyond_its_limit_across_continuations_is_refused() -> None:
    h = Harness()
    chunk = b"X-Padding=" + b"a" * 8000 + b"\0"
    for _ in range(10):  # more than 64 KiB of text in continued login PDUs
        pdu = login_pdu([], csg=1, nsg=3, transit=False, cont=True)
        pdu.data = chunk
        out = h.send(pdu)
        if h.conn.closed:
            break
    assert h.conn.closed
    assert (out[-1].bhs[36], out[-1].bhs[37]) == (0x02, 0x00)


def test_a_login_pdu_larger_than_the_login_phase_allows_is_rejected() -> None:
    h = Harness()
    pdu = login_pdu([("InitiatorName", INITIATOR), ("X-Big", "b" * 9000)], csg=1, nsg=3)
    out = h.send_raw(pdu.encode())  # 8192 bytes is the login phase's MaxRecvDataSegmentLength
    assert [p.opcode for p in out] == [PduOpcode.REJECT]
    assert h.conn.closed


def test_a_truncated_pdu_waits_for_the_rest_and_a_whole_one_after_it_is_served() -> None:
    h = Harness()
    h.login()
    raw = scsi_pdu(TUR, itt=1, cmdsn=1).encode()
    assert h.send_raw(raw[:30]) == [] and not h.conn.closed  # half a header: nothing yet
    out = h.send_raw(raw[30:] + scsi_pdu(TUR, itt=2, cmdsn=2).encode())
    assert sorted(p.itt for p in out) == [1, 2]


def test_immediate_data_beyond_first_burst_length_is_a_protocol_error() -> None:
    h = Harness()
    h.login([("ImmediateData", "Yes"), ("InitialR2T", "No"), ("FirstBurstLength", "512")])
    out = h.send(scsi_pdu(write10(0, 2), itt=1, cmdsn=1, edtl=1024, write=True, data=bytes(1024)))
    assert [p.opcode for p in out] == [PduOpcode.REJECT]
    assert h.conn.closed
