"""Completeness audit of the bucket: what is committed, what is missing, what is there twice.

The audit reads what the pipeline wrote and checks it against itself (cheap mode) and, in deep
mode, against the Scan. Cheap mode reads object listings, the interval manifests, and from each
Parquet object in range only its footer and the ``update_id`` / ``record_time`` / ``event_count``
column chunks (ranged reads: the big ``update_data`` and argument columns are never downloaded).

Findings, each precise enough to act on:

- **gaps**: parts of the audited record-time range no manifest covers. A manifest without a
  migration filter covers its whole interval for every migration; one with a filter only for
  that migration (a manifest's ``cells`` always lie inside its interval, so the interval decides).
- **manifest problems**: files listed by a manifest that are missing from the bucket or whose
  MD5/size differ (unless a newer manifest lists the object with its current MD5: then the older
  entry is only *superseded*, reported as a warning), row counts that differ from the footer,
  totals that do not add up, manifests that cannot be read.
- **orphans**: Parquet objects in range that no manifest lists (a copy under another name, files
  of a run that never committed); **foreign objects**: other names inside the table partitions.
- **unreadable objects**: objects that are not readable Parquet.
- **duplicates**: update ids present in more than one file (or twice in one file).
- **event mismatches**: per cell, events whose update has no update row, and updates whose
  ``event_count`` differs from their number of event rows.
- **deep** (deep mode only): per migration and day ``(D 00:00, D+1 00:00]`` the update ids the Scan
  serves against the ids in the bucket: missing and unexpected ids.

Every finding maps to an interval to reprocess: the manifest interval that holds the damaged cell
(re-running exactly that interval rewrites its objects, deletes stale ones and rewrites the same
manifest) or the gap itself. ``Repair.commands`` lists the CLI commands that do it.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from scan_ingest.exceptions import ConfigError, ScanIngestPermanentError
from scan_ingest.ranges import ParsedObjectName, parse_object_name
from scan_ingest.timestamps import (
    US_PER_DAY,
    US_PER_SECOND,
    compact_us,
    date_of_us,
    format_us,
    parse_compact_us,
    parse_us,
)

log = logging.getLogger(__name__)

TABLES = ("updates", "events")
SAMPLE = 100  # ids listed per finding; counts are always exact
READ_BLOCK = 256 * 1024  # one ranged request fetches at least this much (a small file in one go)
US_PER_HOUR = 3600 * US_PER_SECOND

_MANIFEST_RE = re.compile(
    r"(?:^|/)_manifests/(?P<start>\d{8}T\d{6}(?:\.\d{6})?Z)_(?P<end>\d{8}T\d{6}(?:\.\d{6})?Z)"
    r"(?:_m(?P<m>\d+))?\.json$"
)


class AuditProblemsFound(ScanIngestPermanentError):
    """The audit found problems (the report was written first); retrying cannot fix the bucket."""


# -- findings ---------------------------------------------------------------------------------
@dataclass
class Gap:
    """``(start, end]`` covered by no manifest; ``migration_id`` None means for every migration."""

    start: str
    end: str
    migration_id: int | None
    uncovered_migrations: list[int] = field(default_factory=list)
    scan_updates: int | None = None  # deep mode: updates the Scan holds in the gap (0 = nothing lost)

    @property
    def is_problem(self) -> bool:
        return self.scan_updates != 0


@dataclass
class ManifestProblem:
    manifest: str
    kind: str  # missing | changed | rows | totals | unreadable_manifest
    object_name: str | None
    detail: str


@dataclass
class Orphan:
    object_name: str
    table: str
    migration_id: int
    date: str
    cell_start: str
    cell_end: str
    part: int
    size: int
    covered_by: str | None  # a manifest whose interval holds the cell but does not list the object


@dataclass
class UnreadableObject:
    object_name: str
    error: str


@dataclass
class DuplicateGroup:
    files: list[str]
    count: int
    update_ids: list[str]


@dataclass
class EventMismatch:
    migration_id: int
    cell_start: str
    cell_end: str
    kind: str  # events_without_update | event_count
    count: int
    update_ids: list[str]
    examples: list[dict[str, Any]]


@dataclass
class DeepCheck:
    migration_id: int
    date: str
    start: str
    end: str  # checked up to here (earlier than the day's end at the Scan's live edge)
    scan_updates: int
    bucket_updates: int
    missing_count: int
    missing: list[dict[str, str]]
    unexpected_count: int
    unexpected: list[dict[str, str]]

    @property
    def is_problem(self) -> bool:
        return bool(self.missing_count or self.unexpected_count)


@dataclass
class Repair:
    start: str
    end: str
    migration_id: int | None
    reasons: list[str]
    commands: list[str] = field(default_factory=list)


@dataclass
class AuditReport:
    bucket: str
    prefix: str
    start: str
    end: str
    migrations: list[int] | None
    mode: str
    range_minutes: int
    generated_at: str
    stats: dict[str, int] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)
    manifest_problems: list[ManifestProblem] = field(default_factory=list)
    superseded: list[ManifestProblem] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    foreign_objects: list[str] = field(default_factory=list)
    unreadable: list[UnreadableObject] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    event_mismatches: list[EventMismatch] = field(default_factory=list)
    deep: list[DeepCheck] | None = None
    repairs: list[Repair] = field(default_factory=list)
    report_object: str | None = None

    def problem_counts(self) -> dict[str, int]:
        return {
            "gaps": sum(1 for g in self.gaps if g.is_problem),
            "manifest_problems": len(self.manifest_problems),
            "orphans": len(self.orphans),
            "foreign_objects": len(self.foreign_objects),
            "unreadable": len(self.unreadable),
            "duplicates": len(self.duplicates),
            "event_mismatches": len(self.event_mismatches),
            "deep": sum(1 for d in self.deep or [] if d.is_problem),
        }

    @property
    def problem_count(self) -> int:
        return sum(self.problem_counts().values())

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["problem_count"] = self.problem_count
        out["problem_counts"] = self.problem_counts()
        return out

    def summary(self, max_items: int = 20) -> str:
        """A readable summary for the task log (each section capped at ``max_items`` lines).

        Object names are shown relative to ``gs://bucket/prefix/``; the JSON report has them in full.
        """
        migs = "all" if self.migrations is None else ", ".join(map(str, self.migrations))
        cut = len(_p(self.prefix))

        def rel(name: str | None) -> str:
            return (name or "")[cut:] if (name or "").startswith(_p(self.prefix)) else (name or "")

        lines = [
            f"Audit of gs://{self.bucket}/{self.prefix} ({self.mode} mode), record times ({self.start}, {self.end}], "
            f"migrations: {migs}",
            "checked: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.stats.items()),
        ]
        if self.report_object:
            lines.append(f"report: gs://{self.bucket}/{self.report_object}")
        counts = {k: v for k, v in self.problem_counts().items() if v}
        lines.append("RESULT: clean, no problems found" if self.ok else
                     f"RESULT: {self.problem_count} problem(s): " + ", ".join(f"{k} {v}" for k, v in counts.items()))

        def section(title: str, items: list[str]) -> None:
            if not items:
                return
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {s}" for s in items[:max_items])
            if len(items) > max_items:
                lines.append(f"  ... and {len(items) - max_items} more (see the JSON report)")

        section("gaps (no manifest covers these record times)", [
            f"({g.start}, {g.end}] " + ("all migrations" if g.migration_id is None else f"migration {g.migration_id}")
            + (f" [uncovered for migrations {g.uncovered_migrations}]" if g.uncovered_migrations and g.migration_id is None else "")
            + ("" if g.scan_updates is None else f"; the Scan holds {g.scan_updates} update(s) there")
            for g in self.gaps
        ])
        if any(g.is_problem and g.scan_updates is None for g in self.gaps):
            lines.append("  (an interval without any record gets no manifest; deep mode tells such gaps apart)")
        section("manifest problems", [
            f"{rel(p.manifest)}: {p.kind}: {p.detail.replace(_p(self.prefix), '') if self.prefix else p.detail}"
            for p in self.manifest_problems
        ])
        section("orphan objects (listed in no manifest)", [
            f"{rel(o.object_name)} ({o.size} bytes)"
            + (f", inside the interval of {rel(o.covered_by)}" if o.covered_by else ", in a gap")
            for o in self.orphans
        ])
        section("foreign objects (not a pipeline object name)", [rel(n) for n in self.foreign_objects])
        section("unreadable objects", [f"{rel(u.object_name)}: {u.error}" for u in self.unreadable])
        section("duplicate update ids", [
            f"{d.count} id(s) in {' and '.join(rel(f) for f in d.files)}, e.g. {d.update_ids[:3]}" for d in self.duplicates
        ])
        section("event/update mismatches", [
            f"migration {e.migration_id} ({e.cell_start}, {e.cell_end}]: {e.count} x {e.kind}, e.g. {e.update_ids[:3]}"
            for e in self.event_mismatches
        ])
        if self.deep is not None:
            section("deep comparison with the Scan (problems)", [
                f"migration {d.migration_id} {d.date} ({d.start}, {d.end}]: Scan {d.scan_updates}, bucket "
                f"{d.bucket_updates}, missing {d.missing_count} e.g. {[m['update_id'] for m in d.missing[:3]]}, "
                f"unexpected {d.unexpected_count} e.g. {[m['update_id'] for m in d.unexpected[:3]]}"
                for d in self.deep if d.is_problem
            ])
            if not any(d.is_problem for d in self.deep):
                lines.append(f"deep comparison with the Scan: {len(self.deep)} (migration, day) pair(s) match")
        section("warnings: superseded manifest entries (a newer manifest lists the current object)", [
            f"{rel(p.manifest)}: {p.detail}" for p in self.superseded
        ])
        if self.repairs:
            lines.append(f"intervals to reprocess ({len(self.repairs)}):")
            for r in self.repairs:
                mig = "all migrations" if r.migration_id is None else f"migration {r.migration_id}"
                kinds = Counter(reason.split(" ", 1)[0].rstrip(":") for reason in r.reasons)
                why = ", ".join(k if n == 1 else f"{k} x{n}" for k, n in kinds.items())
                lines.append(f"  ({r.start}, {r.end}] {mig}: {why}")
                lines.extend(f"    {c}" for c in r.commands)
        return "\n".join(lines)


# -- bucket access ------------------------------------------------------------------------------
@dataclass
class ObjectInfo:
    name: str
    size: int
    md5_b64: str | None
    parsed: ParsedObjectName
    blob: Any = field(repr=False, compare=False)


@dataclass
class ManifestInfo:
    name: str
    start_us: int
    end_us: int
    migration_filter: int | None
    data: dict[str, Any] | None
    error: str | None = None

    @property
    def readable(self) -> bool:
        return self.data is not None

    @property
    def files(self) -> list[dict[str, Any]]:
        return list((self.data or {}).get("files") or [])

    @property
    def migrations(self) -> list[int]:
        return [int(m) for m in (self.data or {}).get("migrations") or []]

    @property
    def committed_at(self) -> str:
        return str((self.data or {}).get("committed_at") or "")

    @property
    def run_id(self) -> str:
        return str((self.data or {}).get("run_id") or "")


def _p(prefix: str) -> str:
    return f"{prefix}/" if prefix else ""


def parse_manifest_name(name: str) -> tuple[int, int, int | None] | None:
    """``(start_us, end_us, migration_filter)`` from a manifest object name, or None."""
    m = _MANIFEST_RE.search(name)
    if m is None:
        return None
    return parse_compact_us(m["start"]), parse_compact_us(m["end"]), (int(m["m"]) if m["m"] is not None else None)


def load_manifests(client: Any, bucket: str, prefix: str, start_us: int, end_us: int) -> list[ManifestInfo]:
    """Every manifest whose interval overlaps ``(start, end]`` (only those are downloaded)."""
    out: list[ManifestInfo] = []
    for blob in client.list_blobs(bucket, prefix=f"{_p(prefix)}_manifests/"):
        parsed = parse_manifest_name(blob.name)
        if parsed is None:
            continue
        s, e, mig = parsed
        if not (s < end_us and e > start_us):
            continue
        try:
            data = json.loads(blob.download_as_bytes())
            if not isinstance(data, dict) or not isinstance(data.get("files"), list):
                raise ValueError("not a manifest object (no 'files' list)")
            out.append(ManifestInfo(blob.name, s, e, mig, data))
        except Exception as exc:  # noqa: BLE001 - any unreadable manifest is a finding, not a crash
            out.append(ManifestInfo(blob.name, s, e, mig, None, f"{type(exc).__name__}: {exc}"))
    return out


def discover_bucket_migrations(client: Any, bucket: str, prefix: str) -> list[int]:
    """Migration ids with a ``migration=N/`` partition in either table (a delimiter listing: names only)."""
    found: set[int] = set()
    for table in TABLES:
        it = client.list_blobs(bucket, prefix=f"{_p(prefix)}{table}/", delimiter="/")
        for _ in it:  # the prefixes are filled while the pages are consumed
            pass
        for sub in it.prefixes:
            m = re.search(r"migration=(\d+)/$", sub)
            if m:
                found.add(int(m[1]))
    return sorted(found)


def dates_between(start_us: int, end_us: int) -> list[str]:
    """Partition dates holding record times of ``(start, end]`` (including the date of ``end``)."""
    first = date.fromisoformat(date_of_us(start_us + 1))
    last = date.fromisoformat(date_of_us(end_us))
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def list_data_objects(
    client: Any, bucket: str, prefix: str, start_us: int, end_us: int, migrations: Iterable[int]
) -> tuple[list[ObjectInfo], list[str]]:
    """Parquet objects whose cell overlaps ``(start, end]``, and foreign names in the same partitions."""
    objects: list[ObjectInfo] = []
    foreign: list[str] = []
    for table in TABLES:
        for mig in sorted(set(migrations)):
            for d in dates_between(start_us, end_us):
                pfx = f"{_p(prefix)}{table}/migration={mig}/date={d}/"
                for blob in client.list_blobs(bucket, prefix=pfx):
                    parsed = parse_object_name(blob.name)
                    if parsed is None or parsed.table != table or parsed.migration_id != mig or parsed.date != d:
                        foreign.append(blob.name)
                        continue
                    if parsed.start_us < end_us and parsed.end_us > start_us:
                        objects.append(ObjectInfo(blob.name, int(blob.size or 0), blob.md5_hash, parsed, blob))
    return sorted(objects, key=lambda o: o.name), sorted(foreign)


class RangedBlobReader(io.RawIOBase):
    """A seekable read-only file over a GCS object that downloads only the byte ranges asked for.

    pyarrow reads the footer from the end and then just the column chunks it needs; reads near the
    end fetch the whole last ``block`` bytes, so the footer (and a small file entirely) costs one request.
    """

    def __init__(self, blob: Any, size: int, block: int = READ_BLOCK) -> None:
        super().__init__()
        self._blob = blob
        self._size = size
        self._pos = 0
        self._block = block
        self._cache: list[tuple[int, bytes]] = []
        self.requests = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        buffer[:n] = self._get(self._pos, self._pos + n)
        self._pos += n
        return n

    def _get(self, start: int, end: int) -> bytes:
        for cs, data in self._cache:
            if cs <= start and end <= cs + len(data):
                return data[start - cs:end - cs]
        if self._size - start <= self._block:
            fs, fe = max(0, self._size - self._block), self._size
        else:
            fs, fe = start, min(self._size, max(end, start + self._block))
        data = self._blob.download_as_bytes(start=fs, end=fe - 1, checksum=None)
        self.requests += 1
        self.bytes_read += len(data)
        if len(data) != fe - fs:
            raise OSError(f"short read of {self._blob.name}: {len(data)} bytes for range {fs}..{fe - 1}")
        self._cache.append((fs, data))
        return data[start - fs:end - fs]


@dataclass
class FileContent:
    """What the audit reads from one Parquet object (ids and times only)."""

    name: str
    table: str
    migration_id: int
    cell: tuple[int, int]
    rows: int = 0
    update_ids: list[str] = field(default_factory=list)
    record_times: list[int] = field(default_factory=list)  # updates only, µs
    event_counts: list[int] = field(default_factory=list)  # updates only
    error: str | None = None
    requests: int = 0
    bytes_read: int = 0


def read_object(obj: ObjectInfo, block: int = READ_BLOCK) -> FileContent:
    """Footer and id/time columns of one object, by ranged reads (an unreadable object sets ``error``)."""
    import pyarrow.parquet as pq

    p = obj.parsed
    content = FileContent(obj.name, p.table, p.migration_id, (p.start_us, p.end_us))
    reader = RangedBlobReader(obj.blob, obj.size, block)
    try:
        pf = pq.ParquetFile(reader)
        content.rows = pf.metadata.num_rows
        cols = ["update_id", "record_time", "event_count"] if p.table == "updates" else ["update_id"]
        t = pf.read(columns=cols)
        content.update_ids = t.column("update_id").to_pylist()
        if p.table == "updates":
            content.record_times = t.column("record_time").cast("int64").to_pylist()
            content.event_counts = t.column("event_count").to_pylist()
    except Exception as exc:  # noqa: BLE001 - an unreadable object is a finding
        content.error = f"{type(exc).__name__}: {exc}"[:300]
    content.requests, content.bytes_read = reader.requests, reader.bytes_read
    return content


def read_objects(objects: list[ObjectInfo], max_workers: int = 8) -> list[FileContent]:
    if not objects:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(objects)))) as pool:
        return list(pool.map(read_object, objects))


# -- coverage and gaps ------------------------------------------------------------------------
Interval = tuple[int, int]


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract_intervals(window: Interval, covered: Iterable[Interval]) -> list[Interval]:
    s0, e0 = window
    out: list[Interval] = []
    t = s0
    for s, e in merge_intervals(covered):
        if e <= t or s >= e0:
            continue
        if s > t:
            out.append((t, min(s, e0)))
        t = max(t, e)
        if t >= e0:
            break
    if t < e0:
        out.append((t, e0))
    return out


def _contains(outer: list[Interval], s: int, e: int) -> bool:
    return any(a <= s and e <= b for a, b in outer)


def find_gaps(
    manifests: list[ManifestInfo],
    start_us: int,
    end_us: int,
    migrations: list[int] | None,
    known_migrations: Iterable[int] = (),
) -> list[Gap]:
    """Parts of ``(start, end]`` no readable manifest covers.

    With ``migrations`` given, gaps are reported per requested migration. Otherwise a part no
    unfiltered manifest covers is a gap for all migrations unless filtered manifests cover it for
    every known migration; ``uncovered_migrations`` names those still missing there.
    """
    readable = [m for m in manifests if m.readable]
    cov_all = merge_intervals((m.start_us, m.end_us) for m in readable if m.migration_filter is None)
    cov: dict[int, list[Interval]] = defaultdict(list)
    for m in readable:
        if m.migration_filter is not None:
            cov[m.migration_filter].append((m.start_us, m.end_us))
    cov = {k: merge_intervals(v) for k, v in cov.items()}
    gaps: list[Gap] = []
    if migrations is not None:
        for mig in sorted(set(migrations)):
            for s, e in subtract_intervals((start_us, end_us), cov_all + cov.get(mig, [])):
                gaps.append(Gap(format_us(s), format_us(e), mig))
        return gaps
    known = sorted(set(known_migrations) | set(cov))
    for s, e in subtract_intervals((start_us, end_us), cov_all):
        cuts = sorted({s, e} | {b for iv in cov.values() for pair in iv for b in pair if s < b < e})
        pieces: list[tuple[int, int, tuple[int, ...]]] = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            missing = tuple(m for m in known if not _contains(cov.get(m, []), a, b))
            if known and not missing:
                continue
            if pieces and pieces[-1][1] == a and pieces[-1][2] == missing:
                pieces[-1] = (pieces[-1][0], b, missing)
            else:
                pieces.append((a, b, missing))
        for a, b, missing in pieces:
            partial = list(missing) if len(missing) < len(known) else []
            gaps.append(Gap(format_us(a), format_us(b), None, partial))
    return gaps


# -- manifest checks --------------------------------------------------------------------------
def check_manifests(
    manifests: list[ManifestInfo], objects: dict[str, ObjectInfo], contents: dict[str, FileContent],
    start_us: int, end_us: int, migrations: list[int] | None = None,
) -> tuple[list[ManifestProblem], list[ManifestProblem]]:
    """Problems of the manifests' files in range (of ``migrations``; None = all), and superseded entries."""
    problems: list[ManifestProblem] = []
    superseded: list[ManifestProblem] = []
    listed_by: dict[str, list[tuple[ManifestInfo, dict[str, Any]]]] = defaultdict(list)
    for m in manifests:
        if not m.readable:
            problems.append(ManifestProblem(m.name, "unreadable_manifest", None, m.error or "unreadable"))
            continue
        by_table: Counter[str] = Counter()
        for f in m.files:
            by_table[f.get("table", "?")] += int(f.get("rows") or 0)
            listed_by[f["object_name"]].append((m, f))
        totals = (m.data or {}).get("totals") or {}
        for table in TABLES:
            if table in totals and int(totals[table]) != by_table.get(table, 0):
                problems.append(ManifestProblem(m.name, "totals", None,
                                                f"totals.{table}={totals[table]} but its {table} files hold {by_table.get(table, 0)} rows"))
        if "files" in totals and int(totals["files"]) != len(m.files):
            problems.append(ManifestProblem(m.name, "totals", None, f"totals.files={totals['files']} but {len(m.files)} files are listed"))
    for name, entries in sorted(listed_by.items()):
        parsed = parse_object_name(name)
        if parsed is not None and not (parsed.start_us < end_us and parsed.end_us > start_us):
            continue  # outside the audited range
        if parsed is not None and migrations is not None and parsed.migration_id not in migrations:
            continue  # a migration not audited (its objects were not listed)
        obj = objects.get(name)
        if obj is None:
            for m, _f in entries:
                problems.append(ManifestProblem(m.name, "missing", name, f"{name} is missing from the bucket"))
            continue
        matching = [m for m, f in entries if f.get("md5_b64") == obj.md5_b64 and int(f.get("size", -1)) == obj.size]
        for m, f in entries:
            if f.get("md5_b64") == obj.md5_b64 and int(f.get("size", -1)) == obj.size:
                c = contents.get(name)
                if c is not None and c.error is None and c.rows != int(f.get("rows", -1)):
                    problems.append(ManifestProblem(m.name, "rows", name, f"{name}: {c.rows} rows in the footer, {f.get('rows')} in the manifest"))
                continue
            detail = (f"{name}: md5 {obj.md5_b64} size {obj.size} in the bucket, md5 {f.get('md5_b64')} "
                      f"size {f.get('size')} in the manifest")
            if matching:
                superseded.append(ManifestProblem(m.name, "changed", name, detail + f"; current per {matching[-1].name}"))
            else:
                problems.append(ManifestProblem(m.name, "changed", name, detail))
    return problems, superseded


def _covering(manifests: list[ManifestInfo], migration: int, s: int, e: int) -> ManifestInfo | None:
    """The newest readable manifest whose interval holds ``(s, e]`` for ``migration``."""
    hits = [m for m in manifests if m.readable and m.start_us <= s and e <= m.end_us
            and m.migration_filter in (None, migration)]
    return max(hits, key=lambda m: (m.committed_at, m.name)) if hits else None


def find_orphans(objects: list[ObjectInfo], manifests: list[ManifestInfo]) -> list[Orphan]:
    listed = {f["object_name"] for m in manifests if m.readable for f in m.files}
    out = []
    for o in objects:
        if o.name in listed:
            continue
        p = o.parsed
        cov = _covering(manifests, p.migration_id, p.start_us, p.end_us)
        out.append(Orphan(o.name, p.table, p.migration_id, p.date, format_us(p.start_us), format_us(p.end_us),
                          p.part, o.size, cov.name if cov else None))
    return out


# -- content checks ---------------------------------------------------------------------------
def find_duplicates(contents: Iterable[FileContent]) -> list[DuplicateGroup]:
    """Update ids in more than one updates row, grouped by the set of files holding them."""
    where: dict[str, list[str]] = defaultdict(list)
    for c in contents:
        if c.table == "updates" and c.error is None:
            for uid in c.update_ids:
                where[uid].append(c.name)
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for uid, files in where.items():
        if len(files) > 1:
            groups[tuple(sorted(files))].append(uid)
    return [DuplicateGroup(list(files), len(ids), sorted(ids)[:SAMPLE]) for files, ids in sorted(groups.items())]


def check_events(contents: Iterable[FileContent]) -> list[EventMismatch]:
    """Per cell: events without an update row, and updates whose event_count differs from their events."""
    cells: dict[tuple[int, int, int], dict[str, Any]] = defaultdict(lambda: {"expected": {}, "events": Counter()})
    for c in contents:
        if c.error is not None:
            continue
        acc = cells[(c.migration_id, *c.cell)]
        if c.table == "updates":
            acc["expected"].update(zip(c.update_ids, c.event_counts, strict=True))
        else:
            acc["events"].update(c.update_ids)
    out: list[EventMismatch] = []
    for (mig, s, e), acc in sorted(cells.items()):
        expected, events = acc["expected"], acc["events"]
        orphan_ids = sorted(u for u in events if u not in expected)
        if orphan_ids:
            out.append(EventMismatch(mig, format_us(s), format_us(e), "events_without_update", len(orphan_ids),
                                     orphan_ids[:SAMPLE], [{"update_id": u, "event_rows": events[u]} for u in orphan_ids[:5]]))
        wrong = sorted(u for u, n in expected.items() if events.get(u, 0) != n)
        if wrong:
            out.append(EventMismatch(mig, format_us(s), format_us(e), "event_count", len(wrong), wrong[:SAMPLE],
                                     [{"update_id": u, "event_count": expected[u], "event_rows": events.get(u, 0)} for u in wrong[:5]]))
    return out


# -- deep comparison ----------------------------------------------------------------------------
@dataclass
class DeepResult:
    checks: list[DeepCheck]
    scan_times: dict[int, list[int]]  # record times the Scan served, per migration
    checked_until: dict[int, int]  # per migration: compared up to here (the Scan's live edge may stop it early)
    problem_times: dict[int, list[int]]  # record times of every missing or unexpected id, per migration


def day_windows(start_us: int, end_us: int) -> list[Interval]:
    """``(start, end]`` cut at midnights: ``(D 00:00, D+1 00:00]`` for whole days."""
    out, s = [], start_us
    while s < end_us:
        e = min(end_us, (s // US_PER_DAY + 1) * US_PER_DAY)
        out.append((s, e))
        s = e
    return out


def deep_compare(
    scan: Any,
    contents: Iterable[FileContent],
    start_us: int,
    end_us: int,
    migrations: list[int] | None,
) -> DeepResult:
    """Compare, per migration and day window, the update ids the Scan serves with the bucket's.

    ``scan`` is a ``ScanClient`` (``discover_migrations`` and ``iter_range``). Bucket ids are
    placed by their record time, not by partition date, so the update exactly at midnight is
    compared in the day it belongs to on the ``(start, end]`` grid.
    """
    windows = day_windows(start_us, end_us)

    def window_of(rt: int) -> int:
        return max(start_us, (rt - 1) // US_PER_DAY * US_PER_DAY)

    bucket_ids: dict[tuple[int, int], dict[str, int]] = defaultdict(dict)  # (mig, window start) -> id -> rt
    for c in contents:
        if c.table != "updates" or c.error is not None:
            continue
        for uid, rt in zip(c.update_ids, c.record_times, strict=True):
            if start_us < rt <= end_us:
                bucket_ids[(c.migration_id, window_of(rt))][uid] = rt
    infos = {i.migration_id: i for i in scan.discover_migrations()}
    wanted = set(infos) | {m for m, _ in bucket_ids}
    if migrations is not None:
        wanted &= set(migrations)
    result = DeepResult([], defaultdict(list), {}, defaultdict(list))
    last = max(infos, default=None)
    for mig in sorted(wanted):
        info = infos.get(mig)
        result.checked_until[mig] = end_us
        for ws, we in windows:
            scan_ids: dict[str, int] = {}
            check_end = we
            if info is not None and info.min_us is not None and info.max_us is not None:
                if mig == last:  # the live migration: the Scan holds it only up to its latest record
                    check_end = min(we, max(ws, info.max_us))
                if info.min_us <= check_end and info.max_us > ws:
                    for page in scan.iter_range(mig, ws, check_end):
                        for item in page:
                            scan_ids[item["update_id"]] = parse_us(item["record_time"])
                if check_end < we:
                    result.checked_until[mig] = min(result.checked_until[mig], check_end)
            held = bucket_ids.get((mig, ws), {})
            result.scan_times[mig].extend(scan_ids.values())
            if not (scan_ids or held):
                continue
            missing = sorted(set(scan_ids) - set(held), key=lambda u: (scan_ids[u], u))
            unexpected = sorted(set(held) - set(scan_ids), key=lambda u: (held[u], u))
            result.problem_times[mig].extend([scan_ids[u] for u in missing] + [held[u] for u in unexpected])
            result.checks.append(DeepCheck(
                mig, date_of_us(ws + 1), format_us(ws), format_us(check_end), len(scan_ids), len(held),
                len(missing), [{"update_id": u, "record_time": format_us(scan_ids[u])} for u in missing[:SAMPLE]],
                len(unexpected), [{"update_id": u, "record_time": format_us(held[u])} for u in unexpected[:SAMPLE]],
            ))
    return result


# -- repairs ----------------------------------------------------------------------------------
def _iso(us: int) -> str:
    """Param-friendly time: no fraction when it is zero (grid boundaries always are)."""
    return format_us(us).replace(".000000Z", "Z")


def repair_commands(start_us: int, end_us: int, migration_id: int | None, *, scheduled_alternative: bool) -> list[str]:
    conf: dict[str, Any] = {"start": _iso(start_us), "end": _iso(end_us)}
    if migration_id is not None:
        conf["migration_id"] = migration_id
    cmds = [f"airflow dags trigger scan_updates -c '{json.dumps(conf)}'"]
    if scheduled_alternative:
        # Scheduled runs have logical date = interval start: clear those in [start, end).
        s = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=start_us)
        e = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=end_us - US_PER_SECOND)
        cmds.append(f"airflow tasks clear scan_updates -s {s.isoformat()} -e {e.isoformat()} -y")
    return cmds


def plan_repairs(
    report: AuditReport,
    manifests: list[ManifestInfo],
    range_us: int,
    deep_times: dict[int, list[int]] | None = None,
    *,
    emit_commands: bool = True,
) -> list[Repair]:
    """Intervals to reprocess: the manifest interval holding each damaged cell, or the gap itself."""
    by_name = {m.name: m for m in manifests}
    wanted: dict[tuple[int, int, int | None], list[str]] = defaultdict(list)
    sources: dict[tuple[int, int, int | None], set[str]] = defaultdict(set)

    def add(s: int, e: int, mig: int | None, reason: str, manifest: ManifestInfo | None = None) -> None:
        key = (s, e, mig)
        if reason not in wanted[key]:
            wanted[key].append(reason)
        sources[key].add(manifest.run_id if manifest else "")

    def add_cell(mig: int, s: int, e: int, reason: str) -> None:
        cov = _covering(manifests, mig, s, e)
        if cov is not None:
            add(cov.start_us, cov.end_us, cov.migration_filter, reason, cov)
        else:  # not committed: reprocess the grid cells around it
            add(s // range_us * range_us, -(-e // range_us) * range_us, mig, reason)

    for g in report.gaps:
        if g.is_problem:
            s, e = parse_us(g.start), parse_us(g.end)
            add(s // range_us * range_us, -(-e // range_us) * range_us, g.migration_id, "gap")
    for p in report.manifest_problems:
        m = by_name.get(p.manifest)
        if m is not None:
            add(m.start_us, m.end_us, m.migration_filter, f"{p.kind} {p.object_name or ''}".strip(), m if m.readable else None)
    orphan_names = {o.object_name for o in report.orphans}
    for o in report.orphans:
        add_cell(o.migration_id, parse_us(o.cell_start), parse_us(o.cell_end), f"orphan {o.object_name}")
    for u in report.unreadable:
        p = parse_object_name(u.object_name)
        if p is not None:
            add_cell(p.migration_id, p.start_us, p.end_us, f"unreadable {u.object_name}")
    for d in report.duplicates:
        # an orphan copy is removed by reprocessing the orphan's interval; otherwise every file's interval
        targets = [f for f in d.files if f in orphan_names] or d.files
        for f in dict.fromkeys(targets):
            p = parse_object_name(f)
            if p is not None:
                add_cell(p.migration_id, p.start_us, p.end_us, f"duplicates in {f}")
    for em in report.event_mismatches:
        add_cell(em.migration_id, parse_us(em.cell_start), parse_us(em.cell_end), f"{em.kind} in cell")
    for mig, times in sorted((deep_times or {}).items()):
        for slot in sorted({(t - 1) // range_us for t in times}):
            add_cell(mig, slot * range_us, (slot + 1) * range_us, "deep: update ids missing or unexpected")
    # Drop intervals inside another one that reprocesses them anyway.
    keys = sorted(wanted, key=lambda k: (k[0], -k[1], k[2] is not None, k[2] or 0))
    kept: list[tuple[int, int, int | None]] = []
    for k in keys:
        outer = next((o for o in kept if o[0] <= k[0] and k[1] <= o[1] and o[2] in (None, k[2])), None)
        if outer is not None:
            wanted[outer].extend(r for r in wanted[k] if r not in wanted[outer])
            sources[outer] |= sources[k]
        else:
            kept.append(k)
    repairs = []
    for s, e, mig in sorted(kept, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
        runs = sources[(s, e, mig)]
        scheduled = (mig is None and s % US_PER_HOUR == 0 and e % US_PER_HOUR == 0
                     and not any(r.startswith("manual__") for r in runs))
        cmds = repair_commands(s, e, mig, scheduled_alternative=scheduled) if emit_commands else []
        repairs.append(Repair(_iso(s), _iso(e), mig, wanted[(s, e, mig)], cmds))
    return repairs


# -- the audit --------------------------------------------------------------------------------
def audit_bucket(
    hook: Any,
    *,
    bucket: str,
    prefix: str,
    start_us: int,
    end_us: int,
    range_us: int,
    migrations: list[int] | None = None,
    mode: str = "cheap",
    scan: Any = None,
    emit_repair_commands: bool = True,
    max_workers: int = 8,
) -> AuditReport:
    """Audit record times ``(start, end]`` of ``gs://bucket/prefix`` (``hook``: anything with ``get_conn()``)."""
    if mode not in ("cheap", "deep"):
        raise ConfigError(f"audit mode must be 'cheap' or 'deep', got {mode!r}")
    if mode == "deep" and scan is None:
        raise ConfigError("deep mode needs a Scan client")
    if end_us <= start_us:
        raise ConfigError(f"audit range end {format_us(end_us)} must be after its start {format_us(start_us)}")
    client = hook.get_conn()
    report = AuditReport(
        bucket=bucket, prefix=prefix, start=format_us(start_us), end=format_us(end_us),
        migrations=None if migrations is None else sorted(set(migrations)), mode=mode,
        range_minutes=range_us // (60 * US_PER_SECOND), generated_at=datetime.now(UTC).isoformat(),
    )
    manifests = load_manifests(client, bucket, prefix, start_us, end_us)
    in_bucket = discover_bucket_migrations(client, bucket, prefix)
    scope = in_bucket if migrations is None else sorted(set(migrations))
    objects, foreign = list_data_objects(client, bucket, prefix, start_us, end_us, scope)
    if migrations is not None:
        # a manifest filtered to another migration says nothing about the audited ones
        manifests = [m for m in manifests if m.migration_filter is None or m.migration_filter in migrations]
    log.info("audit: %d manifest(s), %d object(s) in range; reading ids", len(manifests), len(objects))
    contents = read_objects(objects, max_workers)
    by_name = {o.name: o for o in objects}
    content_by_name = {c.name: c for c in contents}

    known = set(in_bucket) | {m for mf in manifests for m in mf.migrations}
    report.gaps = find_gaps(manifests, start_us, end_us, report.migrations, known)
    report.manifest_problems, report.superseded = check_manifests(
        manifests, by_name, content_by_name, start_us, end_us, report.migrations)
    report.orphans = find_orphans(objects, manifests)
    report.foreign_objects = foreign
    report.unreadable = [UnreadableObject(c.name, c.error) for c in contents if c.error]
    report.duplicates = find_duplicates(contents)
    report.event_mismatches = check_events(contents)
    deep_times: dict[int, list[int]] = {}
    if mode == "deep":
        deep = deep_compare(scan, contents, start_us, end_us, report.migrations)
        report.deep = deep.checks
        deep_times = dict(deep.problem_times)
        for g in report.gaps:
            gs, ge = parse_us(g.start), parse_us(g.end)
            migs = [g.migration_id] if g.migration_id is not None else (g.uncovered_migrations or sorted(deep.checked_until))
            if all(deep.checked_until.get(m, gs) >= ge for m in migs):  # the Scan was read over the whole gap
                g.scan_updates = sum(1 for m in migs for t in deep.scan_times.get(m, []) if gs < t <= ge)
    report.stats = {
        "manifests": len(manifests),
        "objects": len(objects),
        "objects_read": sum(1 for c in contents if c.error is None),
        "update_rows": sum(c.rows for c in contents if c.table == "updates" and c.error is None),
        "event_rows": sum(c.rows for c in contents if c.table == "events" and c.error is None),
        "bytes_downloaded": sum(c.bytes_read for c in contents),
    }
    report.repairs = plan_repairs(report, manifests, range_us, deep_times, emit_commands=emit_repair_commands)
    return report


def write_report(hook: Any, report: AuditReport, *, now: datetime | None = None) -> str:
    """Store the report as ``{prefix}/_audit/{timestamp}.json``; returns the object name."""
    now = now or datetime.now(UTC)
    us = int((now - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
    name = f"{_p(report.prefix)}_audit/{compact_us(us)}.json"
    report.report_object = name
    blob = hook.get_conn().bucket(report.bucket).blob(name)
    blob.upload_from_string(json.dumps(report.to_dict(), indent=1, sort_keys=True), content_type="application/json")
    return name


# -- Airflow task -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditRequest:
    start_date: str
    end_date: str
    migrations: list[int] | None
    mode: str
    emit_repair_commands: bool

    @property
    def start_us(self) -> int:
        return parse_us(f"{self.start_date}T00:00:00Z")

    @property
    def end_us(self) -> int:
        return parse_us(f"{self.end_date}T00:00:00Z") + US_PER_DAY


def _as_date(value: Any, name: str) -> str | None:
    if value in (None, ""):
        return None
    try:
        return date.fromisoformat(str(value).strip()).isoformat()
    except ValueError:
        raise ConfigError(f"Param {name} must be a date YYYY-MM-DD, got {value!r}") from None


def resolve_request(params: dict[str, Any], reference: datetime) -> AuditRequest:
    """Validated Params; empty dates mean the day before ``reference`` (the run's date)."""
    start = _as_date(params.get("start_date"), "start_date")
    end = _as_date(params.get("end_date"), "end_date")
    if start is None and end is None:
        start = end = (reference.astimezone(UTC) - timedelta(days=1)).date().isoformat()
    start = start or end
    end = end or start
    assert start is not None and end is not None
    if end < start:
        raise ConfigError(f"Param end_date {end} is before start_date {start}")
    migs = params.get("migrations")
    if migs in (None, "", []):
        migrations = None
    else:
        if not isinstance(migs, list | tuple):
            migs = [migs]
        try:
            migrations = sorted({int(m) for m in migs})
        except (TypeError, ValueError):
            raise ConfigError(f"Param migrations must be a list of integers or null, got {migs!r}") from None
        if any(m < 0 for m in migrations):
            raise ConfigError(f"Param migrations must hold migration ids >= 0, got {migrations}")
    mode = str(params.get("mode") or "cheap")
    if mode not in ("cheap", "deep"):
        raise ConfigError(f"Param mode must be 'cheap' or 'deep', got {mode!r}")
    emit = params.get("emit_repair_commands")
    return AuditRequest(start, end, migrations, mode, True if emit is None else bool(emit))


def run_audit_task(context: Any) -> dict[str, Any]:
    """The ``scan_audit`` DAG's task: audit, write the report, log the summary, fail on problems."""
    from scan_ingest.gcs import get_hook, require_bucket
    from scan_ingest.scan_client import ScanClient
    from scan_ingest.tasks import load_settings, scan_config

    settings = load_settings()
    reference = context.get("data_interval_end") or context.get("logical_date") or datetime.now(UTC)
    req = resolve_request(context.get("params") or {}, reference)
    hook = get_hook(settings.gcp_conn_id)
    require_bucket(hook, settings.bucket)
    scan = ScanClient(scan_config(settings.scan_conn_id)) if req.mode == "deep" else None
    try:
        report = audit_bucket(
            hook, bucket=settings.bucket, prefix=settings.prefix, start_us=req.start_us, end_us=req.end_us,
            range_us=settings.range_us, migrations=req.migrations, mode=req.mode, scan=scan,
            emit_repair_commands=req.emit_repair_commands,
        )
    finally:
        if scan is not None:
            scan.close()
    name = write_report(hook, report)
    summary = report.summary()
    log.info("%s", summary)
    if not report.ok:
        raise AuditProblemsFound(
            f"audit of ({report.start}, {report.end}] found {report.problem_count} problem(s) "
            f"({', '.join(f'{k} {v}' for k, v in report.problem_counts().items() if v)}); the summary and the "
            f"repair commands are logged above; full report gs://{settings.bucket}/{name}"
        )
    return {"ok": True, "report": name, "stats": report.stats}

