"""Fuzz the iSCSI framer and connection state machine (firmware/iscsi/) with arbitrary initiator bytes.

Invariant: whatever arrives (before or after a valid login, cut at any point), `receive()` raises
nothing (the connection runs with strict=True, so an unexpected exception is not swallowed), every
PDU the target sends frames cleanly with the digests it negotiated, commands in flight never exceed
the window, and every task handed out can be completed.

Run: python host_tests/fuzz/fuzz_iscsi.py -atheris_runs=100000   (or -max_total_time=60)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from firmware.iscsi.pdu import Framer, Pdu
    from host_tests.iscsi_support import Harness

logging.disable(logging.CRITICAL)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    h = Harness(header_digest=fdp.ConsumeBool(), data_digest=fdp.ConsumeBool())
    if fdp.ConsumeBool():
        h.login()
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
        h.send_raw(chunk)  # Harness frames the output and asserts every digest matches
        assert h.conn.closed or h.conn.in_flight <= h.conn.config.limits.cmd_window
    out = Framer(max_data=1 << 24)
    out.feed(h.conn.take_output())
    while (p := out.next()) is not None:
        assert isinstance(p, Pdu)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
