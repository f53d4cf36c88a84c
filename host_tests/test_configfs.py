"""gadget.configfs against a fake configfs tree: what lands where, binding, teardown, stale gadgets,
the FunctionFS mount's order and the ACM status console (over a pty)."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from gadget import configfs as cfs


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "config"
    (root / "usb_gadget").mkdir(parents=True)
    udc = tmp_path / "udc"
    (udc / "fe980000.usb").mkdir(parents=True)
    (udc / "dummy_udc.0").mkdir()
    (udc / "dummy_udc.0" / "state").write_text("configured\n")
    return root, udc


def read(p: Path) -> str:
    return p.read_text().strip()


def test_compose_writes_ids_strings_config_and_links(tree: tuple[Path, Path]) -> None:
    root, udc = tree
    cfg = cfs.GadgetConfig(vendor_id=0x1D6B, product_id=0x0104, serial="00112233AABB", acm=True)
    g = cfs.ConfigFsGadget(cfg, configfs_root=root, udc_class=udc)
    g.create()
    d = root / "usb_gadget" / "usbmirror"
    assert read(d / "idVendor") == "0x1d6b"
    assert read(d / "idProduct") == "0x0104"
    assert read(d / "strings/0x409/serialnumber") == "00112233AABB"
    assert read(d / "strings/0x409/product") == "usbmirror disk"
    assert read(d / "configs/c.1/MaxPower") == "250"
    assert read(d / "configs/c.1/strings/0x409/configuration") == "mass storage"
    link = d / "configs/c.1/ffs.usbmirror"
    assert link.is_symlink() and link.resolve() == (d / "functions/ffs.usbmirror").resolve()
    assert (d / "configs/c.1/acm.usbmirror").is_symlink()
    assert g.acm_tty() == Path("/dev/ttyGS0")
    g.remove()
    assert not d.exists()


def test_without_acm_only_the_mass_storage_function(tree: tuple[Path, Path]) -> None:
    root, udc = tree
    with cfs.ConfigFsGadget(cfs.GadgetConfig(serial="AABBCCDDEEFF"), configfs_root=root, udc_class=udc) as g:
        assert sorted(p.name for p in (g.path / "functions").iterdir()) == ["ffs.usbmirror"]
        assert g.acm_tty() is None
    assert not g.path.exists()


def test_bind_first_udc_named_udc_and_errors(tree: tuple[Path, Path]) -> None:
    root, udc = tree
    with cfs.ConfigFsGadget(cfs.GadgetConfig(), configfs_root=root, udc_class=udc) as g:
        assert g.bind() == "dummy_udc.0"  # first in sorted order
        assert read(g.path / "UDC") == "dummy_udc.0"
        g.unbind()
        assert read(g.path / "UDC") == ""
        assert g.bind("fe980000.usb") == "fe980000.usb"
        with pytest.raises(cfs.GadgetError, match=r"not found.*dummy_udc.0"):
            g.bind("nope.usb")
    assert cfs.udc_state("dummy_udc.0", udc) == "configured"
    assert cfs.udc_state("fe980000.usb", udc) == "unknown"


def test_no_udc_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "config"
    (root / "usb_gadget").mkdir(parents=True)
    with pytest.raises(cfs.GadgetError, match="no USB device controller"):
        cfs.pick_udc(None, tmp_path / "no-udc-class")
    g = cfs.ConfigFsGadget(cfs.GadgetConfig(), configfs_root=root, udc_class=tmp_path / "empty")
    with g, pytest.raises(cfs.GadgetError, match="no USB device controller"):
        g.bind()


def test_missing_libcomposite_is_reported(tmp_path: Path) -> None:
    with pytest.raises(cfs.GadgetError, match="libcomposite"):
        cfs.ConfigFsGadget(cfs.GadgetConfig(), configfs_root=tmp_path).create()


def test_stale_gadget_after_crash_is_removed_on_start(tree: tuple[Path, Path]) -> None:
    root, udc = tree
    crashed = cfs.ConfigFsGadget(cfs.GadgetConfig(acm=True, serial="111111111111"),
                                 configfs_root=root, udc_class=udc)
    crashed.create()
    crashed.bind("dummy_udc.0")
    (crashed.path / "functions/ffs.usbmirror/leftover").write_text("x")
    # process dies here: nothing torn down
    fresh = cfs.ConfigFsGadget(cfs.GadgetConfig(serial="222222222222"), configfs_root=root, udc_class=udc)
    fresh.create()
    assert read(fresh.path / "strings/0x409/serialnumber") == "222222222222"
    assert not (fresh.path / "functions/acm.usbmirror").exists()
    assert not (fresh.path / "functions/ffs.usbmirror/leftover").exists()
    assert fresh.current_udc() == ""
    fresh.remove()
    assert list((root / "usb_gadget").iterdir()) == []


def test_other_gadgets_are_left_alone(tree: tuple[Path, Path]) -> None:
    root, udc = tree
    other = root / "usb_gadget" / "someone_else"
    other.mkdir()
    (other / "UDC").write_text("fe980000.usb\n")
    with cfs.ConfigFsGadget(cfs.GadgetConfig(), configfs_root=root, udc_class=udc):
        pass
    assert read(other / "UDC") == "fe980000.usb"


@pytest.mark.parametrize("kw", [{"vendor_id": 0x10000}, {"name": "a/b"}, {"ffs_instance": "x.y"},
                                {"max_power_ma": 0}])
def test_bad_config_is_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        cfs.GadgetConfig(**kw)  # type: ignore[arg-type]


def test_functionfs_mount_unmounts_stale_then_mounts_and_unmounts(tmp_path: Path) -> None:
    mp = tmp_path / "ffs"
    mounts = tmp_path / "mounts"
    mp.mkdir()
    mounts.write_text(f"usbmirror {mp.resolve()} functionfs rw 0 0\n")
    calls: list[list[str]] = []
    with cfs.FunctionFsMount("usbmirror", mp, mounter=calls.append, mounts=mounts) as where:
        assert where == mp
    assert calls == [["umount", str(mp)], ["mount", "-t", "functionfs", "usbmirror", str(mp)],
                     ["umount", str(mp)]]


def test_acm_console_writes_status_and_ignores_input() -> None:
    master, slave = os.openpty()
    tty = Path(os.ttyname(slave))
    try:
        status = {"role": "local", "journal": {"used_bytes": 5}}

        def read_block() -> bytes:
            got = b""
            deadline = time.monotonic() + 10
            while b"--- end ---" not in got and time.monotonic() < deadline:
                r, _, _ = select.select([master], [], [], 0.5)
                if r:
                    got += os.read(master, 4096)
            return got

        with cfs.AcmStatusConsole(tty, lambda: cfs.render_status_text(status), interval=0.05) as con:
            read_block()  # the console has opened the tty (raw, no echo)
            os.write(master, b"rm -rf /\n")  # the console is read-only: input is discarded
            read_block()
            text = (read_block() + read_block()).decode()
        assert "--- usbmirror status ---\r\n" in text
        assert "journal: used_bytes=5\r\n" in text
        assert "role: local" in text
        assert "rm -rf" not in text  # never echoed back
        assert con.lines_written >= 3
    finally:
        os.close(master)
        os.close(slave)
