"""Cursor ranges ("cells"), their planning, and the deterministic object names derived from them.

Every run, scheduled or manual, covers ``(start, end]`` on record time, cut on a fixed grid of
``range_minutes`` since the epoch. A cell is one migration's ``(t, t + range]``; its files are named
by the cell and a part number only, so any run that covers a cell writes the same object names
(re-runs overwrite instead of adding copies). Ranges are left-open/right-closed so consecutive
intervals neither overlap nor leave a gap; an update exactly on a boundary belongs to the earlier cell.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scan_ingest.exceptions import ConfigError
from scan_ingest.timestamps import compact_us, date_of_us, format_us, parse_compact_us, parse_us

_OBJECT_RE = re.compile(
    r"^(?P<prefix>.*?)/?(?P<table>updates|events)/migration=(?P<m>\d+)/date=(?P<date>\d{4}-\d{2}-\d{2})/"
    r"(?P<start>\d{8}T\d{6}(?:\.\d{6})?Z)_(?P<end>\d{8}T\d{6}(?:\.\d{6})?Z)_p(?P<part>\d{4,})\.parquet$"
)


@dataclass(frozen=True, order=True)
class Cell:
    """Updates of ``migration_id`` with ``start_us < record_time <= end_us``."""

    migration_id: int
    start_us: int
    end_us: int

    def __post_init__(self) -> None:
        if self.end_us <= self.start_us:
            raise ValueError(f"empty cell: end {self.end_us} <= start {self.start_us}")

    @property
    def key(self) -> str:
        return f"m{self.migration_id}_{compact_us(self.start_us)}_{compact_us(self.end_us)}"

    @property
    def file_stem(self) -> str:
        return f"{compact_us(self.start_us)}_{compact_us(self.end_us)}"

    def dates(self) -> list[str]:
        """Partition dates the cell can touch (two only when it ends exactly at midnight)."""
        first, last = date_of_us(self.start_us + 1), date_of_us(self.end_us)
        return [first] if first == last else [first, last]

    def to_dict(self) -> dict[str, Any]:
        return {"migration_id": self.migration_id, "start": format_us(self.start_us), "end": format_us(self.end_us)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(int(data["migration_id"]), parse_us(data["start"]), parse_us(data["end"]))

    def __str__(self) -> str:
        return f"migration {self.migration_id} ({format_us(self.start_us)}, {format_us(self.end_us)}]"


def check_interval(start_us: int, end_us: int, range_us: int) -> None:
    if end_us <= start_us:
        raise ConfigError(f"end {format_us(end_us)} must be after start {format_us(start_us)}")
    if start_us % range_us or end_us % range_us:
        minutes = range_us // 60_000_000
        raise ConfigError(
            f"interval ({format_us(start_us)}, {format_us(end_us)}] is not aligned to the {minutes}-minute "
            f"range grid (Variable scan_ingest_range_minutes); choose start and end on that grid"
        )


def plan_cells(
    start_us: int,
    end_us: int,
    range_us: int,
    migrations: Iterable[tuple[int, int | None, int | None]],
) -> list[Cell]:
    """Cells of ``(start, end]`` for each migration ``(id, min_us, max_us)`` with records there.

    Deterministic for a given interval, grid and migration list. Migrations' record-time ranges may
    overlap; each one gets its own cells.
    """
    check_interval(start_us, end_us, range_us)
    cells: list[Cell] = []
    for mig, lo, hi in sorted(migrations):
        if lo is None or hi is None or hi <= start_us or lo > end_us:
            continue
        t = start_us
        while t < end_us:
            # cell (t, t + range] holds records of this migration iff lo <= t + range and hi > t
            if lo <= t + range_us and hi > t:
                cells.append(Cell(mig, t, t + range_us))
            t += range_us
    return cells


def object_name(prefix: str, table: str, cell: Cell, date: str, part: int) -> str:
    base = f"{table}/migration={cell.migration_id}/date={date}/{cell.file_stem}_p{part:04d}.parquet"
    return f"{prefix}/{base}" if prefix else base


@dataclass(frozen=True)
class ParsedObjectName:
    table: str
    migration_id: int
    date: str
    start_us: int
    end_us: int
    part: int


def parse_object_name(name: str) -> ParsedObjectName | None:
    m = _OBJECT_RE.match(name)
    if m is None:
        return None
    return ParsedObjectName(
        table=m["table"],
        migration_id=int(m["m"]),
        date=m["date"],
        start_us=parse_compact_us(m["start"]),
        end_us=parse_compact_us(m["end"]),
        part=int(m["part"]),
    )


def partition_prefixes(prefix: str, migration_id: int, dates: Iterable[str]) -> list[str]:
    p = f"{prefix}/" if prefix else ""
    return [f"{p}{table}/migration={migration_id}/date={d}/" for table in ("updates", "events") for d in sorted(set(dates))]


def manifest_name(prefix: str, start_us: int, end_us: int, migration_id: int | None = None) -> str:
    p = f"{prefix}/" if prefix else ""
    suffix = "" if migration_id is None else f"_m{migration_id}"
    return f"{p}_manifests/{compact_us(start_us)}_{compact_us(end_us)}{suffix}.json"
