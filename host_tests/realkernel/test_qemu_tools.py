"""Fast checks of the QEMU harness pieces that need no guest: cpio layers, ELF reading, kernel payload
extraction, marker parsing and the guestfwd relay (what the real-kernel tests stand on)."""

from __future__ import annotations

import lzma
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hw.qemu.build_guest import (
    BuildError,
    CpioWriter,
    ModuleIndex,
    _parse_depends,
    elf_section,
    extract_vmlinux,
    read_elf_dynamic,
    script_layer,
)
from hw.qemu.guest import parse_markers

RELAY = Path(__file__).resolve().parents[2] / "hw" / "qemu" / "relay.py"


def parse_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)); checks magic and 4-byte alignment of every part."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    off = 0
    while True:
        assert off % 4 == 0, f"header at unaligned offset {off}"
        hdr = data[off:off + 110]
        assert hdr[:6] == b"070701", f"bad magic {hdr[:6]!r} at {off}"
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        assert data[off + 110 + namesize - 1] == 0
        off += 110 + namesize
        off += -off % 4
        body = data[off:off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            assert off == len(data), "bytes after the trailer"
            return out
        out[name] = (fields[1], body, (fields[9], fields[10]))


def test_cpio_layer_is_newc_padded_and_creates_parents_first() -> None:
    w = CpioWriter()
    w.add_file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    w.add_symlink("bin/tool", "/usr/bin/tool")
    w.add_chardev("dev/console", 5, 1)
    w.add_file("odd", b"x" * 5)
    data = w.finish()
    assert len(data) % 4 == 0
    entries = parse_cpio(data)
    names = list(entries)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/tool")
    mode, body, _ = entries["usr/bin/tool"]
    assert stat.S_ISREG(mode) and mode & 0o777 == 0o755 and body == b"#!/bin/sh\necho hi\n"
    mode, body, _ = entries["bin/tool"]
    assert stat.S_ISLNK(mode) and body == b"/usr/bin/tool"
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert entries["odd"][1] == b"xxxxx"


def test_layers_concatenate_and_a_later_layer_carries_the_script() -> None:
    base = CpioWriter()
    base.add_file("init", b"#!/bin/sh\n", 0o755)
    run = script_layer("echo run\n", {"/data/blob.bin": b"\x00\x01\x02"})
    both = base.finish() + run
    first = parse_cpio(both[:len(both) - len(run)])
    second = parse_cpio(run)
    assert "init" in first
    assert second["run.sh"][1] == b"echo run\n" and second["run.sh"][0] & 0o111
    assert second["data/blob.bin"][1] == b"\x00\x01\x02"


def test_elf_dynamic_of_a_host_binary_names_libc_and_the_loader() -> None:
    data = Path(sys.executable).resolve().read_bytes()
    dyn = read_elf_dynamic(data)
    assert dyn is not None
    assert dyn.interp is not None and "ld-linux" in dyn.interp
    ldd = subprocess.run(["ldd", sys.executable], capture_output=True, text=True, check=True).stdout
    for lib in dyn.needed:
        assert lib in ldd, f"{lib} from DT_NEEDED not in ldd output"
    assert read_elf_dynamic(b"#!/bin/sh\n") is None
    assert elf_section(data, ".dynstr") is not None


def _fake_bzimage(payload: bytes) -> bytes:
    setup_sects = 3
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", img, 0x248, 100, len(payload))
    return bytes(img) + bytes(100) + payload + bytes(64)


def test_vmlinux_is_extracted_from_an_xz_bzimage_payload() -> None:
    elf = b"\x7fELF" + os.urandom(4000)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    assert extract_vmlinux(_fake_bzimage(payload)) == elf
    with pytest.raises(BuildError, match="compression"):
        extract_vmlinux(_fake_bzimage(b"\x00\x01garbage"))
    with pytest.raises(BuildError, match="bzImage"):
        extract_vmlinux(bytes(4096))


def _fake_module(path: Path, modinfo: bytes) -> None:
    """A minimal ELF64 file with a .modinfo section, as kernel modules have."""
    shstr = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    mi_off = body_off
    sh_off_str = mi_off + len(modinfo)
    shoff = sh_off_str + len(shstr)
    shoff += -shoff % 8
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 2)
    sections = bytes(64)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, mi_off, len(modinfo), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, sh_off_str, len(shstr), 0, 0, 1, 0)
    data = bytes(hdr) + modinfo + shstr
    data += bytes(shoff - len(data)) + sections
    path.write_bytes(data)


def test_module_load_order_puts_dependencies_and_softdeps_first(tmp_path: Path) -> None:
    kdir = tmp_path / "kernel"
    kdir.mkdir()
    _fake_module(kdir / "top.ko", b"name=top\0depends=mid,base-lib\0softdep=pre: crc\0")
    _fake_module(kdir / "mid.ko", b"name=mid\0depends=base_lib\0")
    _fake_module(kdir / "base-lib.ko", b"name=base_lib\0depends=\0")
    _fake_module(kdir / "crc.ko", b"name=crc\0depends=\0")
    (tmp_path / "modules.builtin").write_text("kernel/builtin_one.ko\n")
    _fake_module(kdir / "needs_builtin.ko", b"depends=builtin_one\0")
    index = ModuleIndex(tmp_path)
    order = [m.name for m in index.load_order(["top", "needs_builtin"])]
    assert order.index("base_lib") < order.index("mid") < order.index("top")
    assert order.index("crc") < order.index("top")
    assert "builtin_one" not in order and order[-1] == "needs_builtin"
    with pytest.raises(BuildError, match="nowhere"):
        index.load_order(["nowhere"])


def test_depends_field_parsing_keeps_alternatives_and_drops_versions() -> None:
    deps = _parse_depends("libc6 (>= 2.34), libfoo1 | libfoo2 (>> 1), python3:any, zlib1g [amd64]")
    assert deps == (("libc6",), ("libfoo1", "libfoo2"), ("python3",), ("zlib1g",))


def test_markers_are_parsed_from_console_lines_only() -> None:
    out = "noise @@USBMIRROR x=1\n@@USBMIRROR disk=sda blocks=131072 flag\n@@USBMIRROR failed=sg_inq\n"
    assert parse_markers(out) == {"disk": "sda", "blocks": "131072", "flag": "", "failed": "sg_inq"}


def _echo_upper_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, thread


def test_relay_carries_bytes_both_ways_and_prints_nothing() -> None:
    """The relay runs with a TCP socket as stdin/stdout (as libslirp hands it over)."""
    srv, thread = _echo_upper_server()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    guest = socket.create_connection(lst.getsockname())
    relay_side, _ = lst.accept()
    lst.close()
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(RELAY), str(srv.getsockname()[1])],
                            stdin=relay_side.fileno(), stdout=relay_side.fileno(), stderr=relay_side.fileno())
    relay_side.close()
    try:
        guest.settimeout(10)
        payload = os.urandom(300_000).hex().encode()[:500_000]
        sender = threading.Thread(target=guest.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = guest.recv(65536)
            assert chunk, "relay closed early"
            got += chunk
        sender.join()
        assert bytes(got) == payload.upper()
        guest.shutdown(socket.SHUT_WR)
        assert guest.recv(10) == b"", "relay did not pass the server's EOF back"
        assert proc.wait(10) == 0
    finally:
        guest.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.close()
        thread.join(5)


def test_relay_exits_quietly_when_the_port_is_closed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-I", "-S", str(RELAY), str(port)], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=20, check=False)
    assert proc.returncode == 1 and proc.stdout == b"" and proc.stderr == b""
