"""Streaming, atomic, deterministic Parquet writing of one cursor range.

- Rows are flattened into column buffers and flushed as row groups when a buffer reaches
  ``row_group_rows`` rows or ``ROW_GROUP_MAX_BYTES`` of payload, so memory stays bounded whatever
  the range size.
- Parts are cut by counting updates from the range start (``rows_per_part``) and at a change of
  UTC date, never by pages: a retry with another page size yields the same parts and names.
- Each file is written to ``<final>.tmp-<pid>``, fsynced, hashed (MD5 and CRC32C of the bytes on
  disk, base64 as GCS reports them), then renamed. A crash at any point never leaves an
  incomplete file under its final name.
- Row groups are encoded and compressed by one background thread while the caller flattens the
  next rows (Arrow releases the GIL for that work; the file is a native Arrow stream, so no Python
  code runs per write). At most one row group is in flight, and they are written in order.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import google_crc32c
import pyarrow as pa
import pyarrow.parquet as pq

from scan_ingest.flatten import EVENT_COLUMNS, JSON_COLUMNS, UPDATE_COLUMNS, ColumnBuffer, Flattener
from scan_ingest.ranges import Cell, object_name
from scan_ingest.schema import EVENTS_SCHEMA, SCHEMA_VERSION, UPDATES_SCHEMA, with_metadata
from scan_ingest.staging import TEMP_MARKER, StagedFile, fsync_path, write_sidecar
from scan_ingest.timestamps import date_of_us, format_us

log = logging.getLogger(__name__)

ROW_GROUP_MAX_BYTES = 32 * 1024 * 1024
COMPRESSION = "zstd"
HASH_CHUNK = 8 * 1024 * 1024
# Arrow memory of the writer comes from the C library's malloc, not Arrow's default mimalloc pool:
# mimalloc kept ~170 MB of freed conversion buffers resident, which malloc returns or shares with
# Python's own allocations (peak RSS of a cell -80 MB, no slower).
MEMORY_POOL = pa.system_memory_pool()


def file_hashes(path: str) -> tuple[int, str, str]:
    """Size, MD5 and CRC32C (base64, as GCS reports them) of a file's bytes."""
    md5 = hashlib.md5(usedforsecurity=False)
    crc = google_crc32c.Checksum()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            md5.update(chunk)
            crc.update(chunk)
            size += len(chunk)
    return size, base64.b64encode(md5.digest()).decode(), base64.b64encode(crc.digest()).decode()


def _to_table(schema: pa.Schema, columns: dict[str, list[Any]], *, release: bool = False) -> pa.Table:
    """Arrow table of the columns; with ``release`` each Python list is emptied once converted,
    so the Python copy and the Arrow copy of a row group are never both complete in memory."""
    arrays = []
    for f in schema:
        col = columns[f.name]
        if f.name in JSON_COLUMNS and f.type == pa.string():
            # JSON as UTF-8 bytes: copied as binary and checked as UTF-8 in one vectorised pass,
            # ~3x cheaper than converting each bytes object to a string; same values, same type.
            arr = pa.array(col, type=pa.binary(), memory_pool=MEMORY_POOL).view(pa.string())
            arr.validate(full=True)
        else:
            arr = pa.array(col, type=f.type, memory_pool=MEMORY_POOL)
        arrays.append(arr)
        if release:
            col.clear()
    return pa.Table.from_arrays(arrays, schema=schema)


class _Encoder:
    """One background thread that writes (encodes, compresses) row groups, one at a time, in order."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None

    def submit(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self.wait()  # bounded: one row group in flight, whichever file it belongs to
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scan-ingest-parquet")
        self._last = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        """Wait for the row group in flight; raises its error."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def shutdown(self) -> None:
        """Wait for the work in flight (errors ignored: callers ``wait`` first) and end the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._last = None


class _TableFile:
    """One Parquet file being written under a temp name."""

    def __init__(self, final_path: str, schema: pa.Schema, encoder: _Encoder) -> None:
        self.final_path = final_path
        self.temp_path = f"{final_path}{TEMP_MARKER}{os.getpid()}"
        os.makedirs(os.path.dirname(final_path), exist_ok=True)
        self.schema = schema
        self._encoder = encoder
        self._out = pa.OSFile(self.temp_path, "wb")
        self.writer = pq.ParquetWriter(
            self._out, schema, compression=COMPRESSION, use_dictionary=True, write_statistics=True,
            memory_pool=MEMORY_POOL,
        )
        self.rows = 0
        self.size = 0
        self.md5_b64 = self.crc32c_b64 = ""

    def write(self, columns: dict[str, list[Any]]) -> None:
        """Convert the rows (emptying the lists) and hand them to the background thread as one row group."""
        table = _to_table(self.schema, columns, release=True)
        self.rows += table.num_rows
        self._encoder.submit(self.writer.write_table, table, row_group_size=max(1, table.num_rows))

    def commit(self) -> None:
        self._encoder.wait()
        self.writer.close()
        self._out.close()
        fsync_path(self.temp_path)
        self.size, self.md5_b64, self.crc32c_b64 = file_hashes(self.temp_path)
        os.replace(self.temp_path, self.final_path)
        fsync_path(os.path.dirname(self.final_path))

    def abort(self) -> None:
        try:
            self._encoder.wait()
        except Exception:  # the file is being discarded; its error is not the one to report
            log.debug("error in a row group of an aborted file", exc_info=True)
        try:
            self.writer.close()
        except Exception:  # the file is being discarded; its error is not the one to report
            log.debug("error closing aborted writer", exc_info=True)
        try:
            self._out.close()
        except Exception:  # as above
            log.debug("error closing aborted file", exc_info=True)
        try:
            os.remove(self.temp_path)
        except FileNotFoundError:
            pass


PartCallback = Callable[[int, str, list[StagedFile]], None]


class RangeWriter:
    """Writes the items of one cell into parts of two tables (``updates`` and ``events``).

    Call ``add(items)`` with the cell's items in cursor order, then ``finish()``; on any error
    call ``abort()`` (temp files are removed; completed parts stay staged, named as on success).
    ``on_part`` is called after each part is durably staged, with the part number, the record time
    string of its last update and its files: the checkpoint from which a retry can resume.
    """

    def __init__(
        self,
        *,
        cell: Cell,
        staging_dir: str,
        bucket: str,
        prefix: str,
        rows_per_part: int,
        row_group_rows: int,
        ingested_at_us: int,
        first_part: int = 0,
        on_part: PartCallback | None = None,
        file_metadata: dict[str, str] | None = None,
    ) -> None:
        self.cell = cell
        self.staging_dir = staging_dir
        self.bucket = bucket
        self.prefix = prefix
        self.rows_per_part = rows_per_part
        self.row_group_rows = row_group_rows
        self.on_part = on_part
        self.part = first_part
        self.updates_buf = ColumnBuffer(UPDATE_COLUMNS)
        self.events_buf = ColumnBuffer(EVENT_COLUMNS)
        self.flattener = Flattener(self.updates_buf, self.events_buf, ingested_at_us)
        meta = {"migration_id": str(cell.migration_id), "range_start": format_us(cell.start_us),
                "range_end": format_us(cell.end_us)}
        meta.update(file_metadata or {})
        self._schemas = {"updates": with_metadata(UPDATES_SCHEMA, meta), "events": with_metadata(EVENTS_SCHEMA, meta)}
        self._files: dict[str, _TableFile] = {}
        self._encoder = _Encoder()
        self._part_date: str | None = None
        self._part_updates = 0
        self._first_rt: str | None = None
        self._last_rt: str | None = None
        self.completed: list[StagedFile] = []
        self.total_updates = 0
        self.total_events = 0

    # -- public ------------------------------------------------------------------------------
    def add(self, items: Iterable[tuple[dict[str, Any], int, int]]) -> None:
        """Add ``(item, migration_id, record_time_us)`` triples in cursor order."""
        for item, mig, rt in items:
            date = date_of_us(rt)
            if self._files and (self._part_updates >= self.rows_per_part or date != self._part_date):
                self._close_part()
            if not self._files:
                self._open_part(date)
            self.total_events += self.flattener.add(item, mig, rt)
            self.total_updates += 1
            self._part_updates += 1
            if self._first_rt is None:
                self._first_rt = item["record_time"]
            self._last_rt = item["record_time"]
            if len(self.updates_buf) >= self.row_group_rows or self.updates_buf.nbytes >= ROW_GROUP_MAX_BYTES:
                self._flush(self.updates_buf, "updates")
            if len(self.events_buf) >= self.row_group_rows or self.events_buf.nbytes >= ROW_GROUP_MAX_BYTES:
                self._flush(self.events_buf, "events")

    def finish(self) -> list[StagedFile]:
        if self._files:
            self._close_part()
        self._encoder.shutdown()
        return self.completed

    def abort(self) -> None:
        for f in self._files.values():
            f.abort()
        self._encoder.shutdown()
        self._files.clear()
        self.updates_buf.clear()
        self.events_buf.clear()

    # -- parts -------------------------------------------------------------------------------
    def _local_path(self, name: str) -> str:
        return os.path.join(self.staging_dir, name)

    def _open_part(self, date: str) -> None:
        self._part_date = date
        self._part_updates = 0
        self._first_rt = self._last_rt = None
        for table in ("updates", "events"):
            name = object_name(self.prefix, table, self.cell, date, self.part)
            self._files[table] = _TableFile(self._local_path(name), self._schemas[table], self._encoder)

    def _flush(self, buf: ColumnBuffer, table: str) -> None:
        if len(buf):
            self._files[table].write(buf.columns)
            buf.clear()

    def _close_part(self) -> None:
        self._flush(self.updates_buf, "updates")
        self._flush(self.events_buf, "events")
        staged: list[StagedFile] = []
        assert self._part_date is not None
        for table, f in self._files.items():
            f.commit()
            staged.append(
                StagedFile(
                    table=table,
                    bucket=self.bucket,
                    object_name=os.path.relpath(f.final_path, self.staging_dir),
                    local_path=f.final_path,
                    rows=f.rows,
                    size=f.size,
                    md5_b64=f.md5_b64,
                    crc32c_b64=f.crc32c_b64,
                    migration_id=self.cell.migration_id,
                    date=self._part_date,
                    range_start_us=self.cell.start_us,
                    range_end_us=self.cell.end_us,
                    part=self.part,
                    updates=self._part_updates,
                    first_record_time=self._first_rt,
                    last_record_time=self._last_rt,
                    schema_version=SCHEMA_VERSION,
                )
            )
        for s in staged:
            write_sidecar(s)
        self._files.clear()
        self.completed.extend(staged)
        if self.on_part is not None and self._last_rt is not None:
            self.on_part(self.part, self._last_rt, staged)
        self.part += 1
