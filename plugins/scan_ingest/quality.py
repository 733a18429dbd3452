"""Data-quality checks on written files, run before anything is committed.

Per cell (in the verify task, on the verified local files, reading only id/time columns):
rows per file equal what the writer reported; update ids unique; every transaction's event rows
equal its ``event_count`` (the size of its tree); every row's partition date equals the date of its
record time; every row lies inside its cell; required columns have no nulls.
Per interval (in the commit task, from those summaries): each cell's parts follow each other in
record time without overlap (cells never overlap, so an update cannot sit in two files), and
every cell holds as many updates as its writer fetched.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from scan_ingest.exceptions import DataQualityError
from scan_ingest.ranges import Cell
from scan_ingest.schema import TABLES
from scan_ingest.staging import StagedFile
from scan_ingest.timestamps import date_of_us, format_us


def _required_nulls(path: str, table: str) -> list[str]:
    meta = pq.ParquetFile(path).metadata
    required = [f.name for f in TABLES[table] if not f.nullable]
    bad = []
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for ci in range(group.num_columns):
            col = group.column(ci)
            if col.path_in_schema in required and col.statistics is not None and col.statistics.null_count:
                bad.append(col.path_in_schema)
    return sorted(set(bad))


def check_cell_files(cell: Cell, files: list[StagedFile]) -> dict[str, Any]:
    """Check one cell's staged files; returns a small summary for the commit task, or raises."""
    problems: list[str] = []
    parts: dict[int, dict[str, Any]] = {}
    by_part: dict[int, dict[str, StagedFile]] = {}
    for f in files:
        by_part.setdefault(f.part, {})[f.table] = f
    total_updates = 0
    for part, tables in sorted(by_part.items()):
        if set(tables) != {"updates", "events"}:
            problems.append(f"part {part}: expected an updates and an events file, got {sorted(tables)}")
            continue
        uf, ef = tables["updates"], tables["events"]
        for f in (uf, ef):
            meta = pq.ParquetFile(f.local_path).metadata
            if meta.num_rows != f.rows:
                problems.append(f"{f.object_name}: {meta.num_rows} rows in the file, {f.rows} reported by the writer")
            nulls = _required_nulls(f.local_path, f.table)
            if nulls:
                problems.append(f"{f.object_name}: nulls in required column(s) {nulls}")
        ut = pq.read_table(uf.local_path, columns=["update_id", "record_time", "event_count", "migration_id"])
        et = pq.read_table(ef.local_path, columns=["update_id", "record_time", "migration_id"])
        ids = ut.column("update_id").to_pylist()
        total_updates += len(ids)
        if len(set(ids)) != len(ids):
            dups = [k for k, v in Counter(ids).items() if v > 1][:5]
            problems.append(f"{uf.object_name}: duplicate update ids {dups}")
        for t, f in ((ut, uf), (et, ef)):
            if t.num_rows == 0:
                continue
            rts = t.column("record_time").cast("int64")
            lo, hi = pc.min(rts).as_py(), pc.max(rts).as_py()
            if lo <= cell.start_us or hi > cell.end_us:
                problems.append(f"{f.object_name}: record times {format_us(lo)}..{format_us(hi)} outside {cell}")
            if date_of_us(lo) != f.date or date_of_us(hi) != f.date:
                problems.append(f"{f.object_name}: record-time dates {date_of_us(lo)}..{date_of_us(hi)} differ from partition date={f.date}")
            migs = set(t.column("migration_id").unique().to_pylist())
            if migs != {cell.migration_id}:
                problems.append(f"{f.object_name}: migration ids {sorted(migs)} in a migration={cell.migration_id} file")
        expected = dict(zip(ids, ut.column("event_count").to_pylist(), strict=True))
        actual = Counter(et.column("update_id").to_pylist())
        wrong = [(u, expected.get(u), actual.get(u, 0)) for u in set(expected) | set(actual) if expected.get(u) != actual.get(u, 0)]
        if wrong:
            problems.append(f"part {part}: event rows differ from event_count for {len(wrong)} update(s), e.g. {wrong[:3]}")
        parts[part] = {"updates": len(ids), "first": uf.first_record_time, "last": uf.last_record_time, "events": et.num_rows}
    if problems:
        raise DataQualityError(f"data-quality check failed for {cell}: " + "; ".join(problems))
    return {"cell": cell.to_dict(), "parts": {str(k): v for k, v in parts.items()}, "updates": total_updates}


def check_interval(summaries: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    """Cross-file checks of an interval from the per-cell summaries and writer results."""
    problems: list[str] = []
    for s in summaries:
        prev_last: str | None = None
        for _part, p in sorted(s["parts"].items(), key=lambda kv: int(kv[0])):
            if p["updates"] == 0:
                continue
            if prev_last is not None and p["first"] is not None and p["first"] <= prev_last:
                problems.append(f"cell {s['cell']}: parts overlap in record time ({p['first']} <= {prev_last})")
            prev_last = p["last"]
    written = {Cell.from_dict(r["cell"]).key: r["updates"] for r in results}
    checked = {Cell.from_dict(s["cell"]).key: s["updates"] for s in summaries}
    for key, n in written.items():
        if checked.get(key) != n:
            problems.append(f"cell {key}: the writer reported {n} updates, the files hold {checked.get(key)}")
    if problems:
        raise DataQualityError("interval data-quality check failed: " + "; ".join(problems))
