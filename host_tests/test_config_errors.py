"""A config file with a bad value is a usage error that names the option (exit status 2, one line),
never a traceback or an unexplained failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_tests.units import usbmirror


@pytest.mark.parametrize("command,body,expected", [
    ("local", 'volume = "{d}/v.img"\nusbip = "nonsense"\n', "--usbip: expected HOST:PORT"),
    ("local", 'volume = "{d}/v.img"\nusbip = "127.0.0.1:0"\nvendor_id = "zz"\n', "--vendor-id expects a 16-bit hex"),
    ("local", 'volume = "{d}/v.img"\niscsi = "127.0.0.1:99999"\n', "--iscsi: expected HOST:PORT"),
    ("remote", 'name = "r"\nlisten = "here"\ntls_dir = "{d}"\n[targets]\na = "{d}/a.img"\n', "--listen: expected HOST:PORT"),
    ("local", 'volume = "\udcff"\n', "is not UTF-8 text"),
])
def test_a_bad_config_value_is_a_usage_error_naming_it(tmp_path: Path, command: str, body: str,
                                                       expected: str) -> None:
    cfg = tmp_path / "unit.toml"
    cfg.write_bytes(body.format(d=tmp_path).encode("utf-8", "surrogateescape"))
    r = usbmirror(command, "--config", str(cfg), "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
