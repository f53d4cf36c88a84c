"""`usbmirror promote --iscsi HOST:PORT [--iscsi-chap USER:SECRET]` on a remote unit (in process): the
promoted copy is served read-write by the project's iSCSI target; an initiator logs in (with CHAP
when it was asked for, refused without it), reads the copy as the source wrote it and writes into
the target; status names the IQN and portal; a restart serves it the same way (with CHAP again);
failback stops the iSCSI service."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from firmware.failover_serve import PromotionServers
from firmware.remote_unit import PromoteError, RemoteUnit
from host_tests.iscsi_support import LoginRefused, SocketInitiator
from host_tests.test_failover_promote import _disconnect, _roles, sc  # noqa: F401  (the fixture)
from host_tests.test_history_restore import Scenario
from host_tests.test_remote_unit import BS, SIZE

CHAP = ("standby", "a-long-secret-1")


def _port(portal: str) -> int:
    return int(portal.rsplit(":", 1)[1])


def test_promote_over_iscsi_serves_the_copy_read_write(sc: Scenario) -> None:  # noqa: F811
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        res = servers.promote({"source": "s1", "iscsi": "127.0.0.1:0"})
        iqn, portal = res["iscsi_target"], res["iscsi"]
        assert iqn.startswith("iqn.2026-01.net.usbmirror:copy-s1-") and res["iscsi_chap"] is False
        assert res["fork_seq"] == 6 and "usbip" not in res
        with SocketInitiator(_port(portal), iqn) as ini:
            assert ini.read_capacity() == (SIZE // BS, BS)
            assert ini.read10(0, SIZE // BS) == sc.images[6]  # the copy, byte for byte as the source wrote it
            assert ini.write10(100, b"\x77" * (4 * BS)) == (0, b"")
            assert ini.read10(100, 4) == b"\x77" * (4 * BS)
            st = sc.ru.targets["s1"].status()
            # the promotion record names the bus: what a restart serves on again, and what status shows
            assert st["promotion"]["iscsi"] == portal and st["promotion"]["iscsi_target"] == iqn
            assert st["promoted_io"]["writes"] == 1 and st["promoted_io"]["dirty_regions"] == 1
            full = {"sources": [st]}
            servers.add_status(full)
            served = full["sources"][0]["served"]
            assert served["bus"] == "iscsi" and served["target"] == iqn and served["portal"] == portal
            assert served["logins"] == 1 and served["sessions"][0]["phase"] == "full_feature"
        assert sc.target.read_bytes()[100 * BS:104 * BS] == b"\x77" * (4 * BS)
        # a second promotion is refused, and the other bus options are checked
        with pytest.raises(PromoteError, match="already primary"):
            servers.promote({"source": "s1", "iscsi": "127.0.0.1:0"})


def test_promote_over_iscsi_with_chap_refuses_logins_without_it_also_after_a_restart(sc: Scenario  # noqa: F811
                                                                                    ) -> None:
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        res = servers.promote({"source": "s1", "iscsi": "127.0.0.1:0", "iscsi_chap": ":".join(CHAP)})
        iqn, port = res["iscsi_target"], _port(res["iscsi"])
        assert res["iscsi_chap"] is True and "iscsi_chap_user" not in res
        with pytest.raises(LoginRefused) as none:
            SocketInitiator(port, iqn)
        assert none.value.status[0] == 0x02  # an initiator error: no login without CHAP
        with pytest.raises(LoginRefused):
            SocketInitiator(port, iqn, chap=(CHAP[0], "the-wrong-secret"))
        with SocketInitiator(port, iqn, chap=CHAP) as ini:
            assert ini.write10(7, b"\x42" * BS) == (0, b"")
    # the secret is kept for the restart, readable by the owner only, never in the role state or status
    secret = Path(sc.state) / "roles" / "s1.iscsi-chap"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert CHAP[1] not in json.dumps(_roles(sc)) and _roles(sc)["promotion"]["iscsi_chap_user"] == CHAP[0]
    sc.ru.stop()
    ru = RemoteUnit(sc.ru.cfg)
    ru.start()
    try:
        with PromotionServers(ru) as servers:
            servers.resume_all()
            with pytest.raises(LoginRefused):
                SocketInitiator(port, iqn)
            with SocketInitiator(port, iqn, chap=CHAP) as ini:
                assert ini.read10(7, 1) == b"\x42" * BS
            assert CHAP[1] not in json.dumps(ru.targets["s1"].status())
        # without its secret the copy is not served at all (never without CHAP)
        secret.unlink()
        with PromotionServers(ru) as servers:
            ru.targets["s1"].end_promotion_io()
            servers.resume_all()
            st = ru.targets["s1"].status()
            assert "not served without CHAP" in st["promotion_error"]
            with pytest.raises(OSError):
                SocketInitiator(port, iqn, chap=CHAP)
    finally:
        ru.stop()


def test_failback_stops_the_iscsi_service(sc: Scenario) -> None:  # noqa: F811
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        res = servers.promote({"source": "s1", "iscsi": "127.0.0.1:0", "iscsi_chap": ":".join(CHAP)})
        port = _port(res["iscsi"])
        ini = SocketInitiator(port, res["iscsi_target"], chap=CHAP)
        assert ini.write10(9, b"\x31" * BS) == (0, b"")
        out = servers.failback({"source": "s1", "timeout": 0})
        assert out["promoted_io"]["writes"] == 1
        with pytest.raises(OSError):  # the session is gone ...
            ini.read10(9, 1)
        ini.close()
        with pytest.raises(OSError):  # ... and so is the portal
            SocketInitiator(port, res["iscsi_target"], chap=CHAP)
        assert not (Path(sc.state) / "roles" / "s1.iscsi-chap").exists()
        assert _roles(sc)["promotion"]["handover"] is True
    assert sc.target.read_bytes()[9 * BS:10 * BS] == b"\x31" * BS


def test_promote_bus_refusals_change_nothing(sc: Scenario) -> None:  # noqa: F811
    _disconnect(sc)
    with PromotionServers(sc.ru) as servers:
        for req, msg in (({}, "give exactly one of --usbip"),
                         ({"usbip": "127.0.0.1:0", "iscsi": "127.0.0.1:0"}, r"not --usbip, --iscsi"),
                         ({"iscsi": "nowhere"}, "expected HOST:PORT"),
                         ({"iscsi": "127.0.0.1:0", "iscsi_chap": "u:short"}, "12 to 255 characters"),
                         ({"usbip": "127.0.0.1:0", "iscsi_chap": ":".join(CHAP)}, "needs --iscsi")):
            with pytest.raises(PromoteError, match=msg):
                servers.promote({"source": "s1", **req})
        with socket.create_server(("127.0.0.1", 0)) as taken, \
                pytest.raises(PromoteError, match="cannot listen for iSCSI"):
            servers.promote({"source": "s1", "iscsi": f"127.0.0.1:{taken.getsockname()[1]}"})
    assert _roles(sc)["primary"] is False
    assert not (Path(sc.state) / "roles" / "s1.iscsi-chap").exists()


def test_promote_command_needs_exactly_one_bus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from firmware import cli

    base = ["promote", "--state-dir", str(tmp_path), "--source", "s1"]
    assert cli.main(base) == 2
    assert "give exactly one of --usbip HOST:PORT, --iscsi HOST:PORT or --gadget [UDC]" in capsys.readouterr().err
    assert cli.main([*base, "--usbip", "127.0.0.1:1", "--iscsi", "127.0.0.1:2"]) == 2
    assert cli.main([*base, "--usbip", "127.0.0.1:1", "--iscsi-chap", ":".join(CHAP)]) == 2
    assert "--iscsi-chap needs --iscsi HOST:PORT" in capsys.readouterr().err
