"""The usbmirror disk with UAS beside Bulk-Only, as a USB/IP device: several commands in flight at once.

`UasMassStorageDevice` is a `MassStorageDevice` (ep0, Bulk-Only on alternate setting 0) whose
interface also has alternate setting 1, USB Attached SCSI (`gadget/uas_descriptors.py`). When the
host selects it (SET_INTERFACE 0/1, what Linux's `uas` does at probe), the bulk transfers go to a
`gadget.uas.UasTransport`, and the commands it hands out run on a pool of worker threads
(`uas-worker-N`), one `LogicalUnit` each, so commands with different tags run at once: concurrent
WRITEs reach the local unit together and share one journal flush (the journal's group commit).
Every WRITE is still acknowledged (its Sense IU sent) only after its own `execute()` returned, that
is once its record is durable.

Threads and locks: the USB/IP connection thread calls `submit()` / `cancel()` / `disconnect()`
under its session lock; a worker that finished a command calls the delivery function the server
attached (`attach_delivery`), which takes the same session lock, lets the device record the result
and sends the transfers it completed. The device's own lock (`_state`) is taken inside, so a
worker finishing after its importer left never races the next importer.

Unit attention: after a new configuration, an alternate setting change, a disconnect or a LOGICAL
UNIT RESET, the next command that a worker runs gets it (the worker calls `reset_event()` on its
own unit first, between two of its commands as the `LogicalUnit` contract asks), so the host hears
of it once. Sense data: after a CHECK CONDITION the worker reads its unit's sense with REQUEST SENSE
before running anything else, and the Sense IU carries it (UAS has autosense).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Final

from firmware.logical_unit import CommandResult, LogicalUnit, Status
from gadget.bot import BotCommand
from gadget.descriptors import DeviceIdentity, Speed
from gadget.mass_storage import EPIPE, Completion, FeatureSelector, MassStorageDevice, Recipient, Request, _Stalled
from gadget.uas import UasCompletion, UasTask, UasTransport
from gadget.uas_descriptors import (
    PIPE_OF_ENDPOINT,
    UAS_ALTERNATE_SETTING,
    Pipe,
    uas_configuration_descriptor,
)

log = logging.getLogger(__name__)

#: REQUEST SENSE, fixed format, allocation length 252 (SPC-4 6.39)
_REQUEST_SENSE: Final = bytes([0x03, 0, 0, 0, 252, 0])
#: ABORTED COMMAND / INTERNAL TARGET FAILURE (44h/00h), if a unit raised (it never should)
_INTERNAL_FAILURE_SENSE: Final = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0x00, 0, 0, 0, 0])

Produce = Callable[[], list[Completion]]
Deliver = Callable[[object, Produce], None]


class UasMassStorageDevice(MassStorageDevice):
    """A mass-storage device with Bulk-Only (alternate setting 0) and UAS (alternate setting 1).

    `lu` plans every command and runs the Bulk-Only ones; `workers` are the units the UAS commands
    run on, one thread each (they must share one store; the local unit builds them over one
    `SharedUnit`, like the iSCSI pool)."""

    def __init__(
        self,
        lu: LogicalUnit,
        workers: Sequence[LogicalUnit],
        identity: DeviceIdentity,
        speed: Speed = Speed.HIGH,
    ) -> None:
        if Speed(speed) is Speed.SUPER:
            raise ValueError("UAS at SuperSpeed needs bulk streams, which this device does not implement")
        if not workers:
            raise ValueError("UAS needs at least one worker unit")
        super().__init__(lu, identity, speed)
        self._config_desc = uas_configuration_descriptor(identity, self.speed)
        self.alternate = 0
        self.uas = UasTransport(lu.plan)
        self._units = list(workers)
        self._state = threading.RLock()
        self._work: queue.SimpleQueue[UasTask | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._deliver: Deliver | None = None
        self._attention = False  # the next UAS command reports a unit attention
        self._running = 0
        self._most_running = 0  # the most UAS commands ever running at once (status: "most_running")

    # -- the server's hooks ------------------------------------------------------------------------
    def attach_delivery(self, deliver: Deliver | None) -> None:
        """The importer's session: `deliver(device, produce)` calls `produce()` under the session's
        lock and sends the completions it returns."""
        with self._state:
            self._deliver = deliver

    def submit(
        self, tag: int, endpoint: int, direction_in: bool, length: int, setup: bytes = b"", data: bytes = b""
    ) -> list[Completion]:
        with self._state:
            if endpoint == 0 or self.alternate != UAS_ALTERNATE_SETTING or self.configuration == 0:
                return super().submit(tag, endpoint, direction_in, length, setup, data)
            pipe = PIPE_OF_ENDPOINT.get(endpoint | (0x80 if direction_in else 0))
            if pipe is Pipe.COMMAND:
                self.stats["uas_command"] += 1
                done = self.uas.command(tag, data)
                self._after_tmf()
            elif pipe is Pipe.STATUS:
                done = self.uas.status_urb(tag, length)
            elif pipe is Pipe.DATA_IN:
                self.stats["bulk_in"] += 1
                done = self.uas.data_in_urb(tag, length)
            elif pipe is Pipe.DATA_OUT:
                self.stats["bulk_out"] += 1
                done = self.uas.data_out_urb(tag, data)
            else:
                log.warning("uas transfer to missing endpoint ep=%d in=%s", endpoint, direction_in)
                return [Completion(tag, -EPIPE, 0)]
            self._start_ready()
            return _completions(done)

    def take_command(self) -> BotCommand | None:
        with self._state:
            if self.alternate == UAS_ALTERNATE_SETTING:
                return None  # UAS commands run on the device's workers
            return super().take_command()

    def cancel(self, tag: int) -> bool:
        with self._state:
            if self.alternate == UAS_ALTERNATE_SETTING and self.uas.cancel(tag):
                return True
            return super().cancel(tag)

    def disconnect(self) -> None:
        with self._state:
            super().disconnect()
            self._select(0)
            self._deliver = None
            self._stop_workers()

    def close(self) -> None:
        """Stop the worker threads (running commands end first)."""
        with self._state:
            self._stop_workers()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(5.0)

    def status(self) -> dict[str, object]:
        with self._state:
            return {**super().status(), "alternate_setting": self.alternate,
                    "uas": {**self.uas.status(), "running": self._running,
                                                     "most_running": self._most_running}}

    # -- ep0: alternate settings -------------------------------------------------------------------
    def _dispatch(self, rtype: int, request: int, value: int, index: int, w_length: int, data: bytes) -> bytes:
        standard_interface = (rtype >> 5) & 3 == 0 and rtype & 0x1F == Recipient.INTERFACE
        if standard_interface and request == Request.SET_INTERFACE and not rtype & 0x80:
            if self.configuration == 0 or index != 0 or value not in (0, UAS_ALTERNATE_SETTING):
                raise _Stalled("SET_INTERFACE to a missing interface or alternate setting")
            self._select(value)
            log.info("set interface alternate=%d (%s)", value, "uas" if value else "bulk-only")
            return b""
        if standard_interface and request == Request.GET_INTERFACE and rtype & 0x80:
            if self.configuration == 0 or index != 0:
                raise _Stalled("GET_INTERFACE of a missing interface")
            return bytes([self.alternate])
        return super()._dispatch(rtype, request, value, index, w_length, data)

    def _configure(self, value: int) -> None:
        super()._configure(value)
        self._select(0)

    def _select(self, alternate: int) -> None:
        # USB 2.0 9.1.1.5: selecting an alternate setting puts its endpoints in their initial
        # state; the tasks of the other setting are gone (the host unlinked their transfers)
        self.uas.reset()
        self.bot.bus_reset()
        self.alternate = alternate
        self._attention = True

    def _endpoint_halted(self, address: int) -> bool:
        if self.alternate != UAS_ALTERNATE_SETTING or address in (0x00, 0x80):
            return super()._endpoint_halted(address)
        if self.configuration == 0 or address not in PIPE_OF_ENDPOINT:
            raise _Stalled(f"no endpoint 0x{address:02x}")
        return False  # UAS pipes never stay halted: errors are reported in IUs

    def _feature(self, set_it: bool, recipient: int, feature: int, index: int) -> None:
        if (self.alternate == UAS_ALTERNATE_SETTING and recipient == Recipient.ENDPOINT
                and feature == FeatureSelector.ENDPOINT_HALT and index & 0xFF not in (0x00, 0x80)):
            self._endpoint_halted(index & 0xFF)  # stalls for an endpoint that does not exist
            return
        super()._feature(set_it, recipient, feature, index)

    # -- workers -------------------------------------------------------------------------------------
    def _after_tmf(self) -> None:
        if self.uas.reset_requested:  # LOGICAL UNIT RESET / I_T NEXUS RESET
            self.uas.reset_requested = False
            self._attention = True

    def _start_ready(self) -> None:
        ready = self.uas.take_ready()
        if not ready:
            return
        if not self._threads:
            for n, unit in enumerate(self._units):
                thread = threading.Thread(target=self._work_loop, args=(unit, self._work), name=f"uas-worker-{n}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
        self._running += len(ready)
        self._most_running = max(self._most_running, self._running)
        for task in ready:
            self._work.put(task)

    def _stop_workers(self) -> None:
        if not self._threads:
            return
        for _ in self._threads:
            self._work.put(None)
        self._work = queue.SimpleQueue()  # commands queued after this go to new workers
        self._threads = []

    def _work_loop(self, unit: LogicalUnit, work: queue.SimpleQueue[UasTask | None]) -> None:
        while (task := work.get()) is not None:
            with self._state:
                attention, self._attention = self._attention, False
            if attention:
                unit.reset_event()
            sense = b""
            try:
                data = task.data_out
                result = unit.execute(task.cdb, data if isinstance(data, bytes) else bytes(data))
                if result.status == Status.CHECK_CONDITION:
                    sense = unit.execute(_REQUEST_SENSE).data
            except Exception:  # a unit never raises; if one does, the host gets an error, not a hang
                log.exception("uas command raised tag=%d opcode=0x%02x", task.tag, task.cdb[0])
                result, sense = CommandResult(Status.CHECK_CONDITION), _INTERNAL_FAILURE_SENSE
            self._report(task, result, sense)

    def _report(self, task: UasTask, result: CommandResult, sense: bytes) -> None:
        def produce() -> list[Completion]:
            with self._state:
                self._running -= 1
                done = self.uas.finish(task, result, sense)
                self._start_ready()
                return _completions(done)

        with self._state:
            deliver = self._deliver
        if deliver is None:
            produce()  # nobody to tell (the importer left): record it and drop the replies
        else:
            deliver(self, produce)


def _completions(done: list[UasCompletion]) -> list[Completion]:
    return [Completion(c.tag, c.status, c.actual_length, c.data) for c in done]
