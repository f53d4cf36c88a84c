"""The link driver's wake-ups (firmware.link_driver) and the journal's durable listeners that drive
them: a source link hears of every durable record without a watcher thread, and a wake-up is never
lost between the driver's `clear()` and its look at the journal."""

from __future__ import annotations

import select
import socket
from collections.abc import Sequence

from firmware.journal import RecordKind
from firmware.link import protocol as jp
from firmware.link_driver import LinkDriver, Waker
from firmware.link_transport import LinkTransport
from host_tests.test_journal_ring import new_flash, open_j, payload


def readable(w: Waker) -> bool:
    r, _, _ = select.select([w], [], [], 0)
    return bool(r)


def test_waker_sends_one_byte_per_pending_wake_and_rearms_after_clear() -> None:
    w = Waker()
    try:
        assert not readable(w)
        w.wake()
        w.wake()  # already pending: no second byte
        assert readable(w)
        w.clear()
        assert not readable(w)
        w.wake()  # re-armed by clear()
        assert readable(w)
    finally:
        w.close()


def test_journal_calls_durable_listeners_when_records_become_durable_and_at_close() -> None:
    j = open_j(new_flash())
    calls: list[int] = []

    def listener() -> None:
        calls.append(j.durable_seq)

    j.add_durable_listener(listener)
    j.append(RecordKind.WRITE, 0, 1, payload(1), now_ns=1)
    assert calls == []  # appended, not yet durable
    j.sync()
    assert calls == [1]
    j.remove_durable_listener(listener)
    j.append(RecordKind.WRITE, 1, 1, payload(2), now_ns=2)
    j.sync()
    assert calls == [1]
    j.add_durable_listener(listener)
    j.close()
    assert calls == [1, 2]  # the close wakes a link that waits for records


class Recorder:
    def __init__(self) -> None:
        self.events: list[jp.Event] = []
        self.wakes: list[Waker] = []

    def on_events(self, events: Sequence[jp.Event]) -> None:
        self.events.extend(events)

    def on_wake(self, waker: Waker) -> None:
        self.wakes.append(waker)


def test_link_driver_hands_link_events_and_wake_ups_to_its_channel() -> None:
    a, b = socket.socketpair()
    source = LinkTransport(a, jp.Role.SOURCE, timeout=5)
    remote = LinkTransport(b, jp.Role.REMOTE, timeout=5)
    w = Waker()
    ch = Recorder()
    driver = LinkDriver(remote, ch, [w])
    try:
        assert driver.pump(0) is False  # nothing happened
        w.wake()
        assert driver.pump(0) is True
        assert ch.wakes == [w] and ch.events == []
        assert not readable(w)  # the driver cleared it before calling the channel
        hello = jp.Hello("lmu", bytes(16), 1 << 20, 512, 1, 0)
        source.send(hello)
        assert driver.pump(5) is True
        assert ch.events == [hello] and ch.wakes == [w]
    finally:
        w.close()
        source.close()
        remote.close()
