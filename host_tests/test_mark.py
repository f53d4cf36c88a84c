"""`usbmirror mark`: a MARK record in the journal at the current position, durable before the
command returns (a power cut right after keeps it), carried by the link in order."""

from __future__ import annotations

import pytest

from firmware.journal import RecordKind
from firmware.journal.sim import CrashMode
from firmware.link import protocol as jp
from firmware.storage import StorageError
from host_tests.test_local_unit import Rig, blk


def test_mark_is_a_durable_journal_record_in_order() -> None:
    r = Rig()
    lu = r.unit(write_cache=True)
    r.journal.register_consumer("remote")  # an unreachable remote: the journal keeps its records
    lu.write(0, blk(1, 2))
    seq = lu.mark("before-upgrade")
    recs = r.journal.read_records(0, 1 << 20)  # durable records only: the cached write came along
    assert [(x.kind, x.payload if x.kind is RecordKind.MARK else b"") for x in recs] == [
        (RecordKind.WRITE, b""), (RecordKind.MARK, b"before-upgrade")]
    assert recs[1].seq == seq
    for mode in CrashMode:  # the power fails as soon as mark() returned
        r2 = r.power_cut(mode, seed=3, stop=False)
        r2.unit()
        kept = r2.journal.read_records(0, 1 << 20)
        assert any(x.kind is RecordKind.MARK and x.payload == b"before-upgrade" for x in kept), mode
        assert kept[0].kind is RecordKind.WRITE  # what came before the mark is kept too


@pytest.mark.parametrize("name", ["", "x" * 201, "tab\there"])
def test_bad_mark_names_are_refused(name: str) -> None:
    r = Rig()
    lu = r.unit()
    with pytest.raises(ValueError, match="mark's name"):
        lu.mark(name)
    assert r.journal.head_seq == 0


def test_link_carries_marks_and_refuses_malformed_ones() -> None:
    rec = jp.Record(7, jp.RecordKind.MARK, 0, 0, 123, b"m1")
    raw = jp.encode_records([rec])
    assert jp.decode_records(raw, 1, 6) == (rec,)
    for bad in (jp.Record(7, jp.RecordKind.MARK, 3, 0, 1, b"m"), jp.Record(7, jp.RecordKind.MARK, 0, 0, 1, b""),
                jp.Record(7, jp.RecordKind.MARK, 0, 0, 1, b"n" * 201)):
        with pytest.raises(jp.ProtocolError, match="MARK record"):
            jp.decode_records(jp.encode_records([bad]), 1, 6)


def test_mark_while_closed_is_an_error() -> None:
    r = Rig()
    lu = r.unit()
    lu.close()
    with pytest.raises(StorageError, match="closed"):
        lu.mark("m")
