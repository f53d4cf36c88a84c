"""Fuzz the journey protocol (firmware/link/protocol.py) with arbitrary bytes from either peer.

Invariant: feeding any bytes to a JourneyConnection (source or remote role, fresh or after a valid
handshake, whole or split at arbitrary points) either yields events or raises `ProtocolError`;
never anything else and never a hang. After a ProtocolError the connection is CLOSED and stays so.
Every event yielded re-encodes (as the peer would send it) to a frame that decodes to the same
event. A small max_payload bounds memory.

Run: python host_tests/fuzz/fuzz_link.py -atheris_runs=100000   (or -max_total_time=60)
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import atheris
import google_crc32c

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from host_tests.fuzz.runner import run_fuzzer

with atheris.instrument_imports():
    from firmware.link import protocol as jp

_UUID = bytes(16)


def _opened(role: jp.Role) -> jp.JourneyConnection:
    src = jp.JourneyConnection(jp.Role.SOURCE, max_payload=1 << 16)
    rem = jp.JourneyConnection(jp.Role.REMOTE, max_payload=1 << 16)
    rem.receive_data(src.send(jp.Hello("fz", _UUID, 1 << 20, 512, 1, 0)))
    rem.next_event()
    src.receive_data(rem.send(jp.HelloReply("r", _UUID, 0, 1, jp.Feature.LZ4)))
    src.next_event()
    return src if role is jp.Role.SOURCE else rem


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    role = jp.Role.SOURCE if fdp.ConsumeBool() else jp.Role.REMOTE
    conn = _opened(role) if fdp.ConsumeBool() else jp.JourneyConnection(role, max_payload=1 << 16)
    step = fdp.ConsumeIntInRange(1, 4096)
    if fdp.ConsumeBool():
        # well-formed frames (valid CRC) around fuzzed payloads, to reach the payload decoders
        frames = []
        while fdp.remaining_bytes() > 2:
            ftype = fdp.ConsumeIntInRange(0, 12)
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
            head = struct.pack(">2sBBI", b"UJ", 1, ftype, len(payload))
            frames.append(head + payload + struct.pack(">I", google_crc32c.value(head + payload)))
        blob = b"".join(frames)
    else:
        blob = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        for i in range(0, max(1, len(blob)), step):
            conn.receive_data(blob[i:i + step])
            for _ in range(len(blob) + 2):  # bounded: each event consumes at least a header
                ev = conn.next_event()
                if ev is jp.NEED_DATA:
                    break
                assert not isinstance(ev, jp._NeedData)
                peer = jp.JourneyConnection(conn.peer, max_payload=1 << 20)
                peer.features = conn.features
                if not isinstance(ev, jp.Error | jp.HelloReply):
                    frame = peer._encode(ev)
                    again = jp.JourneyConnection(conn.role, max_payload=1 << 20)
                    again.features = conn.features
                    assert again._decode(jp._EVENT_TYPE[type(ev)], frame) == ev, ev
            else:
                raise AssertionError("next_event did not make progress")
    except jp.ProtocolError:
        assert conn.state is jp.ConnState.CLOSED
        try:
            conn.receive_data(b"x")
        except jp.ProtocolError:
            return
        raise AssertionError("a closed connection accepted more data") from None


def main() -> None:
    run_fuzzer(__file__, TestOneInput)


if __name__ == "__main__":
    main()
