"""A bare local unit starts on a minimal board image (and in the QEMU gadget guest) with only the Python
packages such an image carries (the guest's SITE_PACKAGES; LINK_PACKAGES are there for units with a
journey link): `usbmirror local --help` and the modules a bare local unit imports must not pull in
lz4, zstandard, rich, cryptography or prometheus_client at start-up (they are imported where used)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hw.qemu.gadget_layer import SITE_PACKAGES

REPO = Path(__file__).resolve().parents[1]
GUEST_HAS = {"construct", *SITE_PACKAGES}

BLOCKER = f"""
import sys, importlib.abc
ALLOWED = {sorted(GUEST_HAS)!r}
STDLIB = set(sys.stdlib_module_names)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in STDLIB or top in ALLOWED or top in ("firmware", "gadget", "_distutils_hack"):
            return None
        raise ImportError(f"{{name}} is not in the guest image")
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_local_unit_starts_with_only_what_the_guest_has() -> None:
    r = _run("import firmware.cli, firmware.local_main, firmware.gadget_main, firmware.local_unit, firmware.scsi\n"
             "import gadget.functionfs, gadget.usbip_server\n"
             "raise SystemExit(firmware.cli.main(['local', '--help']))\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--volume" in r.stdout


def test_the_blocker_blocks() -> None:
    r = _run("import lz4.block\n")
    assert r.returncode != 0 and "not in the guest image" in r.stderr
