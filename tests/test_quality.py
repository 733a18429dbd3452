"""Data-quality checks block the commit with a precise message; large items are written intact."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from scan_ingest.config import IngestSettings, ScanConnectionConfig
from scan_ingest.exceptions import DataQualityError
from scan_ingest.ingest import ingest_cell
from scan_ingest.quality import check_cell_files, check_interval
from scan_ingest.ranges import Cell
from scan_ingest.scan_client import ScanClient
from scan_ingest.timestamps import parse_us

from tools.scan_sim import Ledger, LedgerConfig
from tools.scan_sim.server import ScanSimulator

CELL = Cell(0, parse_us("2025-03-01T22:00:00Z"), parse_us("2025-03-01T22:15:00Z"))


def _stage(url: str, tmp_path, cell: Cell = CELL, **kw):
    settings = IngestSettings(bucket="b", staging_dir=str(tmp_path), rows_per_part=10, **kw)
    with ScanClient(ScanConnectionConfig(base_urls=(url,))) as client:
        return ingest_cell(client, cell, settings, ingested_at_us=0)


def test_clean_cell_passes(sim, tmp_path):
    result = _stage(sim.base_url, tmp_path)
    summary = check_cell_files(CELL, result.files)
    assert summary["updates"] == result.updates
    check_interval([summary], [result.to_xcom()])


def test_missing_event_row_blocks_the_commit(sim, tmp_path):
    result = _stage(sim.base_url, tmp_path)
    events = next(f for f in result.files if f.table == "events" and f.rows > 1)
    table = pq.read_table(events.local_path)
    pq.write_table(table.slice(1), events.local_path)  # one event row lost after writing
    with pytest.raises(DataQualityError) as err:
        check_cell_files(CELL, result.files)
    assert events.object_name in str(err.value) and "event" in str(err.value)


def test_writer_and_files_disagreeing_blocks_the_commit(sim, tmp_path):
    result = _stage(sim.base_url, tmp_path)
    summary = check_cell_files(CELL, result.files)
    xcom = result.to_xcom()
    xcom["updates"] += 1
    with pytest.raises(DataQualityError, match="the writer reported"):
        check_interval([summary], [xcom])


def test_multi_megabyte_items_are_written_intact(tmp_path):
    """Every 4th update carries a ~3 MB payload (the original's writer choked on such items)."""
    ledger = Ledger(LedgerConfig(seed=3, start="2025-03-01T22:00:00Z", updates_per_migration=(60,),
                                 mean_gap_us=20_000_000, large_payload_every=4))
    with ScanSimulator(ledger) as big:
        result = _stage(big.base_url, tmp_path, row_group_rows=1000)
    items = {i["update_id"]: i for i in ledger.iter_items() if CELL.start_us < parse_us(i["record_time"]) <= CELL.end_us}
    large = [u for u, i in items.items() if len(json.dumps(i)) > 2_000_000]
    assert large, "the cell holds multi-MB items"
    rows = {}
    for f in result.files:
        if f.table == "updates":
            t = pq.read_table(f.local_path, columns=["update_id", "update_data"])
            rows.update(zip(t.column("update_id").to_pylist(), t.column("update_data").to_pylist(), strict=True))
    assert set(rows) == set(items)
    for u in large:
        assert json.loads(rows[u]) == items[u]
