"""Staged Parquet of one cell, written through ``ingest.ingest_cell`` from the simulator over HTTP.

Read back with pyarrow and DuckDB; crash safety is proven with a real SIGKILL of a child process.
"""

from __future__ import annotations

import base64
import copy
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import google_crc32c
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scan_ingest.config import IngestSettings, ScanConnectionConfig
from scan_ingest.exceptions import DecodeError
from scan_ingest.ingest import CellResult, ingest_cell
from scan_ingest.ranges import Cell, object_name
from scan_ingest.scan_client import ScanClient, item_migration_id
from scan_ingest.schema import EVENTS_SCHEMA, METADATA_KEY_VERSION, SCHEMA_VERSION, TABLES, UPDATES_SCHEMA
from scan_ingest.staging import SIDECAR_SUFFIX, TEMP_MARKER, StagedFile
from scan_ingest.timestamps import date_of_us, format_us, parse_us

from tests.conftest import PLUGINS, REPO
from tests.helpers import expected_items
from tools.scan_sim import Ledger, LedgerConfig, ScanSimulator

PREFIX = "raw"
INGESTED_AT = parse_us("2025-03-05T12:00:00.000001Z")
# A cell of TEST_LEDGER's migration 0 holding 35 updates: with 8 rows per part, parts of 8,8,8,8,3.
CELL = Cell(0, parse_us("2025-03-01T21:00:00Z"), parse_us("2025-03-01T21:15:00Z"))
CELL_UPDATES = 35
ROWS_PER_PART = 8
ROW_GROUP_ROWS = 3


def settings_for(staging: Path, rows_per_part: int, row_group_rows: int) -> IngestSettings:
    return IngestSettings(bucket="b", prefix=PREFIX, staging_dir=str(staging), rows_per_part=rows_per_part,
                          row_group_rows=row_group_rows)


def client_for(base_url: str) -> ScanClient:
    return ScanClient(ScanConnectionConfig(base_urls=(base_url,), timeout=10))


def run_cell(base_url: str, cell: Cell, staging: Path, *, page_size: int | None = None,
             ingested_at_us: int = INGESTED_AT, checkpoint: Any = None, rows_per_part: int = ROWS_PER_PART,
             row_group_rows: int = ROW_GROUP_ROWS) -> CellResult:
    with client_for(base_url) as client:
        return ingest_cell(client, cell, settings_for(staging, rows_per_part, row_group_rows), ingested_at_us=ingested_at_us,
                           page_size=page_size, checkpoint=checkpoint)


def files_of(result: CellResult, table: str) -> list[StagedFile]:
    return sorted((f for f in result.files if f.table == table), key=lambda f: f.part)


def read(path: str) -> pa.Table:
    return pq.read_table(path)


def read_all(files: list[StagedFile]) -> pa.Table:
    return pa.concat_tables([read(f.local_path).replace_schema_metadata(None) for f in files])


def final_files(staging: Path) -> list[str]:
    return sorted(glob.glob(str(staging / "**" / "*.parquet"), recursive=True))


def temp_files(staging: Path) -> list[str]:
    return sorted(glob.glob(str(staging / "**" / f"*{TEMP_MARKER}*"), recursive=True))


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def check_sidecar(path: str) -> dict[str, Any]:
    """The sidecar of ``path`` exists and describes the file's bytes exactly."""
    with open(path + SIDECAR_SUFFIX, encoding="utf-8") as fh:
        meta = json.load(fh)
    data = Path(path).read_bytes()
    assert meta["md5_b64"] == b64(hashlib.md5(data, usedforsecurity=False).digest())
    crc = google_crc32c.Checksum()
    crc.update(data)
    assert meta["crc32c_b64"] == b64(crc.digest())
    assert meta["size"] == len(data)
    assert meta["rows"] == pq.ParquetFile(path).metadata.num_rows
    assert meta["local_path"] == path
    return meta


def ledger_events(ledger: Ledger, items: list[dict[str, Any]]) -> list[str | None]:
    """Event ids of the items in order (an unassignment has one event row without an id)."""
    out: list[str | None] = []
    for item in items:
        ids = ledger.expected_event_ids(item)
        out.extend(ids if ids or "event" not in item else [None])
    return out


class MemoryCheckpoint:
    """The Checkpoint protocol over a dict, as Airflow's task state store keeps it across retries."""

    def __init__(self) -> None:
        self.value: dict[str, Any] | None = None
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        return copy.deepcopy(self.value)

    def save(self, value: dict[str, Any]) -> None:
        self.value = copy.deepcopy(value)
        self.saves += 1


# -- a clean cell --------------------------------------------------------------------------------------
def test_cell_parts_names_schema_and_sidecars(sim: ScanSimulator, ledger: Ledger, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    result = run_cell(sim.base_url, CELL, staging, page_size=10)
    expected = expected_items(ledger, CELL.start_us, CELL.end_us, migration=0)
    assert len(expected) == CELL_UPDATES, "the test relies on 4 full parts and a short last one"
    assert result.updates == len(expected)
    assert result.events == len(ledger_events(ledger, expected))
    assert result.resumed_from_part is None

    ups, evs = files_of(result, "updates"), files_of(result, "events")
    assert [f.part for f in ups] == [f.part for f in evs] == list(range(5))
    # parts are counted in updates: every updates file holds rows_per_part rows except the last
    assert [f.rows for f in ups] == [8, 8, 8, 8, 3]
    assert [f.updates for f in ups] == [f.updates for f in evs] == [8, 8, 8, 8, 3]

    # every update once, in order; events in tree pre-order, grouped by update in the same order
    updates, events = read_all(ups), read_all(evs)
    assert updates.column("update_id").to_pylist() == [i["update_id"] for i in expected]
    assert events.column("event_id").to_pylist() == ledger_events(ledger, expected)
    assert updates.column("record_time").cast(pa.int64()).to_pylist() == [parse_us(i["record_time"]) for i in expected]
    assert set(updates.column("ingested_at").cast(pa.int64()).to_pylist()) == {INGESTED_AT}

    # names: a pure function of cell, date and part, mirrored in the staging directory
    assert sorted(final_files(staging)) == sorted(f.local_path for f in result.files)
    assert not temp_files(staging)
    for f in result.files:
        name = object_name(PREFIX, f.table, CELL, "2025-03-01", f.part)
        assert f.object_name == name
        assert f.local_path == os.path.join(str(staging), name)
        assert f.date == "2025-03-01" and f.migration_id == 0 and f.bucket == "b"

    for f in result.files:
        meta = check_sidecar(f.local_path)
        assert meta == f.to_dict()
        assert meta["schema_version"] == SCHEMA_VERSION
        assert (meta["range_start_us"], meta["range_end_us"]) == (CELL.start_us, CELL.end_us)
        # the part's first and last record times, verbatim as served
        part_items = expected[f.part * ROWS_PER_PART:(f.part + 1) * ROWS_PER_PART]
        assert (meta["first_record_time"], meta["last_record_time"]) == (part_items[0]["record_time"], part_items[-1]["record_time"])
        part = read(f.local_path)
        assert set(part.column("update_id").to_pylist()) == {i["update_id"] for i in part_items}

        schema = pq.read_schema(f.local_path)
        assert schema.remove_metadata().equals(TABLES[f.table])  # types and nullability, never inferred
        meta_kv = schema.metadata
        assert meta_kv[METADATA_KEY_VERSION] == SCHEMA_VERSION.encode()
        assert meta_kv[b"scan_ingest.migration_id"] == b"0"
        assert meta_kv[b"scan_ingest.range_start"] == format_us(CELL.start_us).encode()
        assert meta_kv[b"scan_ingest.range_end"] == format_us(CELL.end_us).encode()

    # row groups are cut every row_group_rows (3) updates
    for f in ups:
        md = pq.ParquetFile(f.local_path).metadata
        assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == ([3, 3, 2] if f.rows == 8 else [3])


def test_readable_by_duckdb_with_hive_partitions(sim: ScanSimulator, ledger: Ledger, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    cells = [CELL, Cell(1, parse_us("2025-03-02T00:00:00Z"), parse_us("2025-03-02T00:15:00Z"))]
    expected: list[dict[str, Any]] = []
    for cell in cells:
        run_cell(sim.base_url, cell, staging)
        expected += expected_items(ledger, cell.start_us, cell.end_us, migration=cell.migration_id)
    con = duckdb.connect()
    root = staging / PREFIX
    rows = con.execute(
        "SELECT update_id, migration, date, migration_id, epoch_us(record_time) AS rt "
        "FROM read_parquet(?, hive_partitioning = true) ORDER BY migration_id, rt",
        [str(root / "updates" / "*" / "*" / "*.parquet")],
    ).fetchall()
    assert [r[0] for r in rows] == [i["update_id"] for i in expected]
    for update_id, migration, date, migration_id, rt in rows:
        assert migration == migration_id, update_id
        assert str(date) == (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=rt)).date().isoformat()
    assert {(m, str(d)) for _, m, d, *_ in rows} == {(0, "2025-03-01"), (1, "2025-03-02")}

    n_events, bad = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE migration <> migration_id OR date <> CAST(timezone('UTC', record_time) AS DATE)) "
        "FROM read_parquet(?, hive_partitioning = true)",
        [str(root / "events" / "*" / "*" / "*.parquet")],
    ).fetchone()
    assert n_events == len(ledger_events(ledger, expected)) and bad == 0


def test_page_size_does_not_change_names_or_rows(sim: ScanSimulator, tmp_path: Path) -> None:
    big = run_cell(sim.base_url, CELL, tmp_path / "a", page_size=1000, ingested_at_us=INGESTED_AT)
    small = run_cell(sim.base_url, CELL, tmp_path / "b", page_size=7, ingested_at_us=INGESTED_AT + 1)
    same = run_cell(sim.base_url, CELL, tmp_path / "c", page_size=3, ingested_at_us=INGESTED_AT)
    assert small.pages > big.pages
    names = [f.object_name for f in big.files]
    assert [f.object_name for f in small.files] == names == [f.object_name for f in same.files]
    for a, b, c in zip(big.files, small.files, same.files, strict=True):
        ta, tb = read(a.local_path), read(b.local_path)
        assert ta.drop(["ingested_at"]).equals(tb.drop(["ingested_at"]))
        assert set(tb.column("ingested_at").cast(pa.int64()).to_pylist()) == {INGESTED_AT + 1}
        # with the same ingested_at a re-run writes byte-identical files
        assert (a.md5_b64, a.size) == (c.md5_b64, c.size)


# -- failures ------------------------------------------------------------------------------------------
def test_decode_error_mid_cell_leaves_no_partial_part(sim: ScanSimulator, ledger: Ledger, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    expected = expected_items(ledger, CELL.start_us, CELL.end_us, migration=0)
    bad = expected[19]["update_id"]  # in part 2 (updates 16..23), after two complete parts
    sim.corrupt(bad, "unknown_shape")
    with pytest.raises(DecodeError) as exc:
        run_cell(sim.base_url, CELL, staging, page_size=5)
    assert bad in str(exc.value)
    assert not temp_files(staging)
    for table in ("updates", "events"):
        for part in range(2, 5):
            assert not os.path.exists(staging / object_name(PREFIX, table, CELL, "2025-03-01", part))
    # the parts completed before the error stay staged, complete and described by their sidecars
    left = final_files(staging)
    assert sorted(left) == sorted(str(staging / object_name(PREFIX, t, CELL, "2025-03-01", p))
                                  for t in ("updates", "events") for p in (0, 1))
    for path in left:
        check_sidecar(path)
        read(path)


def test_resume_after_failure_continues_after_last_part(sim: ScanSimulator, ledger: Ledger, tmp_path: Path) -> None:
    clean = run_cell(sim.base_url, CELL, tmp_path / "clean", page_size=4)
    staging = tmp_path / "resumed"
    expected = expected_items(ledger, CELL.start_us, CELL.end_us, migration=0)
    checkpoint = MemoryCheckpoint()
    sim.corrupt(expected[27]["update_id"], "missing_field")  # in part 3 (updates 24..31)
    with pytest.raises(DecodeError, match=expected[27]["update_id"]):
        run_cell(sim.base_url, CELL, staging, page_size=4, checkpoint=checkpoint)
    assert checkpoint.value is not None
    assert checkpoint.value["part"] == 2 and checkpoint.value["cell"] == CELL.key
    assert checkpoint.value["last_record_time"] == expected[23]["record_time"]
    kept = {p: os.stat(p) for p in final_files(staging)}
    assert len(kept) == 6  # parts 0..2 of both tables

    sim.clear_corruptions()
    resumed = run_cell(sim.base_url, CELL, staging, page_size=4, checkpoint=checkpoint)
    assert resumed.resumed_from_part == 2
    assert resumed.updates == clean.updates == CELL_UPDATES and resumed.events == clean.events
    assert checkpoint.value["part"] == 4
    assert [(f.object_name, f.rows, f.updates) for f in sorted(resumed.files, key=lambda f: f.object_name)] == \
        [(f.object_name, f.rows, f.updates) for f in sorted(clean.files, key=lambda f: f.object_name)]
    for path, st in kept.items():  # completed parts were not rewritten
        now = os.stat(path)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    for a in clean.files:
        b = staging / a.object_name
        assert read(str(b)).equals(read(a.local_path))
        check_sidecar(str(b))
    assert not temp_files(staging)


# -- midnight ------------------------------------------------------------------------------------------
@pytest.fixture
def midnight_sim() -> Iterator[ScanSimulator]:
    """Migration 0's updates 2 µs apart from 10 µs before midnight: index 5 is exactly 00:00:00.

    A second migration exists so the Scan reports migration 0 as closed (the range is available).
    """
    config = LedgerConfig(seed=23, start="2025-03-01T23:59:59.999990Z", updates_per_migration=(20, 3), mean_gap_us=2,
                          overlap_us=0, reassignment_ratio=0.0, mean_events=3)
    with ScanSimulator(Ledger(config)) as s:
        yield s


def test_update_at_midnight_goes_to_the_next_dates_partition(midnight_sim: ScanSimulator, tmp_path: Path) -> None:
    ledger = midnight_sim.ledger
    midnight = parse_us("2025-03-02T00:00:00Z")
    assert ledger.record_time(0, 5) == "2025-03-02T00:00:00.000000Z"
    cell = Cell(0, midnight - 15 * 60_000_000, midnight)
    staging = tmp_path / "staging"
    result = run_cell(midnight_sim.base_url, cell, staging, rows_per_part=4)
    ups = files_of(result, "updates")
    # parts counted in updates from the cell start, cut at the change of date
    assert [(f.part, f.date, f.rows) for f in ups] == [(0, "2025-03-01", 4), (1, "2025-03-01", 1), (2, "2025-03-02", 1)]
    for f in result.files:
        assert f.object_name == object_name(PREFIX, f.table, cell, f.date, f.part)
        assert f"/date={f.date}/" in f.object_name
        check_sidecar(f.local_path)
    last = read(ups[-1].local_path)
    assert last.column("update_id").to_pylist() == [ledger.update_id(0, 5)]
    assert last.column("record_time").cast(pa.int64()).to_pylist() == [midnight]
    assert date_of_us(midnight) == "2025-03-02"
    events_next_day = read(files_of(result, "events")[-1].local_path)
    assert set(events_next_day.column("update_id").to_pylist()) == {ledger.update_id(0, 5)}

    # the update at midnight belongs to the cell that ends there, not to the next one
    following = run_cell(midnight_sim.base_url, Cell(0, midnight, midnight + 15 * 60_000_000), staging, rows_per_part=100)
    ids = read_all(files_of(following, "updates")).column("update_id").to_pylist()
    assert ids == [ledger.update_id(0, i) for i in range(6, 20)]


# -- SIGKILL -------------------------------------------------------------------------------------------
KILL_CELL = Cell(0, parse_us("2025-03-01T00:00:00Z"), parse_us("2025-03-01T00:15:00Z"))
KILL_ROWS_PER_PART = 700

CHILD = """
import json, os, sys
from scan_ingest.config import IngestSettings, ScanConnectionConfig
from scan_ingest.ingest import ingest_cell
from scan_ingest.ranges import Cell
from scan_ingest.scan_client import ScanClient

base_url, staging, ckpt_path, start, end, rows = sys.argv[1:7]

class FileCheckpoint:
    def load(self):
        return None
    def save(self, value):
        tmp = ckpt_path + ".new"
        with open(tmp, "w") as fh:
            json.dump(value, fh)
        os.replace(tmp, ckpt_path)

settings = IngestSettings(bucket="b", prefix="raw", staging_dir=staging, rows_per_part=int(rows), row_group_rows=200)
client = ScanClient(ScanConnectionConfig(base_urls=(base_url,), timeout=10))
ingest_cell(client, Cell(0, int(start), int(end)), settings, ingested_at_us=0, checkpoint=FileCheckpoint())
"""


class FileCheckpoint:
    """Reads the checkpoint the killed child left (the role of Airflow's task state store)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        return json.loads(self.path.read_text()) if self.path.exists() else None

    def save(self, value: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def big_sim() -> Iterator[ScanSimulator]:
    """About 2250 small transactions in KILL_CELL: parts of 700 updates, each far slower to write than a poll."""
    config = LedgerConfig(seed=31, start="2025-03-01T00:00:00Z", updates_per_migration=(2400,), mean_gap_us=400_000,
                          mean_events=3, payload_bytes=200)
    with ScanSimulator(Ledger(config)) as s:
        yield s


def _kill_while_writing(big_sim: ScanSimulator, staging: Path, ckpt: Path) -> None:
    """Start ingest_cell in a child and SIGKILL it once a part is complete and the next one is being written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS)])}
    args = [big_sim.base_url, str(staging), str(ckpt), str(KILL_CELL.start_us), str(KILL_CELL.end_us), str(KILL_ROWS_PER_PART)]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            # one part done (its two sidecars) and the next part's temp files open: kill now, early in that part
            if len(glob.glob(str(staging / "**" / f"*{SIDECAR_SUFFIX}"), recursive=True)) >= 2 and temp_files(staging):
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the child ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no part was completed within 60 s")
            time.sleep(0.001)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("resume", [False, True], ids=["fresh-rerun", "resume-from-checkpoint"])
def test_sigkill_mid_write_leaves_no_partial_file_and_rerun_completes(big_sim: ScanSimulator, tmp_path: Path, resume: bool) -> None:
    staging, ckpt = tmp_path / "staging", tmp_path / "checkpoint.json"
    _kill_while_writing(big_sim, staging, ckpt)

    stale = temp_files(staging)
    assert stale, "the child was killed while a part was being written"
    finals = final_files(staging)
    assert finals, "at least one part was complete before the kill"
    for path in finals:  # nothing under a final name is partial
        check_sidecar(path)
        assert pq.read_table(path).num_rows == json.loads(Path(path + SIDECAR_SUFFIX).read_text())["rows"]

    checkpoint = FileCheckpoint(ckpt) if resume else None
    if resume:
        assert ckpt.exists()
    result = run_cell(big_sim.base_url, KILL_CELL, staging, checkpoint=checkpoint, rows_per_part=KILL_ROWS_PER_PART,
                      row_group_rows=200)
    if resume:
        assert result.resumed_from_part is not None and result.resumed_from_part >= 0
    else:
        assert result.resumed_from_part is None
    for path in stale:
        assert not os.path.exists(path)
    assert not temp_files(staging)

    ledger = big_sim.ledger
    expected = [i for i in (ledger.item(0, n) for n in range(ledger.count(0)))
                if KILL_CELL.start_us < parse_us(i["record_time"]) <= KILL_CELL.end_us and item_migration_id(i) == 0]
    assert len(expected) > 2 * KILL_ROWS_PER_PART
    updates = read_all(files_of(result, "updates"))
    assert updates.column("update_id").to_pylist() == [i["update_id"] for i in expected]
    events = read_all(files_of(result, "events"))
    assert events.column("event_id").to_pylist() == ledger_events(ledger, expected)
    assert sorted(final_files(staging)) == sorted(f.local_path for f in result.files)
    for f in result.files:
        check_sidecar(f.local_path)
    assert pq.read_schema(files_of(result, "events")[0].local_path).remove_metadata().equals(EVENTS_SCHEMA)
    assert pq.read_schema(files_of(result, "updates")[0].local_path).remove_metadata().equals(UPDATES_SCHEMA)
