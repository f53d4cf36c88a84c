"""Roles as an operator sees them on real `usbmirror local` / `usbmirror remote` processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_tests.units import Units, streaming


@pytest.fixture
def units(tmp_path: Path) -> Iterator[Units]:
    with Units(tmp_path) as u:
        yield u


def test_status_shows_primary_and_split_brain_on_both_units(units: Units, tmp_path: Path) -> None:
    tls = units.pair("dr1", ["server1"])
    remote = units.start_remote("dr1", targets={"server1": tmp_path / "target.img"}, tls_dir=tls)
    local = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address])
    st = local.wait_status(streaming(), what="the link to the remote")
    assert st["primary"] is True and st["split_brain"] is False
    gen = st["data_generation"]
    assert isinstance(gen, str) and gen.startswith("1:")
    (src,) = remote.status()["sources"]
    assert src["primary"] is False and src["split_brain"] is False
    # the generation is kept in the state directory: a restart keeps it
    local.stop()
    roles = json.loads((local.state_dir / "roles" / "server1.json").read_text())
    assert roles["primary"] is True and len(roles["history"]) == 1
    again = units.start_local(volume=tmp_path / "volume.img", size="16M", source_id="server1", tls_dir=tls,
                              remotes=[remote.address], state_dir=local.state_dir)
    st2 = again.wait_status(streaming(), what="the link after the restart")
    assert st2["data_generation"] == gen and st2["primary"] is True


def test_local_unit_without_remotes_is_primary(units: Units, tmp_path: Path) -> None:
    local = units.start_local(volume=tmp_path / "volume.img", size="16M")
    st = local.status()
    assert st["primary"] is True and st["split_brain"] is False
