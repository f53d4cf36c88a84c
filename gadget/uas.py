"""USB Attached SCSI (UAS, T10 UAS-2 / USB-IF UASP 1.0), sans-IO: information units in, URB replies out.

A UAS interface has four bulk pipes (pipe usage descriptors name them): the host sends Command and
Task Management IUs on the *command* pipe, the device answers on the *status* pipe (Sense IU for a
finished command, Response IU for a task management function or a bad IU, and, at high speed
without streams, READ READY / WRITE READY before each data phase), and the data moves on the
*data-in* and *data-out* pipes. Every IU carries the host's tag, so several commands are in flight
at once: the device may run them in any order (SIMPLE task attribute) and finish each on its own.

`UasTransport` owns the task set and the URBs the host has submitted on the three pipes other than
the command pipe; the adapter (`gadget/uas_device.py`) feeds transfers in and runs the commands it
is handed (`take_ready()`), on as many workers as it likes, then reports each with `finish()`. Every
call returns the transfers it completed (`UasCompletion`s, in the Linux URB convention).

Without streams (high speed, and what this transport implements) the data pipes are shared by all
tasks, so one task at a time owns each: the device sends READ READY (WRITE READY) for one task, the
host submits its data-in (data-out) URB, and only after that transfer does the next task get its
READY. A DATA-IN command runs first and asks for its data phase with the data in hand; a DATA-OUT
command asks for its data, then runs. The Sense IU of a DATA-IN command follows its data.

Bad input never raises: a short or unknown IU, a command or function for a LUN other than 0, and a
tag already in use (overlapped: the task holding it is aborted, its status never sent) get a Response
IU with the UAS response code; a DATA-OUT transfer shorter than the command needs ends the command
with ABORTED COMMAND / DATA PHASE ERROR, without running it. Task management: ABORT TASK, ABORT TASK
SET, CLEAR TASK SET, LOGICAL UNIT RESET, I_T NEXUS RESET, QUERY TASK, QUERY TASK SET and QUERY
ASYNCHRONOUS EVENT; others answer TASK MANAGEMENT FUNCTION NOT SUPPORTED. A running command cannot be
stopped (a write lands exactly once): its abort answers only once it has ended, and its status is
dropped. A LOGICAL UNIT RESET or I_T NEXUS RESET also asks the adapter for a unit attention
(`reset_requested`).

Task attributes: every task runs as SIMPLE (HEAD OF QUEUE and ORDERED are accepted and not ordered;
Linux sends SIMPLE only).

What it does not do: SCSI (the `LogicalUnit` behind it plans and runs each CDB and keeps sense, which
the adapter reads with REQUEST SENSE after a CHECK CONDITION), streams (SuperSpeed), ep0, threads.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status

log = logging.getLogger(__name__)

EPIPE: Final = 32  # URB status -EPIPE: the endpoint stalled


@dataclass(frozen=True, slots=True)
class UasCompletion:
    """A finished transfer: `tag` is the transport's name for the URB, `status` 0 or a negative errno
    (the same fields as `gadget.mass_storage.Completion`)."""

    tag: int
    status: int
    actual_length: int
    data: bytes = b""

__all__ = [
    "COMMAND_IU_SIZE",
    "EPIPE",
    "MAX_SENSE",
    "IuId",
    "ResponseCode",
    "TaskFunction",
    "UasCompletion",
    "UasTask",
    "UasTransport",
    "response_iu",
    "sense_iu",
]

COMMAND_IU_SIZE: Final = 32  # a Command IU with a CDB of up to 16 bytes (UAS-2 table 9)
TASK_MANAGEMENT_IU_SIZE: Final = 16
SENSE_IU_HEADER: Final = 16
MAX_SENSE: Final = 96  # what Linux's status URB leaves for sense data (SCSI_SENSE_BUFFERSIZE)
#: Tasks the device accepts at once; a command beyond that gets TASK SET FULL (Linux's uas keeps at
#: most 30 in flight without streams).
DEFAULT_MAX_TASKS: Final = 64
TASK_SET_FULL: Final = 0x28  # SAM-5 status code
# ABORTED COMMAND / DATA PHASE ERROR (4Bh/00h), fixed format: a data-out phase shorter than planned
_DATA_PHASE_ERROR_SENSE: Final = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4B, 0x00, 0, 0, 0, 0])


class IuId(enum.IntEnum):
    """Information unit IDs (UAS-2 table 7)."""

    COMMAND = 0x01
    SENSE = 0x03
    RESPONSE = 0x04
    TASK_MANAGEMENT = 0x05
    READ_READY = 0x06
    WRITE_READY = 0x07


class ResponseCode(enum.IntEnum):
    """RESPONSE CODE of a Response IU (UAS-2 table 17)."""

    TASK_MANAGEMENT_FUNCTION_COMPLETE = 0x00
    INVALID_INFORMATION_UNIT = 0x02
    TASK_MANAGEMENT_FUNCTION_NOT_SUPPORTED = 0x04
    TASK_MANAGEMENT_FUNCTION_FAILED = 0x05
    TASK_MANAGEMENT_FUNCTION_SUCCEEDED = 0x08
    INCORRECT_LOGICAL_UNIT_NUMBER = 0x09
    OVERLAPPED_TAG_ATTEMPTED = 0x0A


class TaskFunction(enum.IntEnum):
    """TASK MANAGEMENT FUNCTION codes (UAS-2 table 14)."""

    ABORT_TASK = 0x01
    ABORT_TASK_SET = 0x02
    CLEAR_TASK_SET = 0x04
    LOGICAL_UNIT_RESET = 0x08
    I_T_NEXUS_RESET = 0x10
    CLEAR_ACA = 0x40
    QUERY_TASK = 0x80
    QUERY_TASK_SET = 0x81
    QUERY_ASYNCHRONOUS_EVENT = 0x82


def response_iu(tag: int, code: ResponseCode, info: bytes = b"\x00\x00\x00") -> bytes:
    """Response IU (UAS-2 table 16): id, reserved, tag, additional response information, code."""
    return struct.pack(">BBH3sB", IuId.RESPONSE, 0, tag & 0xFFFF, info, code)


def sense_iu(tag: int, status: int, sense: bytes = b"") -> bytes:
    """Sense IU (UAS-2 table 12): id, reserved, tag, status qualifier, status, reserved, length, sense."""
    sense = sense[:MAX_SENSE]
    return struct.pack(">BBHHB7xH", IuId.SENSE, 0, tag & 0xFFFF, 0, status, len(sense)) + sense


def _ready_iu(iu_id: IuId, tag: int) -> bytes:
    return struct.pack(">BBH", iu_id, 0, tag)


class _Stage(enum.Enum):
    WAIT_DATA_OUT = "wait-data-out"  # queued for WRITE READY, or receiving its data
    READY = "ready"  # to be handed to the adapter
    RUNNING = "running"  # the adapter runs it
    WAIT_DATA_IN = "wait-data-in"  # ran; queued for READ READY, or sending its data


@dataclass(eq=False)
class UasTask:
    """One command of the task set. The adapter reads `cdb` and `data_out` and runs it."""

    tag: int
    cdb: bytes
    plan: CommandPlan
    stage: _Stage
    data_out: bytes | bytearray = b""
    aborted: bool = False
    data_in: bytes = b""
    status_iu: bytes = b""
    # Task management functions that answer once this running task (and the others they wait for) ended.
    waiting_tmfs: list[_PendingAnswer] = field(default_factory=list)


@dataclass(eq=False)
class _PendingAnswer:
    """The Response IU of a task management function, sent once `running` tasks have all ended."""

    tag: int
    code: ResponseCode
    running: int


@dataclass(slots=True)
class _Urb:
    tag: int
    length: int


class UasTransport:
    """The UAS task set and the status / data-in / data-out pipes of one UAS interface (see module doc)."""

    def __init__(self, plan: Callable[[bytes], CommandPlan], *, max_tasks: int = DEFAULT_MAX_TASKS) -> None:
        self._plan = plan
        self.max_tasks = max_tasks
        self._tasks: dict[int, UasTask] = {}
        self._status_urbs: collections.deque[_Urb] = collections.deque()
        self._data_in_urbs: collections.deque[_Urb] = collections.deque()
        self._status_out: collections.deque[bytes] = collections.deque()  # IUs waiting for a status URB
        self._want_in: collections.deque[UasTask] = collections.deque()  # tasks waiting for READ READY
        self._want_out: collections.deque[UasTask] = collections.deque()  # tasks waiting for WRITE READY
        self._in_task: UasTask | None = None  # owns the data-in pipe (READ READY sent)
        self._out_task: UasTask | None = None  # owns the data-out pipe (WRITE READY sent)
        self._ready: list[UasTask] = []
        #: set by LOGICAL UNIT RESET / I_T NEXUS RESET: the adapter raises a unit attention and clears it
        self.reset_requested = False
        self.counters: collections.Counter[str] = collections.Counter()

    # -- the command pipe --------------------------------------------------------------------------
    def command(self, urb: int, iu: bytes) -> list[UasCompletion]:
        """An OUT transfer on the command pipe: one Command or Task Management IU."""
        done = [UasCompletion(urb, 0, len(iu))]
        self._command_iu(bytes(iu))
        return done + self._flush_status()

    def _command_iu(self, iu: bytes) -> None:
        tag = int.from_bytes(iu[2:4], "big") if len(iu) >= 4 else 0
        if not iu:
            self._bad_iu(tag, "empty IU")
            return
        if iu[0] == IuId.COMMAND:
            self._new_command(tag, iu)
        elif iu[0] == IuId.TASK_MANAGEMENT:
            self._task_management(tag, iu)
        else:
            self._bad_iu(tag, f"IU id 0x{iu[0]:02x} on the command pipe")

    def _bad_iu(self, tag: int, why: str) -> None:
        self.counters["invalid_iu"] += 1
        log.warning("uas invalid information unit tag=%d reason=%s", tag, why)
        self._status_out.append(response_iu(tag, ResponseCode.INVALID_INFORMATION_UNIT))

    def _overlapped(self, tag: int) -> bool:
        """A new IU with a tag still in use: abort the task holding it (its status will never be
        sent, the host reused its tag) and answer OVERLAPPED TAG ATTEMPTED."""
        task = self._tasks.get(tag)
        if task is None:
            return False
        self.counters["overlapped_tag"] += 1
        log.warning("uas overlapped tag=%d stage=%s", tag, task.stage.value)
        self._abort(task)
        self._status_out.append(response_iu(tag, ResponseCode.OVERLAPPED_TAG_ATTEMPTED))
        return True

    def _new_command(self, tag: int, iu: bytes) -> None:
        if len(iu) < COMMAND_IU_SIZE:
            self._bad_iu(tag, f"command IU of {len(iu)} bytes")
            return
        extra = iu[6] & 0xFC  # ADDITIONAL CDB LENGTH in dwords, bits 7..2 (value * 4 = bytes)
        if len(iu) < COMMAND_IU_SIZE + extra:
            self._bad_iu(tag, f"command IU of {len(iu)} bytes announces {extra} more CDB bytes")
            return
        if self._overlapped(tag):
            return
        if any(iu[8:16]):
            self.counters["incorrect_lun"] += 1
            self._status_out.append(response_iu(tag, ResponseCode.INCORRECT_LOGICAL_UNIT_NUMBER))
            return
        if len(self._tasks) >= self.max_tasks:
            self.counters["task_set_full"] += 1
            self._status_out.append(sense_iu(tag, TASK_SET_FULL))
            return
        cdb = iu[16:32]
        plan = self._plan(cdb)
        self.counters["commands"] += 1
        if plan.direction == Direction.OUT and plan.length:
            task = UasTask(tag, cdb, plan, _Stage.WAIT_DATA_OUT)
            self._tasks[tag] = task
            self._want_out.append(task)
            self._next_out()
        else:
            task = UasTask(tag, cdb, plan, _Stage.READY)
            self._tasks[tag] = task
            self._ready.append(task)

    def _task_management(self, tag: int, iu: bytes) -> None:
        if len(iu) < TASK_MANAGEMENT_IU_SIZE:
            self._bad_iu(tag, f"task management IU of {len(iu)} bytes")
            return
        if self._overlapped(tag):
            return
        function, task_tag = iu[4], int.from_bytes(iu[6:8], "big")
        self.counters["task_management"] += 1
        if any(iu[8:16]):
            self._status_out.append(response_iu(tag, ResponseCode.INCORRECT_LOGICAL_UNIT_NUMBER))
            return
        log.info("uas task management function=0x%02x tag=%d task=%d", function, tag, task_tag)
        if function == TaskFunction.ABORT_TASK:
            task = self._tasks.get(task_tag)
            self._answer_after(tag, [task] if task else [], ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE)
        elif function in (TaskFunction.ABORT_TASK_SET, TaskFunction.CLEAR_TASK_SET,
                          TaskFunction.LOGICAL_UNIT_RESET, TaskFunction.I_T_NEXUS_RESET):
            if function in (TaskFunction.LOGICAL_UNIT_RESET, TaskFunction.I_T_NEXUS_RESET):
                self.reset_requested = True
            self._answer_after(tag, list(self._tasks.values()), ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE)
        elif function == TaskFunction.QUERY_TASK:
            task = self._tasks.get(task_tag)
            found = task is not None and not task.aborted
            self._status_out.append(response_iu(tag, ResponseCode.TASK_MANAGEMENT_FUNCTION_SUCCEEDED if found
                                                else ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE))
        elif function == TaskFunction.QUERY_TASK_SET:
            found = any(not t.aborted for t in self._tasks.values())
            self._status_out.append(response_iu(tag, ResponseCode.TASK_MANAGEMENT_FUNCTION_SUCCEEDED if found
                                                else ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE))
        elif function == TaskFunction.QUERY_ASYNCHRONOUS_EVENT:
            # no asynchronous event is ever pending (unit attentions are reported with commands)
            self._status_out.append(response_iu(tag, ResponseCode.TASK_MANAGEMENT_FUNCTION_COMPLETE))
        else:
            self.counters["tmf_not_supported"] += 1
            self._status_out.append(response_iu(tag, ResponseCode.TASK_MANAGEMENT_FUNCTION_NOT_SUPPORTED))

    def _answer_after(self, tmf_tag: int, tasks: list[UasTask], code: ResponseCode) -> None:
        """Abort `tasks`; answer `tmf_tag` now, or when the last of them that is running has ended."""
        running = [t for t in tasks if t.stage is _Stage.RUNNING]
        if not running:  # answered first: a READY for the next task (the pipe is free) follows it
            self._status_out.append(response_iu(tmf_tag, code))
        for task in tasks:
            self._abort(task)
        if not running:
            return
        answer = _PendingAnswer(tmf_tag, code, len(running))
        for task in running:
            task.waiting_tmfs.append(answer)

    def _abort(self, task: UasTask) -> None:
        """Forget `task` (its status is never sent); a running one still ends in `finish()`."""
        if task.aborted:
            return
        task.aborted = True
        self.counters["aborted"] += 1
        if self._tasks.get(task.tag) is task and task.stage is not _Stage.RUNNING:
            del self._tasks[task.tag]
        _remove(self._want_in, task)
        _remove(self._want_out, task)
        if task in self._ready:
            self._ready.remove(task)
        # A task that owns a data pipe gives it up: the host unlinks (or never submits) the
        # aborted task's transfer, and the next task gets its READY.
        if self._in_task is task:
            self._in_task = None
            self._next_in()
        if self._out_task is task:
            self._out_task = None
            self._next_out()

    # -- the other pipes ---------------------------------------------------------------------------
    def status_urb(self, urb: int, length: int) -> list[UasCompletion]:
        """An IN transfer on the status pipe (the host keeps one per command in flight)."""
        self._status_urbs.append(_Urb(urb, length))
        return self._flush_status()

    def data_in_urb(self, urb: int, length: int) -> list[UasCompletion]:
        """An IN transfer on the data-in pipe: the data of the task that got READ READY."""
        self._data_in_urbs.append(_Urb(urb, length))
        return self._flush_data_in() + self._flush_status()

    def data_out_urb(self, urb: int, data: bytes) -> list[UasCompletion]:
        """An OUT transfer on the data-out pipe: (part of) the data of the task that got WRITE READY."""
        task = self._out_task
        if task is None:
            self.counters["unexpected_data_out"] += 1
            log.warning("uas data-out transfer of %d bytes with no task asking for data", len(data))
            return [UasCompletion(urb, -EPIPE, 0)]
        need = task.plan.length - len(task.data_out)
        taken = min(need, len(data))
        if not task.data_out and taken == len(data):
            task.data_out = bytes(data)  # the usual case: the whole data phase in one transfer, no copy
        else:
            if not isinstance(task.data_out, bytearray):
                task.data_out = bytearray(task.data_out)
            task.data_out += data[:taken]
        done = [UasCompletion(urb, 0, taken)]
        self._out_task = None
        if task.aborted:
            pass
        elif len(task.data_out) == task.plan.length:
            task.stage = _Stage.READY
            self._ready.append(task)
        else:
            # the host's transfer was shorter than the command's data: do not run it
            self.counters["short_data_out"] += 1
            log.warning("uas data-out of %d bytes, command needs %d tag=%d", len(task.data_out),
                        task.plan.length, task.tag)  # fmt: skip
            del self._tasks[task.tag]
            self._status_out.append(sense_iu(task.tag, Status.CHECK_CONDITION, _DATA_PHASE_ERROR_SENSE))
        self._next_out()
        return done + self._flush_status()

    def cancel(self, urb: int) -> bool:
        """The host unlinked `urb`: True if it was pending here (it never completes)."""
        for queue in (self._status_urbs, self._data_in_urbs):
            for item in queue:
                if item.tag == urb:
                    queue.remove(item)
                    return True
        return False

    # -- running commands --------------------------------------------------------------------------
    def take_ready(self) -> list[UasTask]:
        """Tasks to run now (each once); the adapter reports each with `finish()`."""
        ready, self._ready = self._ready, []
        for task in ready:
            task.stage = _Stage.RUNNING
        return ready

    def finish(self, task: UasTask, result: CommandResult, sense: bytes = b"") -> list[UasCompletion]:
        """`task` ran with `result` (`sense`: the unit's sense data after a CHECK CONDITION)."""
        if self._tasks.get(task.tag) is task:
            del self._tasks[task.tag]
        for answer in task.waiting_tmfs:
            answer.running -= 1
            if answer.running == 0:
                self._status_out.append(response_iu(answer.tag, answer.code))
        task.waiting_tmfs.clear()
        if task.aborted or task.stage is not _Stage.RUNNING:
            return self._flush_status()
        status_iu = sense_iu(task.tag, result.status, sense if result.status == Status.CHECK_CONDITION else b"")
        if task.plan.direction == Direction.IN and task.plan.length and result.data and result.status == Status.GOOD:
            task.stage = _Stage.WAIT_DATA_IN
            task.data_in = bytes(result.data[: task.plan.length])
            task.status_iu = status_iu
            self._tasks[task.tag] = task
            self._want_in.append(task)
            self._next_in()
            return self._flush_data_in() + self._flush_status()
        self._status_out.append(status_iu)
        return self._flush_status()

    def reset(self) -> None:
        """A USB reset, a new configuration or alternate setting, a disconnect: every task and
        pending transfer is gone (the host unlinks its URBs); running tasks end unanswered."""
        for task in self._tasks.values():
            task.aborted = True
        self._tasks.clear()
        self._status_urbs.clear()
        self._data_in_urbs.clear()
        self._status_out.clear()
        self._want_in.clear()
        self._want_out.clear()
        self._in_task = self._out_task = None
        self._ready = []

    # -- internals ---------------------------------------------------------------------------------
    def _next_out(self) -> None:
        if self._out_task is None and self._want_out:
            task = self._want_out.popleft()
            self._out_task = task
            self._status_out.append(_ready_iu(IuId.WRITE_READY, task.tag))

    def _next_in(self) -> None:
        if self._in_task is None and self._want_in:
            task = self._want_in.popleft()
            self._in_task = task
            self._status_out.append(_ready_iu(IuId.READ_READY, task.tag))

    def _flush_data_in(self) -> list[UasCompletion]:
        task = self._in_task
        if task is None or not self._data_in_urbs:
            return []  # a data-in transfer before its READ READY waits for it
        urb = self._data_in_urbs.popleft()
        data = task.data_in[: urb.length]
        self._in_task = None
        if self._tasks.get(task.tag) is task:
            del self._tasks[task.tag]
        if not task.aborted:
            self._status_out.append(task.status_iu)
        self._next_in()
        return [UasCompletion(urb.tag, 0, len(data), data)]

    def _flush_status(self) -> list[UasCompletion]:
        done: list[UasCompletion] = []
        while self._status_urbs and self._status_out:
            urb = self._status_urbs.popleft()
            iu = self._status_out.popleft()[: urb.length]
            done.append(UasCompletion(urb.tag, 0, len(iu), iu))
        return done

    @property
    def tasks(self) -> int:
        """Tasks in the task set (queued, running or moving data)."""
        return len(self._tasks)

    def status(self) -> dict[str, object]:
        return {"tasks": len(self._tasks), "status_urbs": len(self._status_urbs),
                "queued_ius": len(self._status_out), **dict(self.counters)}


def _remove(queue: collections.deque[UasTask], task: UasTask) -> None:
    if task in queue:
        queue.remove(task)
