"""Fuzz the USB/IP parser (gadget/usbip_protocol.py) on both roles and in both phases.

Invariant: any byte stream, fed whole or one byte at a time, either parses into events or raises
`UsbipProtocolError`; never any other exception, never a hang, and both feeds give the same events.

Run: python host_tests/fuzz/fuzz_usbip.py -atheris_runs=100000   (or -max_total_time=60)
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from gadget.usbip_protocol import (
        NEED_DATA,
        ImportReply,
        ImportRequest,
        SubmitCommand,
        UnlinkCommand,
        UrbDirection,
        UsbDeviceInfo,
        UsbipConnection,
        UsbipProtocolError,
        UsbipRole,
        encode,
    )

_INFO = UsbDeviceInfo("/p", "1-1", 1, 2, 3, 0x1209, 1, 0x100, 0, 0, 0, 0, 1, 1)


def _connection(mode: int) -> UsbipConnection:
    if mode == 0:
        return UsbipConnection(UsbipRole.SERVER, max_transfer=1 << 16)
    if mode == 1:  # server after a successful import: URB commands
        conn = UsbipConnection(UsbipRole.SERVER, max_transfer=1 << 16)
        conn.receive_data(encode(ImportRequest("1-1")))
        conn.next_event()
        conn.send(ImportReply(0, _INFO))
        return conn
    if mode == 2:
        return UsbipConnection(UsbipRole.CLIENT, max_transfer=1 << 16)
    conn = UsbipConnection(UsbipRole.CLIENT, max_transfer=1 << 16)  # client with URBs in flight
    conn.receive_data(encode(ImportReply(0, _INFO)))
    conn.next_event()
    for seq in range(4):
        direction = UrbDirection.IN if seq % 2 else UrbDirection.OUT
        conn.send(SubmitCommand(seq, 0x10002, direction, 1, 0, 0))
    conn.send(UnlinkCommand(4, 0x10002, 1))
    return conn


def _run(conn: UsbipConnection, chunks: list[bytes]) -> tuple[list[object], bool]:
    events: list[object] = []
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not NEED_DATA:
                events.append(ev)
    except UsbipProtocolError:
        return events, True
    return events, False


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    whole = _run(_connection(mode), [body])
    bytewise = _run(_connection(mode), [body[i : i + 1] for i in range(len(body))])
    if whole != bytewise:
        raise AssertionError(f"whole feed {whole!r} != bytewise feed {bytewise!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
