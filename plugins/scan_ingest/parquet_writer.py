"""Streaming, atomic, deterministic Parquet writing of one cursor range.

- Rows are flattened into column buffers and flushed as row groups when a buffer reaches
  ``row_group_rows`` rows or ``ROW_GROUP_MAX_BYTES`` of payload, so memory stays bounded whatever
  the range size.
- Parts are cut by counting updates from the range start (``rows_per_part``) and at a change of
  UTC date, never by pages: a retry with another page size yields the same parts and names.
- Each file is written to ``<final>.tmp-<pid>`` through a sink that hashes the bytes as they are
  written (MD5 and CRC32C, base64 as GCS reports them), fsynced, then renamed. A crash at any
  point never leaves an incomplete file under its final name.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import google_crc32c
import pyarrow as pa
import pyarrow.parquet as pq

from scan_ingest.flatten import EVENT_COLUMNS, UPDATE_COLUMNS, ColumnBuffer, Flattener
from scan_ingest.ranges import Cell, object_name
from scan_ingest.schema import EVENTS_SCHEMA, SCHEMA_VERSION, UPDATES_SCHEMA, with_metadata
from scan_ingest.staging import TEMP_MARKER, StagedFile, fsync_dir, write_sidecar
from scan_ingest.timestamps import date_of_us, format_us

log = logging.getLogger(__name__)

ROW_GROUP_MAX_BYTES = 32 * 1024 * 1024
COMPRESSION = "zstd"


class HashingSink:
    """A write-only file object that hashes every byte it passes to the real file."""

    def __init__(self, path: str) -> None:
        self._fh = open(path, "wb")  # closed in close()
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._crc = google_crc32c.Checksum()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)  # pyarrow hands over buffers; the CRC32C extension wants read-only bytes
        self._md5.update(chunk)
        self._crc.update(chunk)
        self._fh.write(chunk)
        self.size += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self.closed = True

    def abort(self) -> None:
        if not self.closed:
            self._fh.close()
            self.closed = True

    @property
    def md5_b64(self) -> str:
        return base64.b64encode(self._md5.digest()).decode()

    @property
    def crc32c_b64(self) -> str:
        return base64.b64encode(self._crc.digest()).decode()


def _to_table(schema: pa.Schema, columns: dict[str, list[Any]]) -> pa.Table:
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


class _TableFile:
    """One Parquet file being written under a temp name."""

    def __init__(self, final_path: str, schema: pa.Schema) -> None:
        self.final_path = final_path
        self.temp_path = f"{final_path}{TEMP_MARKER}{os.getpid()}"
        os.makedirs(os.path.dirname(final_path), exist_ok=True)
        self.sink = HashingSink(self.temp_path)
        self.schema = schema
        self.writer = pq.ParquetWriter(
            self.sink, schema, compression=COMPRESSION, use_dictionary=True, write_statistics=True
        )
        self.rows = 0

    def write(self, columns: dict[str, list[Any]]) -> None:
        table = _to_table(self.schema, columns)
        self.writer.write_table(table, row_group_size=max(1, table.num_rows))
        self.rows += table.num_rows

    def commit(self) -> None:
        self.writer.close()
        self.sink.close()
        os.replace(self.temp_path, self.final_path)
        fsync_dir(os.path.dirname(self.final_path))

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # the file is being discarded; its error is not the one to report
            log.debug("error closing aborted writer", exc_info=True)
        self.sink.abort()
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
        return self.completed

    def abort(self) -> None:
        for f in self._files.values():
            f.abort()
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
            self._files[table] = _TableFile(self._local_path(name), self._schemas[table])

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
                    size=f.sink.size,
                    md5_b64=f.sink.md5_b64,
                    crc32c_b64=f.sink.crc32c_b64,
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
