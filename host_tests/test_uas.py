"""USB Attached SCSI: the IU parser and task set (`gadget/uas.py`), the descriptors, and the device over USB/IP.

The sans-IO tests feed IUs and URBs into `UasTransport` and read the completions back; the USB/IP
tests drive a `UasMassStorageDevice` over a real `UsbipServer` with the project's raw client, as a
host's `uas` driver would: SET_INTERFACE to alternate setting 1, status URBs, Command IUs with
tags, READ READY / WRITE READY, several commands in flight at once.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status
from firmware.scsi import ScsiTarget
from gadget.descriptors import DeviceIdentity, Speed, parse_descriptor, split_descriptors
from gadget.mass_storage import EPIPE
from gadget.uas import IuId, ResponseCode, TaskFunction, UasCompletion, UasTask, UasTransport
from gadget.uas_descriptors import PIPE_USAGE_DESCRIPTOR, UAS_ENDPOINTS, Pipe, uas_configuration_descriptor
from gadget.uas_device import UasMassStorageDevice
from gadget.usbip_protocol import SubmitReturn, UrbDirection
from gadget.usbip_server import UsbipServer
from host_tests.scsi_support import make_target
from host_tests.usbip_support import UsbipClient

IDENT = DeviceIdentity(vendor_id=0x1209, product_id=0x0001, serial="0123456789AB")
BS = 512


def command_iu(tag: int, cdb: bytes, *, lun: int = 0, attr: int = 0) -> bytes:
    """A Command IU as Linux's uas builds it (UAS-2 table 9), packed here independently of gadget.uas."""
    return struct.pack(">BBHBBBB8s16s", 0x01, 0, tag, attr, 0, 0, 0, lun.to_bytes(8, "big"), cdb.ljust(16, b"\0"))


def tmf_iu(tag: int, function: int, task_tag: int = 0, *, lun: int = 0) -> bytes:
    return struct.pack(">BBHBBH8s", 0x05, 0, tag, function, 0, task_tag, lun.to_bytes(8, "big"))


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def plan(cdb: bytes) -> CommandPlan:
    """The data phases of READ(10), WRITE(10) and no-data commands, for the sans-IO tests."""
    if cdb[0] == 0x2A:
        return CommandPlan(Direction.OUT, int.from_bytes(cdb[7:9], "big") * BS)
    if cdb[0] == 0x28:
        return CommandPlan(Direction.IN, int.from_bytes(cdb[7:9], "big") * BS)
    return CommandPlan(Direction.NONE, 0)


class Host:
    """Feeds a `UasTransport` the way a host does, numbering URBs, and collects the status IUs."""

    def __init__(self, transport: UasTransport) -> None:
        self.t = transport
        self.urb = 1000
        self.ius: list[bytes] = []  # status IUs received, in order

    def _next(self) -> int:
        self.urb += 1
        return self.urb

    def collect(self, done: list[UasCompletion]) -> list[UasCompletion]:
        return done

    def status_urbs(self, n: int = 1) -> None:
        for _ in range(n):
            urb = self._next()
            for c in self.t.status_urb(urb, 112):
                self.ius.append(c.data)

    def send(self, iu: bytes) -> list[UasCompletion]:
        urb = self._next()
        done = self.t.command(urb, iu)
        assert done[0] == UasCompletion(urb, 0, len(iu)), "the command pipe transfer completes at once"
        for c in done[1:]:
            self.ius.append(c.data)
        return done

    def data_out(self, data: bytes) -> UasCompletion:
        urb = self._next()
        done = self.t.data_out_urb(urb, data)
        for c in done[1:]:
            self.ius.append(c.data)
        return done[0]

    def data_in(self, length: int) -> list[UasCompletion]:
        urb = self._next()
        done = self.t.data_in_urb(urb, length)
        out = [c for c in done if c.tag == urb]
        self.ius.extend(c.data for c in done if c.tag != urb)
        return out

    def finish(self, task: UasTask, result: CommandResult, sense: bytes = b"") -> None:
        self.ius.extend(c.data for c in self.t.finish(task, result, sense))


def response(iu: bytes) -> tuple[int, int]:
    """(tag, response code) of a Response IU."""
    assert iu[0] == IuId.RESPONSE and len(iu) == 8, iu.hex()
    return int.from_bytes(iu[2:4], "big"), iu[7]


def sense(iu: bytes) -> tuple[int, int, bytes]:
    """(tag, status, sense data) of a Sense IU."""
    assert iu[0] == IuId.SENSE, iu.hex()
    length = int.from_bytes(iu[14:16], "big")
    return int.from_bytes(iu[2:4], "big"), iu[6], iu[16:16 + length]


@pytest.fixture
def host() -> Host:
    return Host(UasTransport(plan, max_tasks=4))


# -- the task set, sans-IO --------------------------------------------------------------------------

def test_write_asks_for_its_data_runs_and_reports_good(host: Host) -> None:
    host.status_urbs(2)
    host.send(command_iu(1, write10(8, 2)))
    assert host.ius == [bytes([IuId.WRITE_READY, 0, 0, 1])]
    assert host.t.take_ready() == [], "a WRITE does not run before its data"
    assert host.data_out(b"w" * 2 * BS) == UasCompletion(host.urb, 0, 2 * BS)
    (task,) = host.t.take_ready()
    assert task.tag == 1 and bytes(task.data_out) == b"w" * 2 * BS
    host.finish(task, CommandResult(Status.GOOD))
    assert sense(host.ius[1]) == (1, Status.GOOD, b"")
    assert host.t.tasks == 0


def test_read_runs_first_then_sends_read_ready_data_and_status_in_that_order(host: Host) -> None:
    host.send(command_iu(7, read10(0, 1)))
    (task,) = host.t.take_ready()
    host.finish(task, CommandResult(Status.GOOD, b"r" * BS))
    assert host.ius == [], "nothing goes out without a status URB"
    host.status_urbs(1)
    assert host.ius == [bytes([IuId.READ_READY, 0, 0, 7])]
    host.status_urbs(1)
    assert host.ius[1:] == [], "the Sense IU waits for the data"
    (data,) = host.data_in(4096)
    assert data.data == b"r" * BS and data.actual_length == BS
    assert sense(host.ius[1]) == (7, Status.GOOD, b"")


def test_several_tags_share_the_data_out_pipe_one_at_a_time(host: Host) -> None:
    host.status_urbs(4)
    host.send(command_iu(1, write10(0, 1)))
    host.send(command_iu(2, write10(1, 1)))
    host.send(command_iu(3, bytes(6)))  # TEST UNIT READY: no data, runs at once
    assert host.ius == [bytes([IuId.WRITE_READY, 0, 0, 1])], "WRITE READY for tag 2 before tag 1's data"
    assert [t.tag for t in host.t.take_ready()] == [3]
    host.data_out(b"1" * BS)
    assert host.ius[1] == bytes([IuId.WRITE_READY, 0, 0, 2])
    host.data_out(b"2" * BS)
    tasks = host.t.take_ready()
    assert [(t.tag, bytes(t.data_out)) for t in tasks] == [(1, b"1" * BS), (2, b"2" * BS)]
    host.status_urbs(2)
    for task in reversed(tasks):  # they may finish in any order
        host.finish(task, CommandResult(Status.GOOD))
    assert [sense(iu)[0] for iu in host.ius[2:]] == [2, 1]


def test_check_condition_carries_the_sense_data(host: Host) -> None:
    host.status_urbs(1)
    host.send(command_iu(5, read10(99999, 1)))
    (task,) = host.t.take_ready()
    fixed = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    host.finish(task, CommandResult(Status.CHECK_CONDITION), fixed)
    assert sense(host.ius[0]) == (5, Status.CHECK_CONDITION, fixed), "no READ READY for a failed READ"


@pytest.mark.parametrize("iu, tag", [
    (b"", 0),
    (b"\x01\x00", 0),                             # too short to hold a tag
    (b"\x01\x00\x00\x09" + bytes(16), 9),         # Command IU of 20 bytes
    (bytes([0x09, 0, 0, 4]) + bytes(28), 4),      # unknown IU id
    (bytes([IuId.SENSE, 0, 0, 6]) + bytes(28), 6),  # a device-to-host IU on the command pipe
    (b"\x05\x00\x00\x03" + bytes(4), 3),          # Task Management IU of 8 bytes
    (command_iu(8, bytes(6))[:6] + b"\x08" + command_iu(8, bytes(6))[7:], 8),  # announces 8 more CDB bytes
])
def test_bad_iu_gets_invalid_information_unit(host: Host, iu: bytes, tag: int) -> None:
    host.status_urbs(1)
    host.send(iu)
    assert response(host.ius[0]) == (tag, ResponseCode.INVALID_INFORMATION_UNIT)
    assert host.t.tasks == 0 and host.t.take_ready() == []


def test_duplicate_tag_is_an_overlapped_tag_and_the_first_task_is_aborted(host: Host) -> None:
    host.status_urbs(3)
    host.send(command_iu(2, read10(0, 1)))
    (task,) = host.t.take_ready()
    host.send(command_iu(2, read10(1, 1)))
    assert response(host.ius[0]) == (2, ResponseCode.OVERLAPPED_TAG_ATTEMPTED)
    host.finish(task, CommandResult(Status.GOOD, b"x" * BS))
    assert host.ius[1:] == [], "the aborted task's READ READY or status went out"
    assert host.t.tasks == 0
    host.send(command_iu(2, bytes(6)))  # the tag is free again
    assert [t.tag for t in host.t.take_ready()] == [2]


def test_a_lun_other_than_0_is_an_incorrect_logical_unit_number(host: Host) -> None:
    host.status_urbs(2)
    host.send(command_iu(3, bytes(6), lun=1))
    host.send(tmf_iu(4, TaskFunction.ABORT_TASK, 3, lun=2))
    assert [response(iu) for iu in host.ius] == [(3, ResponseCode.INCORRECT_LOGICAL_UNIT_NUMBER),
                                                  (4, ResponseCode.INCORRECT_LOGICAL_UNIT_NUMBER)]


def test_task_set_full_beyond_max_tasks(host: Host) -> None:
    host.status_urbs(1)
    for tag in range(1, 5):
        host.send(command_iu(tag, write10(tag, 1)))
    host.ius.clear()
    host.status_urbs(1)
    host.send(command_iu(9, bytes(6)))
    assert sense(host.ius[0]) == (9, 0x28, b"")


def test_short_data_out_is_not_run_and_reports_data_phase_error(host: Host) -> None:
    host.status_urbs(2)
    host.send(command_iu(1, write10(0, 4)))
    assert host.data_out(b"z" * BS) == UasCompletion(host.urb, 0, BS)
    assert host.t.take_ready() == []
    tag, status, data = sense(host.ius[1])
    assert (tag, status) == (1, Status.CHECK_CONDITION) and (data[2], data[12], data[13]) == (0x0B, 0x4B, 0)


def test_data_out_with_no_task_asking_stalls(host: Host) -> None:
    assert host.data_out(b"?" * BS).status == -EPIPE


def test_abort_task_of_a_waiting_write_answers_at_once_and_frees_the_pipe(host: Host) -> None:
    host.status_urbs(4)
    host.send(command_iu(1, write10(0, 1)))
    host.send(command_iu(2, write10(1, 1)))
    host.send(tmf_iu(10, TaskFunction.ABORT_TASK, 1))
    assert host.ius[0] == bytes([IuId.WRITE_READY, 0, 0, 1])
    assert response(host.ius[1]) == (10, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE)
    assert host.ius[2] == bytes([IuId.WRITE_READY, 0, 0, 2]), "the next write got the data-out pipe"
    host.data_out(b"2" * BS)
    assert [t.tag for t in host.t.take_ready()] == [2]


def test_abort_of_a_running_command_answers_only_after_it_ended(host: Host) -> None:
    host.status_urbs(3)
    host.send(command_iu(1, write10(0, 1)))
    host.data_out(b"a" * BS)
    (task,) = host.t.take_ready()
    host.send(tmf_iu(11, TaskFunction.QUERY_TASK, 1))
    assert response(host.ius[1]) == (11, ResponseCode.TASK_MANAGEMENT_FUNCTION_SUCCEEDED)
    host.send(tmf_iu(12, TaskFunction.ABORT_TASK, 1))
    assert len(host.ius) == 2, "ABORT TASK answered while the write still runs"
    host.finish(task, CommandResult(Status.GOOD))
    assert [response(iu) for iu in host.ius[2:]] == [(12, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE)]
    host.status_urbs(1)
    host.send(tmf_iu(13, TaskFunction.QUERY_TASK, 1))
    assert response(host.ius[3]) == (13, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE)


def test_logical_unit_reset_waits_for_every_running_command_and_asks_for_a_unit_attention(host: Host) -> None:
    host.status_urbs(4)
    host.send(command_iu(1, bytes(6)))
    host.send(command_iu(2, bytes(6)))
    first, second = host.t.take_ready()
    host.send(command_iu(3, write10(0, 1)))  # waiting for its data: aborted at once
    host.ius.clear()
    host.send(tmf_iu(20, TaskFunction.LOGICAL_UNIT_RESET))
    assert host.t.reset_requested
    host.finish(first, CommandResult(Status.GOOD))
    assert host.ius == [], "answered before the second running command ended"
    host.finish(second, CommandResult(Status.GOOD))
    assert [response(iu) for iu in host.ius] == [(20, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE)]
    assert host.t.tasks == 0


@pytest.mark.parametrize("function, code", [
    (TaskFunction.CLEAR_ACA, ResponseCode.TASK_MANAGEMENT_FUNCTION_NOT_SUPPORTED),
    (0x33, ResponseCode.TASK_MANAGEMENT_FUNCTION_NOT_SUPPORTED),
    (TaskFunction.QUERY_TASK_SET, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE),
    (TaskFunction.QUERY_ASYNCHRONOUS_EVENT, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE),
    (TaskFunction.ABORT_TASK, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE),  # no such task
    (TaskFunction.ABORT_TASK_SET, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE),
])
def test_task_management_answers(host: Host, function: int, code: ResponseCode) -> None:
    host.status_urbs(1)
    host.send(tmf_iu(30, function, 77))
    assert response(host.ius[0]) == (30, code)


def test_unlinked_status_urb_never_completes(host: Host) -> None:
    host.t.status_urb(500, 112)
    assert host.t.cancel(500) and not host.t.cancel(500)
    host.send(command_iu(1, write10(0, 1)))
    assert host.ius == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["cmd", "status", "in", "out", "finish", "cancel", "reset"]),
                          st.binary(max_size=40), st.integers(0, 6)), max_size=40))
def test_any_sequence_of_transfers_never_raises(steps: list[tuple[str, bytes, int]]) -> None:
    t = UasTransport(plan, max_tasks=3)
    running: list[UasTask] = []
    for n, (kind, blob, small) in enumerate(steps):
        if kind == "cmd":
            t.command(n, blob if small else command_iu(small, blob[:16]))
        elif kind == "status":
            t.status_urb(n, 8 + small * 20)
        elif kind == "in":
            t.data_in_urb(n, small * 256)
        elif kind == "out":
            t.data_out_urb(n, blob * small)
        elif kind == "finish" and running:
            task = running.pop(small % len(running))
            t.finish(task, CommandResult(Status(small % 3 if small % 3 != 1 else 0), blob))
        elif kind == "cancel":
            t.cancel(n - small)
        elif kind == "reset":
            t.reset()
        running.extend(t.take_ready())
        assert t.tasks <= 3


# -- descriptors -----------------------------------------------------------------------------------

def test_configuration_has_bulk_only_alt_0_and_uas_alt_1_with_pipe_usage() -> None:
    raw = uas_configuration_descriptor(IDENT, Speed.HIGH)
    interfaces = [parse_descriptor(d) for d in split_descriptors(raw) if d[1] == 4]
    assert [(i.bAlternateSetting, i.bInterfaceProtocol, i.bNumEndpoints) for i in interfaces] == [(0, 0x50, 2),
                                                                                               (1, 0x62, 4)]
    assert int.from_bytes(raw[2:4], "little") == len(raw)
    # after alt 1's interface descriptor: each endpoint is followed by its pipe usage descriptor
    alt1 = raw[raw.index(bytes([9, 4, 0, 1])):]
    pieces, pos = [], 9
    while pos < len(alt1):
        pieces.append(alt1[pos:pos + alt1[pos]])
        pos += alt1[pos]
    pairs = [(pieces[i][2], pieces[i + 1]) for i in range(0, len(pieces), 2)]
    assert pairs == [(UAS_ENDPOINTS[p], bytes([4, PIPE_USAGE_DESCRIPTOR, p, 0])) for p in Pipe]
    assert all(p[4:6] == (512).to_bytes(2, "little") for p in pieces[::2])


def test_no_uas_at_superspeed() -> None:
    with pytest.raises(ValueError, match="streams"):
        uas_configuration_descriptor(IDENT, Speed.SUPER)


# -- the device over USB/IP ------------------------------------------------------------------------

class UasHost:
    """The project's raw USB/IP client used the way Linux's uas driver uses the pipes."""

    def __init__(self, client: UsbipClient) -> None:
        self.c = client

    def status_urb(self) -> int:
        return self.c.submit(2, UrbDirection.IN, 112)

    def command(self, tag: int, cdb: bytes, *, data_out: bytes = b"", data_in: int = 0) -> int:
        """Submit a status URB and the Command IU; returns the status URB's seqnum."""
        status = self.status_urb()
        ret = self.c.wait(self.c.submit(1, UrbDirection.OUT, 32, command_iu(tag, cdb)))
        assert isinstance(ret, SubmitReturn) and ret.status == 0
        return status

    def iu(self, seq: int) -> bytes:
        ret = self.c.wait(seq)
        assert isinstance(ret, SubmitReturn) and ret.status == 0, ret
        return ret.data

    def finish_writes(self, statuses: list[int], payload: dict[int, bytes]) -> dict[int, int]:
        """Serve the queued WRITEs whose status URBs are `statuses`: each WRITE READY names a tag,
        whose `payload` then goes out on the data-out pipe; returns each tag's final SCSI status."""
        done: dict[int, int] = {}
        pending = list(statuses)
        while pending:
            iu = self.iu(pending.pop(0))
            if iu[0] == IuId.WRITE_READY:
                tag = int.from_bytes(iu[2:4], "big")
                pending.append(self.status_urb())
                ret = self.c.wait(self.c.submit(4, UrbDirection.OUT, len(payload[tag]), payload[tag]))
                assert isinstance(ret, SubmitReturn) and ret.actual_length == len(payload[tag])
            else:
                tag, status, _ = sense(iu)
                done[tag] = status
        return done


@pytest.fixture
def uas_server() -> Iterator[tuple[UsbipServer, UasMassStorageDevice]]:
    target, store = make_target(num_blocks=4096)
    # the workers serve the same store as the planning target
    workers = [type(target)(store, serial="UM0001", device_id=bytes.fromhex("3000000000000001"),
                            shared=target.shared) for _ in range(4)]
    device = UasMassStorageDevice(target, workers, IDENT)
    with UsbipServer(device) as server:
        yield server, device
    device.close()


def _attach(server: UsbipServer) -> UsbipClient:
    client = UsbipClient(server.host, server.port)
    client.import_device()
    client.enumerate()
    return client


def test_set_interface_selects_uas_and_get_interface_reports_it(uas_server: tuple[UsbipServer,
                                                                               UasMassStorageDevice]) -> None:
    server, device = uas_server
    with _attach(server) as client:
        assert client.control(0x81, 0x0A, 0, 0, 1).data == b"\x00"
        assert client.control(0x01, 0x0B, 1, 0, 0).status == 0
        assert client.control(0x81, 0x0A, 0, 0, 1).data == b"\x01"
        assert client.control(0x01, 0x0B, 2, 0, 0).status == -EPIPE, "alternate setting 2 does not exist"
        assert device.alternate == 1
        # the Bulk-Only pipe 0x81 is gone in alternate setting 1
        assert client.transfer(1, UrbDirection.IN, 13).status == -EPIPE


def test_queued_writes_and_reads_over_usbip_with_autosense(uas_server: tuple[UsbipServer,
                                                                            UasMassStorageDevice]) -> None:
    server, device = uas_server
    with _attach(server) as client:
        assert client.control(0x01, 0x0B, 1, 0, 0).status == 0
        host = UasHost(client)
        # the first command reports the reset (unit attention), with its sense in the Sense IU
        tag, status, data = sense(host.iu(host.command(1, bytes(6))))
        assert (tag, status, data[2] & 0xF, data[12]) == (1, Status.CHECK_CONDITION, 0x6, 0x29)
        # eight WRITEs in flight: each WRITE READY names a tag, the data goes to that tag
        payload = {tag: bytes([tag]) * 4 * BS for tag in range(1, 9)}
        statuses = [host.command(tag, write10(tag * 8, 4)) for tag in payload]
        assert host.finish_writes(statuses, payload) == {tag: Status.GOOD for tag in payload}
        # READ back one of them: READ READY, data, then GOOD
        status_seq = host.command(20, read10(3 * 8, 4))
        assert host.iu(status_seq) == bytes([IuId.READ_READY, 0, 0, 20])
        second = host.status_urb()
        data_in = client.wait(client.submit(3, UrbDirection.IN, 4 * BS))
        assert isinstance(data_in, SubmitReturn) and data_in.data == payload[3]
        assert sense(host.iu(second)) == (20, Status.GOOD, b"")
        # an out-of-range READ: CHECK CONDITION, ILLEGAL REQUEST / LBA OUT OF RANGE in the Sense IU
        tag, status, data = sense(host.iu(host.command(21, read10(1 << 30, 1))))
        assert (tag, status, data[2] & 0xF, data[12]) == (21, Status.CHECK_CONDITION, 0x5, 0x21)
        assert device.status()["uas"]["commands"] == 11  # type: ignore[index]


def test_writes_run_at_the_same_time_on_the_workers() -> None:
    """Two WRITEs in flight reach the store together (what lets them share a journal flush)."""
    target, store = make_target(num_blocks=4096)
    both_inside = threading.Barrier(2, timeout=5)
    real_write = store.write

    def write(lba: int, data: bytes, fua: bool = False) -> None:
        both_inside.wait()  # breaks (and fails the command) unless both writes are here at once
        real_write(lba, data, fua=fua)

    store.write = write  # type: ignore[method-assign]
    workers = [type(target)(store, serial="UM0001", device_id=bytes.fromhex("3000000000000001"),
                            shared=target.shared) for _ in range(2)]
    device = UasMassStorageDevice(target, workers, IDENT)
    try:
        with UsbipServer(device) as server, _attach(server) as client:
            client.control(0x01, 0x0B, 1, 0, 0)
            host = UasHost(client)
            host.iu(host.command(1, bytes(6)))  # the unit attention
            first, second = host.command(2, write10(0, 1)), host.command(3, write10(1, 1))
            for seq in (first, second):
                iu = host.iu(seq)
                assert iu[0] == IuId.WRITE_READY
                client.wait(client.submit(4, UrbDirection.OUT, BS, b"d" * BS))
            results = sorted(sense(host.iu(host.status_urb()))[:2] for _ in range(2))
            assert results == [(2, Status.GOOD), (3, Status.GOOD)]
    finally:
        device.close()
    assert store.read(0, 2) == b"d" * 2 * BS


def test_queued_uas_writes_share_journal_flushes_and_each_is_durable_before_its_status() -> None:
    """Four WRITEs in flight over UAS to a real local unit (write cache off) need fewer journal
    flushes than writes, and each one acknowledged survives a power cut right after."""
    from host_tests.test_local_unit import Rig, blk

    rig = Rig(ring=1 << 20)
    unit = rig.unit()
    real_sync = rig.jflash.sync
    first = threading.Event()

    def slow_first_sync() -> None:
        # hold the first flush until the other three records are queued behind it
        if not first.is_set():
            first.set()
            for _ in range(500):
                if int(unit.journal.status()["head_seq"]) >= 4:  # type: ignore[call-overload]
                    break
                threading.Event().wait(0.01)
        real_sync()

    rig.jflash.sync = slow_first_sync  # type: ignore[method-assign]
    first_target = ScsiTarget(unit, serial="UM0001", device_id=bytes.fromhex("3000000000000001"))
    targets = [first_target] + [ScsiTarget(unit, serial="UM0001", device_id=bytes.fromhex("3000000000000001"),
                                           shared=first_target.shared) for _ in range(4)]
    device = UasMassStorageDevice(targets[0], targets[1:], IDENT)
    try:
        with UsbipServer(device) as server, _attach(server) as client:
            client.control(0x01, 0x0B, 1, 0, 0)
            host = UasHost(client)
            host.iu(host.command(1, bytes(6)))  # the unit attention
            statuses = [host.command(tag, write10(tag, 1)) for tag in range(1, 5)]
            done = host.finish_writes(statuses, {tag: blk(tag) for tag in range(1, 5)})
            assert done == {1: Status.GOOD, 2: Status.GOOD, 3: Status.GOOD, 4: Status.GOOD}
            flushes = int(unit.journal.status()["flushes"])  # type: ignore[call-overload]
            assert flushes < 4, f"{flushes} journal flushes for 4 queued writes: no group commit"
            after = rig.power_cut(stop=False).unit()
            assert [after.read(tag, 1) for tag in range(1, 5)] == [blk(tag) for tag in range(1, 5)]
    finally:
        device.close()


def test_uas_option_needs_usbip_and_defaults_to_bulk_only() -> None:
    from firmware import cli, config

    def options(*argv: str) -> config.LocalOptions:
        ns = cli.build_parser().parse_args(["local", "--volume", "/srv/disk.img", *argv])
        return config.local_options(config.merge_options(ns, config.LOCAL_OPTS, config.load_config(ns.config)))

    assert options("--usbip", "127.0.0.1:3240").uas is False
    assert options("--usbip", "127.0.0.1:3240", "--uas", "on").uas is True
    with pytest.raises(config.UsageError, match="--uas on needs --usbip"):
        options("--gadget", "--uas", "on")


def test_status_counts_the_commands_of_every_uas_worker() -> None:
    # `usbmirror status` of a UAS unit: commands ran on the workers' targets, not Bulk-Only's
    from firmware.local_main import combined_scsi_status

    target, store = make_target(num_blocks=64)
    workers = [type(target)(store, serial="UM0001", device_id=bytes.fromhex("3000000000000001"),
                            shared=target.shared) for _ in range(2)]
    for i, w in enumerate(workers):
        w.plan(write10(i, 1))
        assert w.execute(write10(i, 1), bytes(BS)).status == Status.GOOD
    st = combined_scsi_status([target.status(), *(w.status() for w in workers)])
    assert st["commands"] == {"WRITE_10": 2} and st["blocks_written"] == 2
    assert st["num_blocks"] == 64 and st["block_size"] == BS
