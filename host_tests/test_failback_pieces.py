"""The runs a failback pulls: the differing 4 KiB pieces of the differing regions, merged."""

from __future__ import annotations

from firmware.replicator import piece_runs


def test_adjacent_pieces_merge_into_one_run_and_gaps_split_them() -> None:
    assert piece_runs([12, 37, 1280, 1281], 8, 2048, 32768) == [(96, 8), (296, 8), (10240, 16)]
    assert piece_runs([3, 1, 2], 8, 2048, 32768) == [(8, 24)]  # unordered, once each


def test_runs_stop_at_the_limit_and_at_the_volume_end() -> None:
    assert piece_runs(range(600), 8, 2048, 1 << 20) == [(0, 2048), (2048, 2048), (4096, 704)]
    assert piece_runs([4, 5, 6], 8, 2048, 45) == [(32, 13)]  # the last piece is short, the one beyond dropped
