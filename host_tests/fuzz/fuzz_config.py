"""Fuzz the configuration file path (firmware/config.py): TOML bytes, merged and checked as
`usbmirror local` and `usbmirror remote` do with no command-line flags.

Invariant: any file content either gives checked options or raises `UsageError` (which the command
line prints as one line and exit status 2); never any other exception, never a hang.

Run: python host_tests/fuzz/fuzz_config.py -atheris_runs=100000   (or -max_total_time=60)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import contextlib

from host_tests.fuzz.runner import run_fuzzer

with atheris.instrument_imports():
    from firmware.config import (
        LOCAL_OPTS,
        REMOTE_OPTS,
        UsageError,
        local_options,
        merge_options,
        parse_config,
        remote_options,
    )


def test_one_input(data: bytes) -> None:
    try:
        cfg = parse_config(data, "fuzz.toml")
    except UsageError:
        return
    with contextlib.suppress(UsageError):
        local_options(merge_options(argparse.Namespace(), LOCAL_OPTS, cfg))
    with contextlib.suppress(UsageError):
        remote_options(merge_options(argparse.Namespace(), REMOTE_OPTS, cfg, extra=("targets",)))


def main() -> None:
    run_fuzzer(__file__, test_one_input)


if __name__ == "__main__":
    main()
