"""Human summary of an ingested bucket: per migration and partition day, what is there.

    python tools/bucket_summary.py --bucket BUCKET [--prefix raw] [--from 2025-03-01] [--to 2025-03-02]

For each migration and day (the ``date=`` partition): update and event rows, files, first and last
record time, and the record times of that day no manifest covers (gaps). Only Parquet footers (row
counts, ``record_time`` statistics) and manifests are read, never the data. Works against the GCS
emulator when ``STORAGE_EMULATOR_HOST`` is set, otherwise with Application Default Credentials.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

_PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")
if _PLUGINS not in sys.path:
    sys.path.insert(0, _PLUGINS)

from scan_ingest.audit import (  # noqa: E402
    RangedBlobReader,
    discover_bucket_migrations,
    find_gaps,
    load_manifests,
)
from scan_ingest.ranges import parse_object_name  # noqa: E402
from scan_ingest.timestamps import US_PER_DAY, format_us, parse_us  # noqa: E402


def make_client(project: str | None = None) -> Any:
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "emulator", credentials=AnonymousCredentials())
    return storage.Client(project=project)


@dataclass
class Footer:
    name: str
    table: str
    migration_id: int
    date: str
    rows: int = 0
    first_us: int | None = None
    last_us: int | None = None
    error: str | None = None


def read_footer(blob: Any, size: int) -> Footer:
    """Row count and record_time min/max from the footer's statistics (one small ranged read)."""
    import pyarrow.parquet as pq

    p = parse_object_name(blob.name)
    assert p is not None
    out = Footer(blob.name, p.table, p.migration_id, p.date)
    try:
        meta = pq.ParquetFile(RangedBlobReader(blob, size, block=64 * 1024)).metadata
        out.rows = meta.num_rows
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        idx = names.index("record_time")
        for rg in range(meta.num_row_groups):
            stats = meta.row_group(rg).column(idx).statistics
            if stats is None or not stats.has_min_max:
                continue
            lo, hi = int(stats.min_raw), int(stats.max_raw)  # INT64 microseconds
            out.first_us = lo if out.first_us is None else min(out.first_us, lo)
            out.last_us = hi if out.last_us is None else max(out.last_us, hi)
    except Exception as exc:  # noqa: BLE001 - shown in the summary, the rest still prints
        out.error = f"{type(exc).__name__}: {exc}"[:200]
    return out


def _dates_present(client: Any, bucket: str, prefix: str, migration: int) -> set[str]:
    p = f"{prefix}/" if prefix else ""
    found: set[str] = set()
    for table in ("updates", "events"):
        it = client.list_blobs(bucket, prefix=f"{p}{table}/migration={migration}/", delimiter="/")
        for _ in it:
            pass
        found |= {s.rstrip("/").rsplit("date=", 1)[-1] for s in it.prefixes if "date=" in s}
    return found


@dataclass
class DayRow:
    migration_id: int
    date: str
    updates: int = 0
    events: int = 0
    files: int = 0
    first_us: int | None = None
    last_us: int | None = None
    errors: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)


def _hhmm(us: int, day_start: int) -> str:
    return "24:00" if us - day_start == US_PER_DAY else format_us(us)[11:16]


def summarise(client: Any, bucket: str, prefix: str, date_from: str | None = None, date_to: str | None = None,
              max_workers: int = 8) -> str:
    prefix = prefix.strip("/")
    migrations = discover_bucket_migrations(client, bucket, prefix)
    dates_by_mig = {m: _dates_present(client, bucket, prefix, m) for m in migrations}
    all_dates = sorted(set().union(*dates_by_mig.values())) if dates_by_mig else []
    first = date_from or (all_dates[0] if all_dates else None)
    last = date_to or (all_dates[-1] if all_dates else None)
    head = f"gs://{bucket}/{prefix}"
    if first is None or last is None:
        return f"{head}: no data files"
    d0, d1 = date.fromisoformat(first), date.fromisoformat(last)
    days = [(d0 + timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]

    p = f"{prefix}/" if prefix else ""
    blobs = []
    for m in migrations:
        for d in days:
            if d not in dates_by_mig[m]:
                continue
            for table in ("updates", "events"):
                for blob in client.list_blobs(bucket, prefix=f"{p}{table}/migration={m}/date={d}/"):
                    if parse_object_name(blob.name) is not None:
                        blobs.append(blob)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        footers = list(pool.map(lambda b: read_footer(b, int(b.size or 0)), blobs))

    start_us, end_us = parse_us(f"{first}T00:00:00Z"), parse_us(f"{last}T00:00:00Z") + US_PER_DAY
    manifests = load_manifests(client, bucket, prefix, start_us, end_us)
    rows: dict[tuple[int, str], DayRow] = {}
    for f in footers:
        r = rows.setdefault((f.migration_id, f.date), DayRow(f.migration_id, f.date))
        r.files += 1
        if f.error:
            r.errors.append(f"{f.name}: {f.error}")
            continue
        if f.table == "updates":
            r.updates += f.rows
            if f.first_us is not None:
                r.first_us = f.first_us if r.first_us is None else min(r.first_us, f.first_us)
            if f.last_us is not None:
                r.last_us = f.last_us if r.last_us is None else max(r.last_us, f.last_us)
        else:
            r.events += f.rows
    known = set(migrations) | {m for mf in manifests for m in mf.migrations}

    def gap_text(ds: int, migration: int | None) -> list[str]:
        gaps = find_gaps(manifests, ds, ds + US_PER_DAY, None if migration is None else [migration], known)
        return [f"{_hhmm(parse_us(g.start), ds)}-{_hhmm(parse_us(g.end), ds)}" for g in gaps]

    for (m, d), r in rows.items():
        r.gaps = gap_text(parse_us(f"{d}T00:00:00Z"), m)
    for d in days:  # a day without any file still gets a line: it shows what is missing
        if not any(k[1] == d for k in rows):
            rows[(-1, d)] = DayRow(-1, d, gaps=gap_text(parse_us(f"{d}T00:00:00Z"), None))

    lines = [f"{head}: record dates {first}..{last}, migrations {sorted(known)}, "
             f"{len(manifests)} manifest(s), {sum(1 for m in manifests if not m.readable)} unreadable"]
    header = f"{'migration':>9}  {'date':10}  {'updates':>8}  {'events':>8}  {'files':>5}  {'first record time':27}  {'last record time':27}  gaps (UTC, not covered by a manifest)"
    lines.append(header)
    totals = defaultdict(int)
    for (m, d), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):  # by day, then migration
        first_s = format_us(r.first_us) if r.first_us is not None else "-"
        last_s = format_us(r.last_us) if r.last_us is not None else "-"
        gaps = ", ".join(r.gaps) if r.gaps else "none"
        mig = "-" if m < 0 else str(m)
        lines.append(f"{mig:>9}  {d:10}  {r.updates:>8}  {r.events:>8}  {r.files:>5}  {first_s:27}  {last_s:27}  {gaps}")
        for e in r.errors:
            lines.append(f"{'':>9}  unreadable: {e}")
        totals["updates"] += r.updates
        totals["events"] += r.events
        totals["files"] += r.files
    committed = defaultdict(int)
    for mf in manifests:
        for k in ("updates", "events", "files"):
            committed[k] += int(((mf.data or {}).get("totals") or {}).get(k) or 0)
    lines.append(f"{'total':>9}  {'':10}  {totals['updates']:>8}  {totals['events']:>8}  {totals['files']:>5}")
    lines.append(f"manifests overlapping these dates list {committed['updates']} updates, {committed['events']} events "
                 f"in {committed['files']} files")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", default="raw", help="object prefix (Variable scan_ingest_prefix), default raw")
    ap.add_argument("--from", dest="date_from", help="first partition date YYYY-MM-DD (default: the earliest)")
    ap.add_argument("--to", dest="date_to", help="last partition date YYYY-MM-DD (default: the latest)")
    ap.add_argument("--project", help="GCP project for the client (default: from ADC)")
    args = ap.parse_args(argv)
    for v in (args.date_from, args.date_to):
        if v is not None:
            try:
                date.fromisoformat(v)
            except ValueError:
                ap.error(f"not a date YYYY-MM-DD: {v!r}")
    print(summarise(make_client(args.project), args.bucket, args.prefix, args.date_from, args.date_to))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
