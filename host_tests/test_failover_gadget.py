"""`usbmirror promote --gadget [UDC]` on a remote unit (in process), against a fake configfs tree: the
promoted copy is served through the same bring-up as `usbmirror local --gadget` (`serve_gadget`: a
configfs gadget with the copy's serial and product, FunctionFS, bound to the UDC), only the kernel's
FunctionFS endpoints are replaced by a recorder that runs SCSI commands on the logical unit it was
given. A board without configfs, FunctionFS, a UDC or the permission is refused before anything
changes; failback unbinds and removes the gadget. The real kernel path is
host_tests/realkernel/test_gadget_realkernel.py's (the same `serve_gadget`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gadget.configfs as cfs
import gadget.functionfs as ffs
from firmware.failover_serve import GadgetPaths, PromotionServers
from firmware.remote_unit import PromoteError, RemoteUnit
from host_tests.test_failover_promote import _disconnect, _roles, sc  # noqa: F401  (the fixture)
from host_tests.test_history_restore import Scenario
from host_tests.test_remote_unit import BS, SIZE


class _Endpoints:
    """Stands in for `FunctionFsServer` (the kernel's ep0/ep1/ep2): keeps what it was given."""

    made: list[_Endpoints] = []

    def __init__(self, lu: Any, identity: Any, mountpoint: Path, **kw: Any) -> None:
        self.lu, self.identity, self.mountpoint = lu, identity, mountpoint
        self.running = False
        _Endpoints.made.append(self)

    def __enter__(self) -> _Endpoints:
        self.running = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False

    def request_stop(self) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {}


class _Mount:
    """Stands in for the FunctionFS mount (`mount -t functionfs`)."""

    def __init__(self, instance: str, mountpoint: Path) -> None:
        self.instance, self.mountpoint = instance, mountpoint

    def __enter__(self) -> Path:
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GadgetPaths]:
    root = tmp_path / "config"
    (root / "usb_gadget").mkdir(parents=True)
    udc = tmp_path / "udc"
    (udc / "dummy_udc.0").mkdir(parents=True)
    fs = tmp_path / "filesystems"
    fs.write_text("nodev\tconfigfs\nnodev\tfunctionfs\n")
    monkeypatch.setattr(ffs, "FunctionFsServer", _Endpoints)
    monkeypatch.setattr(cfs, "FunctionFsMount", _Mount)
    _Endpoints.made.clear()
    yield GadgetPaths(configfs_root=root, udc_class=udc, mountpoint=tmp_path / "ffs", filesystems=fs)


def _run(lu: Any, cdb: bytes, data: bytes = b"") -> tuple[int, bytes]:
    res = lu.execute(cdb, data)
    return int(res.status), bytes(res.data)


def test_promote_through_the_gadget_composes_it_like_local_and_serves_the_copy(
        sc: Scenario, board: GadgetPaths) -> None:  # noqa: F811
    _disconnect(sc)
    gadget_dir = board.configfs_root / "usb_gadget" / "usbmirror-copy"  # type: ignore[operator]
    with PromotionServers(sc.ru, gadget_paths=board) as servers:
        res = servers.promote({"source": "s1", "gadget": ""})
        assert res["gadget"] == "" and res["udc"] == "dummy_udc.0" and res["fork_seq"] == 6
        # the configfs gadget: the copy's own serial (the one it has on every bus), bound to the UDC
        assert (gadget_dir / "UDC").read_text().strip() == "dummy_udc.0"
        (ep,) = _Endpoints.made
        assert ep.running and ep.mountpoint == board.mountpoint
        serial = (gadget_dir / "strings/0x409/serialnumber").read_text().strip()
        assert serial == ep.identity.serial and len(serial) == 12
        assert (gadget_dir / "strings/0x409/product").read_text().strip() == "usbmirror copy"
        assert (gadget_dir / "configs/c.1/ffs.usbmirror-copy").is_symlink()
        # the logical unit behind the endpoints is the promoted copy, read-write
        assert _run(ep.lu, bytes([0x25]) + bytes(9))[1] == (SIZE // BS - 1).to_bytes(4, "big") + BS.to_bytes(4, "big")
        status, data = _run(ep.lu, bytes([0x28, 0, 0, 0, 0, 0, 0]) + (SIZE // BS).to_bytes(2, "big") + b"\0")
        assert status == 0 and data == sc.images[6]
        status, _ = _run(ep.lu, bytes([0x2A, 0, 0, 0, 0, 50, 0, 0, 2, 0]), b"\x5e" * (2 * BS))
        assert status == 0
        assert sc.target.read_bytes()[50 * BS:52 * BS] == b"\x5e" * (2 * BS)
        st = sc.ru.targets["s1"].status()
        assert st["promotion"]["gadget"] == "" and st["promoted_io"]["writes"] == 1
        full = {"sources": [st]}
        servers.add_status(full)
        assert full["sources"][0]["served"] == {"bus": "gadget", "gadget": "", "udc": "dummy_udc.0"}
        # failback: the host loses the disk (unbound, the gadget removed) before the hand-back
        servers.failback({"source": "s1", "timeout": 0})
        assert not ep.running and not gadget_dir.exists()
        assert _roles(sc)["promotion"]["handover"] is True  # type: ignore[index]


def test_a_restarted_remote_serves_the_copy_through_the_gadget_again(
        sc: Scenario, board: GadgetPaths) -> None:  # noqa: F811
    _disconnect(sc)
    with PromotionServers(sc.ru, gadget_paths=board) as servers:
        servers.promote({"source": "s1", "gadget": "dummy_udc.0"})
    gadget_dir = board.configfs_root / "usb_gadget" / "usbmirror-copy"  # type: ignore[operator]
    assert not gadget_dir.exists()  # the remote stopped: the gadget is gone with it
    sc.ru.stop()
    ru = RemoteUnit(sc.ru.cfg)
    ru.start()
    try:
        with PromotionServers(ru, gadget_paths=board) as servers:
            servers.resume_all()
            assert (gadget_dir / "UDC").read_text().strip() == "dummy_udc.0"
            ep = _Endpoints.made[-1]
            assert _run(ep.lu, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]))[1] == sc.images[6][:8 * BS]
    finally:
        ru.stop()


def test_a_board_without_the_gadget_stack_is_refused_before_anything_changes(
        sc: Scenario, board: GadgetPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _disconnect(sc)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ffs = tmp_path / "no-ffs"
    no_ffs.write_text("nodev\tconfigfs\nnodev\tproc\n")
    cases = [
        (GadgetPaths(configfs_root=empty, udc_class=board.udc_class, filesystems=board.filesystems), "",
         "configfs has no usb_gadget"),
        (GadgetPaths(configfs_root=board.configfs_root, udc_class=board.udc_class, filesystems=no_ffs), "",
         "the kernel has no FunctionFS"),
        (GadgetPaths(configfs_root=board.configfs_root, udc_class=empty, filesystems=board.filesystems), "",
         "no USB device controller"),
        (board, "fe980000.usb", "UDC 'fe980000.usb' not found"),
    ]
    for paths, udc, msg in cases:
        with PromotionServers(sc.ru, gadget_paths=paths) as servers, \
                pytest.raises(PromoteError, match=f"cannot serve through the USB gadget: {msg}"):
            servers.promote({"source": "s1", "gadget": udc})
    import firmware.failover_serve as fs

    monkeypatch.setattr(fs.os, "access", lambda path, mode: False)  # what a user other than root meets
    with PromotionServers(sc.ru, gadget_paths=board) as servers, \
            pytest.raises(PromoteError, match=r"no permission to create a gadget .* \(run the remote unit as root\)"):
        servers.promote({"source": "s1", "gadget": ""})
    assert _roles(sc)["primary"] is False and not _Endpoints.made
    assert list((board.configfs_root / "usb_gadget").iterdir()) == []  # type: ignore[operator]


def test_one_gadget_per_board(tmp_path: Path, board: GadgetPaths) -> None:
    from firmware.remote_unit import RemoteUnitConfig

    cfg = RemoteUnitConfig(listen=("127.0.0.1", 0), name="r1", tls_dir=None, state_dir=str(tmp_path / "state"),
                           targets={"s1": str(tmp_path / "t1.img"), "s2": str(tmp_path / "t2.img")},
                           heartbeat_timeout_s=5, history_size=16 << 20)
    with RemoteUnit(cfg) as ru:
        two = Scenario(ru)
        _disconnect(two)
        with PromotionServers(ru, gadget_paths=board) as servers:
            servers.promote({"source": "s1", "gadget": ""})
            with pytest.raises(PromoteError, match="the USB gadget already serves the copy of source s1"):
                servers.promote({"source": "s2", "gadget": ""})
            assert (board.configfs_root / "usb_gadget" / "usbmirror-copy" / "UDC").read_text().strip() \
                == "dummy_udc.0"  # type: ignore[operator]  # the first one is untouched
            assert len(_Endpoints.made) == 1 and _Endpoints.made[0].running
