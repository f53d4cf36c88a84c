"""The layers hold: `lint-imports` keeps every contract in `.importlinter`, and no import cycle
exists between any two modules of `firmware` and `gadget` (imports inside functions count).

The same check runs in `make lint`; it runs here too so that `make test` (what CI runs) refuses a
change that breaks a layer.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def module_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every strongly connected set of two or more modules (each is at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        # iterative Tarjan: (module, iterator over what it imports)
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c", "p.d"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    g.add_import(importer="p.d", imported="p.a")
    assert module_cycles(g) == [["p.a", "p.b", "p.c"]]
    g.remove_import(importer="p.c", imported="p.a")
    assert module_cycles(g) == []


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph("firmware", "gadget", cache_dir=None)
    assert "firmware.cli" in graph.modules and "gadget.bot" in graph.modules
    # function-level imports are in the graph: local_main imports the journal only inside run_local
    assert "firmware.journal" in graph.find_modules_directly_imported_by("firmware.local_main")
    assert module_cycles(graph) == []


def test_lint_imports_keeps_every_contract() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / ".importlinter")
    contracts = [section for section in cfg.sections() if section.startswith("importlinter:contract:")]
    assert proc.stdout.count(" KEPT") == len(contracts) >= 9  # every contract of .importlinter was checked
