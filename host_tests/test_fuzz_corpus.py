"""Every input kept under host_tests/fuzz/corpus/<harness>/ (the corpus `make fuzz` grows, and every
input that once crashed a parser, kept there under a `regression-` name) is replayed through its
harness on each test run: a parser that crashes again fails here, not only under the fuzzer."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
HARNESSES = sorted(FUZZ.glob("fuzz_*.py"))


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_replay_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(module: ModuleType) -> Callable[[bytes], None]:
    fn = getattr(module, "test_one_input", None) or getattr(module, "TestOneInput", None)
    assert callable(fn), f"{module.__name__} has no test_one_input"
    return fn  # type: ignore[no-any-return]


def test_every_parser_has_a_harness_and_a_kept_corpus() -> None:
    names = {p.stem for p in HARNESSES}
    assert {"fuzz_bot", "fuzz_scsi", "fuzz_usbip", "fuzz_link", "fuzz_journal", "fuzz_config", "fuzz_iscsi"} <= names
    for name in names:
        kept = FUZZ / "corpus" / name
        assert kept.is_dir() and any(kept.iterdir()), f"no kept corpus for {name}: run make fuzz and commit it"


@pytest.mark.parametrize("harness", HARNESSES, ids=lambda p: p.stem)
def test_the_kept_corpus_replays_without_a_crash(harness: Path) -> None:
    entry = _entry(_load(harness))
    inputs = sorted((FUZZ / "corpus" / harness.stem).iterdir())
    logging.disable(logging.CRITICAL)
    try:
        for path in inputs:
            try:
                entry(path.read_bytes())
            except Exception as exc:
                raise AssertionError(f"{harness.stem} crashes on {path.name}: {type(exc).__name__}: {exc}") from exc
    finally:
        logging.disable(logging.NOTSET)
