"""Serve one volume through the kernel's USB gadget stack and nothing else: no journal, no remotes.

The board bring-up tool (is the UDC there, does the host see a disk?) and what the QEMU gadget
test runs inside its guest: `python -m firmware.gadget_main --volume IMG --size 64M --udc UDC`.
The USB side (`gadget.functionfs.serve_gadget`) only sees the `LogicalUnit` contract; this module
is where a SCSI target over a plain volume is put behind it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from firmware.scsi import ScsiTarget
from firmware.stop_signals import install_stop_signals
from firmware.volume import Volume, parse_size
from gadget.descriptors import DeviceIdentity, Speed
from gadget.functionfs import DEFAULT_CHUNK, serve_gadget

log = logging.getLogger("usbmirror.gadget")


def main(argv: list[str] | None = None) -> int:
    """Serve a volume through the gadget stack, nothing else (no journal, no remotes): the board
    bring-up tool and what the QEMU gadget test runs inside the guest. Stops on SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="python -m firmware.gadget_main", description=main.__doc__)
    p.add_argument("--volume", required=True)
    p.add_argument("--size", type=parse_size)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--udc")
    p.add_argument("--serial", default="0123456789AB")
    p.add_argument("--acm", action="store_true")
    p.add_argument("--speeds", default="full,high,super")
    p.add_argument("--mountpoint", default="/run/usbmirror/ffs")
    p.add_argument("--ready-file", help="touched once the gadget is bound")
    p.add_argument("--chunk", type=parse_size, default=DEFAULT_CHUNK, help="bytes per endpoint read/write")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = install_stop_signals()
    speeds = tuple(Speed[s.strip().upper()] for s in a.speeds.split(","))
    with Volume(a.volume, size=a.size, block_size=a.block_size) as vol:
        target = ScsiTarget(vol, serial=a.serial, device_id=a.serial.encode().ljust(16, b"\0")[:16])
        ident = DeviceIdentity(serial=a.serial)
        with serve_gadget(target, ident, udc=a.udc, acm_console=a.acm, mountpoint=Path(a.mountpoint),
                          speeds=speeds, chunk=a.chunk) as session:
            log.info("serving volume=%s udc=%s", a.volume, session.udc)
            if a.ready_file:
                Path(a.ready_file).write_text(session.udc + "\n")
            stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
