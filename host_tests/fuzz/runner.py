"""How every harness in this directory starts libFuzzer under atheris.

libFuzzer re-runs its own command line in a shell for `-merge=1` (the kept corpus is merged that
way); a Python harness's argv[0] is the script, not a program, so it is given as "python script".
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris


def run_fuzzer(script: str, test_one_input: Callable[[bytes], None]) -> None:
    argv = [f"{sys.executable} {script}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
