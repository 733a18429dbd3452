"""Fetch one cell from the Scan and write it to staged Parquet: the work of a mapped DAG task.

The same function runs in the DAG's ``fetch_write`` task, in the benchmark and in the tests, so
what is measured and tested is what production runs.
"""

from __future__ import annotations

import gc
import glob
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from scan_ingest.config import IngestSettings
from scan_ingest.parquet_writer import RangeWriter
from scan_ingest.ranges import Cell, object_name
from scan_ingest.scan_client import IngestCancelledError, ScanClient, item_record_time_us
from scan_ingest.staging import SIDECAR_SUFFIX, StagedFile, read_sidecar, remove_temp_files
from scan_ingest.timestamps import format_us

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 15.0
# Young-generation threshold of the cyclic GC while a cell is ingested (see ``relaxed_gc``).
GC_GEN0_THRESHOLD = 1_000_000

_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextmanager
def relaxed_gc() -> Iterator[None]:
    """Let the cyclic garbage collector run rarely while pages are ingested, then restore it.

    A decoded page is some 200,000 small, acyclic dicts and lists. With the default threshold (a
    collection every 700 net allocations) the collector re-scanned them, and in full collections
    the whole heap, many times per page: about 40 % of the CPU of a cell. Nothing in the page loop
    creates reference cycles, so reference counting frees everything as before; the collector
    still runs if a million container objects ever accumulate. Nesting and threads are safe: the
    first user relaxes the thresholds and the last one restores them.
    """
    global _gc_users, _gc_saved
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            gc.set_threshold(max(GC_GEN0_THRESHOLD, _gc_saved[0]), *_gc_saved[1:])
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_saved is not None:
                gc.set_threshold(*_gc_saved)
                _gc_saved = None


class Checkpoint(Protocol):
    """Durable per-task-instance progress (Airflow's task state store in the DAG)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, value: dict[str, Any]) -> None: ...


class NoCheckpoint:
    def load(self) -> dict[str, Any] | None:
        return None

    def save(self, value: dict[str, Any]) -> None:
        return None


@dataclass
class CellResult:
    cell: Cell
    files: list[StagedFile]
    updates: int
    events: int
    pages: int
    seconds: float
    resumed_from_part: int | None = None
    retries: int = 0
    failovers: int = 0
    bytes_fetched: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_xcom(self) -> dict[str, Any]:
        """Small metadata only (paths, hashes, counts): never data."""
        return {
            "cell": self.cell.to_dict(),
            "files": [f.to_dict() for f in self.files],
            "updates": self.updates,
            "events": self.events,
            "pages": self.pages,
            "seconds": round(self.seconds, 3),
            "resumed_from_part": self.resumed_from_part,
            "retries": self.retries,
            "failovers": self.failovers,
            "bytes_fetched": self.bytes_fetched,
        }


def _cell_staged_paths(staging_dir: str, prefix: str, cell: Cell) -> list[str]:
    """Every staged data file of the cell, whatever part numbering an earlier attempt used."""
    paths: list[str] = []
    for date in cell.dates():
        for table in ("updates", "events"):
            probe = object_name(prefix, table, cell, date, 0)
            directory = os.path.join(staging_dir, os.path.dirname(probe))
            pattern = os.path.join(glob.escape(directory), glob.escape(cell.file_stem) + "_p*.parquet")
            paths.extend(glob.glob(pattern))
    return sorted(paths)


def clear_cell_staging(staging_dir: str, prefix: str, cell: Cell) -> int:
    """Remove the cell's staged files, sidecars and temp files of earlier attempts."""
    removed = 0
    for date in cell.dates():
        for table in ("updates", "events"):
            directory = os.path.join(staging_dir, os.path.dirname(object_name(prefix, table, cell, date, 0)))
            removed += len(remove_temp_files(directory, cell.file_stem))
    for path in _cell_staged_paths(staging_dir, prefix, cell):
        for p in (path, path + SIDECAR_SUFFIX):
            try:
                os.remove(p)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _resume_point(checkpoint: dict[str, Any] | None, cell: Cell) -> tuple[int, str, list[StagedFile]] | None:
    """Validate a checkpoint against the staged files it names; None means start the cell afresh."""
    if not checkpoint or checkpoint.get("cell") != cell.key:
        return None
    files: list[StagedFile] = []
    for sidecar in checkpoint.get("sidecars", []):
        try:
            staged = read_sidecar(sidecar)
        except (OSError, ValueError):
            return None
        if not os.path.isfile(staged.local_path) or os.path.getsize(staged.local_path) != staged.size:
            return None
        files.append(staged)
    return int(checkpoint["part"]), str(checkpoint["last_record_time"]), files


def ingest_cell(
    client: ScanClient,
    cell: Cell,
    settings: IngestSettings,
    *,
    ingested_at_us: int,
    checkpoint: Checkpoint | None = None,
    cancelled: threading.Event | None = None,
    page_size: int | None = None,
) -> CellResult:
    """Fetch every update of ``cell`` and stage its Parquet parts; resume from ``checkpoint`` if valid."""
    checkpoint = checkpoint or NoCheckpoint()
    started = time.monotonic()
    resume = _resume_point(checkpoint.load(), cell)
    stem_dirs = {os.path.dirname(p) for p in _cell_staged_paths(settings.staging_dir, settings.prefix, cell)}
    for d in stem_dirs:
        remove_temp_files(d, cell.file_stem)
    if resume is None:
        if clear_cell_staging(settings.staging_dir, settings.prefix, cell):
            log.info("%s: removed staged files of an earlier attempt; starting the cell afresh", cell)
        first_part, after_rt, done_files = 0, None, []
    else:
        last_part, after_rt, done_files = resume
        first_part = last_part + 1
        keep = {f.local_path for f in done_files}
        for path in _cell_staged_paths(settings.staging_dir, settings.prefix, cell):
            if path not in keep:  # parts after the checkpoint are rewritten
                for p in (path, path + SIDECAR_SUFFIX):
                    if os.path.exists(p):
                        os.remove(p)
        log.info("%s: resuming after part %d (cursor %s), %d file(s) already staged", cell, last_part, after_rt, len(done_files))

    sidecars = [f.sidecar_path for f in done_files]

    def on_part(part: int, last_rt: str, staged: list[StagedFile]) -> None:
        sidecars.extend(s.sidecar_path for s in staged)
        checkpoint.save({"cell": cell.key, "part": part, "last_record_time": last_rt, "sidecars": list(sidecars)})

    writer = RangeWriter(
        cell=cell,
        staging_dir=settings.staging_dir,
        bucket=settings.bucket,
        prefix=settings.prefix,
        rows_per_part=settings.rows_per_part,
        row_group_rows=settings.row_group_rows,
        ingested_at_us=ingested_at_us,
        first_part=first_part,
        on_part=on_part,
    )
    updates = sum(f.updates for f in done_files if f.table == "updates")
    events = sum(f.rows for f in done_files if f.table == "events")
    pages = 0
    last_log = time.monotonic()
    span = cell.end_us - cell.start_us
    try:
        pages_iter = client.iter_range(
            cell.migration_id, cell.start_us, cell.end_us, after_record_time=after_rt, page_size=page_size
        )
        with relaxed_gc(), closing(pages_iter):
            for page in pages_iter:
                if cancelled is not None and cancelled.is_set():
                    raise IngestCancelledError(f"{cell}: cancelled")
                mig = cell.migration_id
                writer.add((item, mig, item_record_time_us(item)) for item in page)
                pages += 1
                now = time.monotonic()
                if now - last_log >= PROGRESS_EVERY_S:
                    last_log = now
                    rt = item_record_time_us(page[-1])
                    done = (rt - cell.start_us) / span
                    elapsed = now - started
                    rate = (writer.total_updates) / elapsed if elapsed else 0.0
                    eta = elapsed * (1 - done) / done if done > 0 else float("nan")
                    log.info(
                        "%s: %d pages, %d updates, %d events so far; cursor %s (%.0f%% of the range); %.0f updates/s; ETA %.0fs",
                        cell, pages, updates + writer.total_updates, events + writer.total_events,
                        page[-1]["record_time"], 100 * done, rate, eta,
                    )
                del page  # written: do not keep it alive while the next one is fetched
            new_files = writer.finish()
    except BaseException:
        writer.abort()
        raise
    stats = client.stats
    result = CellResult(
        cell=cell,
        files=done_files + new_files,
        updates=updates + writer.total_updates,
        events=events + writer.total_events,
        pages=pages,
        seconds=time.monotonic() - started,
        resumed_from_part=None if resume is None else first_part - 1,
        retries=stats.retries,
        failovers=stats.failovers,
        bytes_fetched=stats.bytes,
    )
    log.info(
        "%s: staged %d updates and %d events in %d file(s) from %d pages in %.1fs (last cursor %s)",
        cell, result.updates, result.events, len(result.files), pages, result.seconds,
        format_us(cell.end_us) if not new_files else new_files[-1].last_record_time,
    )
    return result
