"""The command line: help texts, config files merged with options, remote specs, error messages."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from firmware import cli, config, status_text
from firmware.control import ControlError, ControlServer, request
from host_tests.units import Units
from host_tests.units import usbmirror as run_cli


def test_help_lists_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for c in ("local", "remote", "status", "pair", "verify", "selftest", "rollback"):
        assert c in r.stdout


@pytest.mark.parametrize("cmd", ["local", "remote", "status", "pair", "verify", "selftest", "rollback"])
def test_each_subcommand_explains_itself(cmd: str) -> None:
    r = run_cli(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: usbmirror " + cmd in r.stdout
    assert len(r.stdout.splitlines()) > 4


def test_local_without_volume_is_a_usage_error(tmp_path: Path) -> None:
    r = run_cli("local", "--usbip", "127.0.0.1:0", "--state-dir", str(tmp_path))
    assert r.returncode == 2
    assert "--volume is required" in r.stderr


def test_config_values_and_command_line_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "local.toml"
    cfg.write_text(
        'volume = "/srv/disk.img"\nsize = "64M"\nwrite-cache = "on"\njournal_size = "32M"\n'
        '[[remote]]\naddress = "192.0.2.1:7373"\nmode = "sync"\nname = "dr1"\n'
    )
    p = cli.build_parser()
    ns = p.parse_args(["local", "--config", str(cfg), "--size", "128M"])
    o = config.merge_options(ns, config.LOCAL_OPTS, config.load_config(ns.config))
    assert o["volume"] == "/srv/disk.img"
    assert o["size"] == 128 << 20  # command line wins
    assert o["write_cache"] == "on"
    assert o["journal_size"] == 32 << 20
    assert o["block_size"] == 512  # default
    r = config.parse_remote(o["remote"][0])
    assert (r.address, r.mode, r.name) == (("192.0.2.1", 7373), "sync", "dr1")


def test_remote_from_config_string_or_tables_and_command_line_wins(tmp_path: Path) -> None:
    one = tmp_path / "one.toml"
    one.write_text('remote = "192.0.2.9:7373,mode=sync"\n')
    tables = tmp_path / "tables.toml"
    tables.write_text('[[remote]]\naddress = "192.0.2.1:7373"\n[[remote]]\naddress = "192.0.2.2:7373"\n')

    def remotes(*argv: str) -> list[tuple[tuple[str, int], str]]:
        ns = cli.build_parser().parse_args(["local", *argv])
        o = config.merge_options(ns, config.LOCAL_OPTS, config.load_config(ns.config))
        return [(r.address, r.mode) for r in config.remote_entries(o)]

    assert remotes("--config", str(one)) == [(("192.0.2.9", 7373), "sync")]
    assert remotes("--config", str(tables)) == [(("192.0.2.1", 7373), "async"), (("192.0.2.2", 7373), "async")]
    assert remotes("--config", str(tables), "--remote", "10.0.0.1:1") == [(("10.0.0.1", 1), "async")]
    assert remotes() == []


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "local.toml"
    cfg.write_text('volume = "x"\nvolumme = "typo"\n')
    ns = cli.build_parser().parse_args(["local", "--config", str(cfg)])
    with pytest.raises(config.UsageError, match="volumme"):
        config.merge_options(ns, config.LOCAL_OPTS, config.load_config(ns.config))


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("volume = \n")
    with pytest.raises(config.UsageError, match="not valid TOML"):
        config.load_config(str(cfg))


def test_remote_spec_forms() -> None:
    assert config.parse_remote("10.1.2.3:7000").mode == "async"
    r = config.parse_remote("[::1]:7000,mode=sync,name=b")
    assert (r.address, r.mode, r.name) == (("::1", 7000), "sync", "b")
    for bad in ("nohost", "h:99999", "h:1,mode=fast", "h:1,garbage"):
        with pytest.raises(config.UsageError):
            config.parse_remote(bad)


def test_status_without_a_running_unit(tmp_path: Path) -> None:
    r = run_cli("status", "--state-dir", str(tmp_path))
    assert r.returncode == 1
    assert "no unit is running" in r.stderr


def test_control_socket_round_trip_and_errors(tmp_path: Path) -> None:
    with ControlServer(tmp_path) as srv:
        srv.register("status", lambda req: {"journal": {"head_seq": 7}})
        srv.register("boom", lambda req: 1 / 0)  # type: ignore[return-value,arg-type]
        assert request(tmp_path, {"cmd": "status"}) == {"ok": True, "journal": {"head_seq": 7}}
        ans = request(tmp_path, {"cmd": "nope"})
        assert not ans["ok"] and "unknown command" in ans["error"]
        ans = request(tmp_path, {"cmd": "boom"})
        assert not ans["ok"] and "ZeroDivisionError" in ans["error"]
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(tmp_path / "control.sock"))
            s.sendall(b"{not json\n")
            assert b'"ok": false' in s.recv(4096)
        # a second unit on the same state dir is refused while the first runs
        with pytest.raises(ControlError, match="already running"):
            ControlServer(tmp_path).start()
        r = run_cli("status", "--state-dir", str(tmp_path), "--json")
        assert r.returncode == 0 and '"head_seq": 7' in r.stdout
    assert not (tmp_path / "control.sock").exists()


def test_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()  # the file stays, nobody listens: what a crashed unit leaves
    with ControlServer(tmp_path) as srv:
        srv.register("status", lambda req: {"x": 1})
        assert request(tmp_path, {"cmd": "status"})["x"] == 1


def test_identity_is_stable(tmp_path: Path) -> None:
    from firmware.identity import load_or_create

    a = load_or_create(tmp_path)
    b = load_or_create(tmp_path)
    assert a == b
    assert len(a.serial) == 24 and all(c in "0123456789ABCDEF" for c in a.serial)
    (tmp_path / "identity.json").write_text("{broken")
    with pytest.raises(ValueError, match="damaged"):
        load_or_create(tmp_path)


def test_render_status_text() -> None:
    text = status_text.render_status({
        "role": "local", "unit_uuid": "u", "pid": 1, "uptime_s": 3.0,
        "journal": {"capacity_bytes": 1 << 20, "used_bytes": 1 << 19, "head_seq": 9, "tail_seq": 2,
                    "durable_seq": 9, "write_cache": "off", "overflow": False,
                    "oldest_unconfirmed_age_s": 1.5},
        "remotes": [{"address": "h:1", "state": "streaming", "mode": "async", "acked_seq": 8,
                     "lag_bytes": 4096}],
    })
    assert "50.0%" in text and "head seq 9" in text and "h:1" in text and "overflow no" in text


def test_remote_spec_bandwidth_limit_and_unknown_keys() -> None:
    r = config.parse_remote({"address": "h:1", "bandwidth-limit": "10M"})
    assert r.extra["bandwidth_limit"] == 10 << 20
    assert config.parse_remote("h:1,bandwidth_limit=1M").extra["bandwidth_limit"] == 1 << 20
    with pytest.raises(config.UsageError, match="unknown setting"):
        config.parse_remote({"address": "h:1", "bandwith": "1M"})
    with pytest.raises(config.UsageError, match="bandwidth_limit"):
        config.parse_remote("h:1,bandwidth_limit=fast")


def test_rollback_through_a_running_remote(tmp_path: Path) -> None:
    with Units(tmp_path) as units:
        tls = units.pair("dr1", ["s1"])
        remote = units.start_remote("dr1", targets={"s1": tmp_path / "t.img"}, tls_dir=tls)
        rst = str(remote.state_dir)
        r = run_cli("rollback", "--state-dir", rst, "--source", "s1")
        assert r.returncode == 1 and "nothing to roll back" in r.stdout
        r = run_cli("rollback", "--state-dir", rst, "--source", "s2")
        assert r.returncode == 2 and "unknown source" in r.stderr
        st = run_cli("status", "--state-dir", rst)
        assert "remote unit dr1" in st.stdout and "source   s1" in st.stdout
        assert remote.stop() == 0


def test_render_status_shows_a_degraded_sync_remote() -> None:
    text = status_text.render_status({"role": "local", "remotes": [
        {"address": "h:1", "state": "connecting", "mode": "sync", "acked_seq": 3, "lag_bytes": 0,
         "degraded": True}]})
    assert "DEGRADED" in text


def test_catch_up_interval_from_config_or_command_line_and_bad_values(tmp_path: Path) -> None:
    cfg = tmp_path / "local.toml"
    cfg.write_text('volume = "/srv/disk.img"\nusbip = "127.0.0.1:3240"\ncatch_up_interval = 5\n')
    p = cli.build_parser()

    def interval(*argv: str) -> float:
        ns = p.parse_args(["local", "--config", str(cfg), *argv])
        return config.local_options(config.merge_options(ns, config.LOCAL_OPTS, config.load_config(ns.config))
                                    ).catch_up_interval

    assert interval() == 5.0
    assert interval("--catch-up-interval", "0") == 0.0  # off
    assert interval("--catch-up-interval", "2.5") == 2.5
    cfg.write_text('volume = "/srv/disk.img"\nusbip = "127.0.0.1:3240"\n')
    assert interval() == 30.0  # the default
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(config.UsageError, match="--catch-up-interval: expected seconds"):
            interval("--catch-up-interval", bad)
    with pytest.raises(config.UsageError, match="--catch-up-interval"):
        interval("--catch-up-interval", "soon")
    cfg.write_text('volume = "/srv/disk.img"\nusbip = "127.0.0.1:3240"\ncatch_up_interval = true\n')
    with pytest.raises(config.UsageError, match="--catch-up-interval: expected seconds"):
        interval()
