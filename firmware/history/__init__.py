"""Point-in-time history of a remote unit's target: before-images, restore points, image views.

`format` (records and meta, sans-IO), `index` (which before-image answers a read, sans-IO),
`store` (the files: writer and reader), `view` (images of a point, restore). The on-disk format
is described in docs/HISTORY.md.
"""

from firmware.history.format import HistoryCorrupt, HistoryError, PointKind
from firmware.history.index import Index, Point
from firmware.history.store import (
    DEFAULT_AGE_S,
    DEFAULT_SIZE_CAP,
    DiscardOnChange,
    HistoryReader,
    HistoryWriter,
    history_dir,
    status_keys,
    summary,
)
from firmware.history.view import ImageView, Resolved, parse_time, resolve, restore

__all__ = [
    "DEFAULT_AGE_S",
    "DEFAULT_SIZE_CAP",
    "DiscardOnChange",
    "HistoryCorrupt",
    "HistoryError",
    "HistoryReader",
    "HistoryWriter",
    "ImageView",
    "Index",
    "Point",
    "PointKind",
    "Resolved",
    "history_dir",
    "parse_time",
    "resolve",
    "restore",
    "status_keys",
    "summary",
]
