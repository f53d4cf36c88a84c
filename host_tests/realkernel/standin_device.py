"""A stand-in USB/IP mass-storage device (the PyPI ``usbip`` package's BOT/SCSI class over a file).

Only for developing the real-kernel harness while the project's own device is not available, and as a
reference point in benchmarks. Usage: ``standin_device.py IMAGE PORT`` (serves until killed; prints
``ready`` on stdout once listening).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import usbip
from usbip.classes.device.msc import MSC


class FileStore:
    block_size = 512

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.num_blocks = os.fstat(self.fd).st_size // self.block_size

    def read(self, lba: int, count: int) -> bytes:
        return os.pread(self.fd, count * self.block_size, lba * self.block_size)

    def write(self, lba: int, count: int, data: bytes) -> None:
        os.pwrite(self.fd, data, lba * self.block_size)


def main() -> int:
    image, port = sys.argv[1], int(sys.argv[2])
    dev = usbip.USBDevice(0x1209, 0x0001, product="standin disk", manufacturer="usbmirror", serial="STANDIN1")
    dev.add(MSC(FileStore(image)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with dev.plug(via=usbip.USBIP("127.0.0.1", port)):
        print("ready", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
