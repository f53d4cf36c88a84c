"""Progress bars on the console for long work a unit does at start (the initial sync and resyncs
of each remote), drawn with `rich`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from firmware.replicator import Progress


@dataclass
class RichProgress:
    """A progress callback that draws one `rich` bar per remote and phase (for the CLI)."""

    bars: dict[tuple[str, str], Any] = field(default_factory=dict)
    _progress: Any = None

    def __enter__(self) -> RichProgress:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.fields[copied]}"), TimeRemainingColumn())
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, p: Progress) -> None:
        key = (p.remote, p.phase)
        if key not in self.bars:
            self.bars[key] = self._progress.add_task(f"{p.phase} {p.remote}", total=p.total, copied="")
        self._progress.update(self.bars[key], completed=p.done, total=p.total,
                              copied=f"{p.bytes_copied / 1e6:.1f} MB copied")
