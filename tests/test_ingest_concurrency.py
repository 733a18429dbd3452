"""The background Parquet thread of a cell: same output for any page size, stoppable, never left behind.

``ingest_cell`` encodes and compresses row groups in a background thread while it flattens the next
page. Against the real simulator over HTTP: the files do not depend on how pages fall, and a cell
stopped by its ``cancelled`` event, by ``client.cancel()`` or by bad data leaves neither temp files
nor threads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from scan_ingest.config import IngestSettings, ScanConnectionConfig
from scan_ingest.exceptions import DecodeError
from scan_ingest.ingest import ingest_cell
from scan_ingest.ranges import Cell
from scan_ingest.scan_client import IngestCancelledError, ScanClient
from scan_ingest.staging import TEMP_MARKER
from scan_ingest.timestamps import parse_us

from tests.sim_support import ObservedSimulator
from tools.scan_sim import Ledger, LedgerConfig

START = parse_us("2025-03-01T00:00:00Z")
CELL = Cell(0, START, START + 15 * 60_000_000)
PAGE = 50
THREAD_NAMES = ("scan-ingest-parquet",)
# About 1800 small updates in CELL: 36 pages of PAGE, parts of 200 updates.
LEDGER = LedgerConfig(seed=23, start="2025-03-01T00:00:00.5Z", updates_per_migration=(2000,),
                      mean_gap_us=450_000, mean_events=3, payload_bytes=80, reassignment_ratio=0.05)


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger(LEDGER)


def client_for(scan: ObservedSimulator) -> ScanClient:
    return ScanClient(ScanConnectionConfig(base_urls=(scan.base_url,), timeout=10))


def settings_for(tmp_path: Path) -> IngestSettings:
    return IngestSettings(bucket="b", prefix="raw", staging_dir=str(tmp_path / "staging"), rows_per_part=200,
                          row_group_rows=120)


def ingest_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAMES)]


def temp_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "staging").rglob("*") if TEMP_MARKER in p.name]


def test_cell_output_does_not_depend_on_page_size(scan: ObservedSimulator, tmp_path: Path) -> None:
    """With background encoding: the same file names, rows and bytes for any page size."""
    results = []
    for i, page_size in enumerate((PAGE, 333)):
        settings = IngestSettings(bucket="b", prefix="raw", staging_dir=str(tmp_path / f"s{i}"), rows_per_part=200,
                                  row_group_rows=120)
        with client_for(scan) as client:
            result = ingest_cell(client, CELL, settings, ingested_at_us=1, page_size=page_size)
        results.append([(f.object_name, f.rows, f.md5_b64) for f in result.files])
    assert len(results[0]) > 10
    assert results[0] == results[1]
    assert ingest_threads() == []


class _CancelAfterFirstPart:
    """A checkpoint that stops the cell once its first part is staged (a deterministic moment)."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self.saved: list[dict[str, Any]] = []

    def load(self) -> dict[str, Any] | None:
        return None

    def save(self, value: dict[str, Any]) -> None:
        self.saved.append(value)
        if len(self.saved) == 1:
            self.stop()


def test_cancelled_event_stops_the_cell_and_leaves_nothing_running(scan: ObservedSimulator, tmp_path: Path) -> None:
    cancelled = threading.Event()
    checkpoint = _CancelAfterFirstPart(cancelled.set)
    with client_for(scan) as client, pytest.raises(IngestCancelledError):
        ingest_cell(client, CELL, settings_for(tmp_path), ingested_at_us=1, checkpoint=checkpoint,
                    cancelled=cancelled, page_size=PAGE)
    assert len(checkpoint.saved) == 1  # stopped before a second part
    assert temp_files(tmp_path) == []
    assert ingest_threads() == []  # the encoder thread was joined


def test_client_cancel_stops_the_cell_and_leaves_nothing_running(scan: ObservedSimulator, tmp_path: Path) -> None:
    client = client_for(scan)
    checkpoint = _CancelAfterFirstPart(client.cancel)
    with pytest.raises(IngestCancelledError):
        ingest_cell(client, CELL, settings_for(tmp_path), ingested_at_us=1, checkpoint=checkpoint, page_size=PAGE)
    assert len(checkpoint.saved) == 1
    assert temp_files(tmp_path) == []
    assert ingest_threads() == []


def test_decode_error_mid_cell_leaves_no_threads_or_temp_files(
    scan: ObservedSimulator, ledger: Ledger, tmp_path: Path
) -> None:
    bad = ledger.update_id(0, 700)  # on page 15 of 50 items, after three parts were staged
    scan.corrupt(bad, "missing_field")
    with client_for(scan) as client, pytest.raises(DecodeError, match=bad):
        ingest_cell(client, CELL, settings_for(tmp_path), ingested_at_us=1, page_size=PAGE)
    assert temp_files(tmp_path) == []
    assert ingest_threads() == []
