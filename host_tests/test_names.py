"""Names that do not trap: one meaning per class name across the firmware and the USB package, and a
repository that stands alone (no file points at a document that is not in it)."""

from __future__ import annotations

import ast
import re
import subprocess
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("firmware", "gadget")


def class_names(files: list[Path]) -> dict[str, list[str]]:
    where: dict[str, list[str]] = defaultdict(list)
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(f"{f.relative_to(ROOT)}:{node.lineno}")
    return where


def duplicates(where: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: places for name, places in where.items() if len(places) > 1}


def test_each_class_name_has_one_meaning() -> None:
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 50
    assert duplicates(class_names(files)) == {}


def test_the_duplicate_finder_finds_a_duplicate(tmp_path: Path) -> None:
    a = ROOT / "firmware" / "storage.py"
    b = tmp_path / "other.py"
    b.write_text("class BlockStore:\n    pass\n")
    where = class_names([a])
    where["BlockStore"].append(f"{b}:1")
    assert "BlockStore" in duplicates(where)


def test_no_file_points_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    if not tracked:  # not a git checkout (an sdist): look at the files themselves
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    outside = re.compile(r"\b(DESIGN|STYLE|REALHOST)\.md\b")
    offenders = [f for f in tracked if not f.endswith(("LICENSE",)) and (ROOT / f).is_file()
                 and f != "host_tests/test_names.py"
                 and outside.search((ROOT / f).read_text(errors="replace"))]
    assert offenders == []
