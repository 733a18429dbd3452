"""Bad input and a full disk: the affected range fails clearly, nothing of it is committed, the rest
goes on, and clearing after the cause is fixed completes it."""

from __future__ import annotations

import errno
import glob
import os
import subprocess
from collections import Counter
from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest
from scan_ingest.config import IngestSettings, ScanConnectionConfig
from scan_ingest.ingest import ingest_cell
from scan_ingest.ranges import Cell
from scan_ingest.scan_client import ScanClient
from scan_ingest.staging import staging_usage
from scan_ingest.timestamps import from_datetime, parse_us

from tests.helpers import blobs, clear_and_resume, expected_items, read_table, run_dag, task_states

HOUR1 = {"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T23:00:00Z", "migration_id": 0}
HOUR2 = {"start": "2025-03-01T23:00:00Z", "end": "2025-03-02T00:00:00Z", "migration_id": 0}


def _ids(gcs_client, bucket, prefix) -> list[str]:
    return read_table(gcs_client, bucket, prefix, "updates").column("update_id").to_pylist()


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("kind, message", [
    ("unknown_shape", "unknown item shape"),
    ("bad_timestamp", "effective_at"),
    ("missing_field", "synchronizer_id"),
    ("non_json", "undecodable JSON"),
])
def test_bad_input_fails_its_range_only_and_clearing_after_the_fix_completes_it(
        kind, message, ingest_env, sim, ledger, gcs_client, bucket, caplog, capfd):
    expected1 = expected_items(ledger, parse_us(HOUR1["start"]), parse_us(HOUR1["end"]), migration=0)
    bad = expected1[len(expected1) // 2]
    assert "events_by_id" in bad or kind != "bad_timestamp"
    sim.corrupt(bad["update_id"], kind)
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]

    dr = run_dag("scan_updates", conf=HOUR1)
    assert dr.state == "failed"
    states = task_states("scan_updates", dr.run_id)
    failed = [k for k, s in states.items() if k[0] == "cell.fetch_write" and s == "failed"]
    if kind == "non_json":
        # The whole page is unreadable, so every cell whose pages reach the bad item fails.
        assert failed, states
    else:
        assert len(failed) == 1, states  # only the cell holding the bad item
    assert states[("commit", -1)] == "upstream_failed"
    names = blobs(gcs_client, bucket, prefix)
    assert not [n for n in names if "_manifests" in n], "nothing of the broken interval is committed"
    out, err = capfd.readouterr()  # the task runner logs to the console as well as to logging
    log = caplog.text + out + err
    assert message in log and (bad["update_id"] in log or kind == "non_json")
    if kind == "non_json":
        assert "/v2/updates" in log  # the URL is named

    # A later interval is unaffected. (Its own logical date: dag.test() replaces a run with the same one.)
    assert run_dag("scan_updates", conf=HOUR2, logical_date=datetime(2025, 3, 2, tzinfo=UTC)).state == "success"

    sim.clear_corruptions()
    dr = clear_and_resume("scan_updates", dr.run_id, ["cell.fetch_write", "cell.upload", "cell.verify", "commit"])
    assert dr.state == "success"
    expected2 = expected_items(ledger, parse_us(HOUR2["start"]), parse_us(HOUR2["end"]), migration=0)
    assert Counter(_ids(gcs_client, bucket, prefix)) == Counter(i["update_id"] for i in expected1 + expected2)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 48 KiB tmpfs: writes hit ENOSPC. Needs root (as in CI); skipped where mount is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_cleanly_and_the_retry_after_freeing_space_succeeds(sim, ledger, tiny_disk):
    settings = IngestSettings(bucket="b", staging_dir=str(tiny_disk / "staging"), rows_per_part=10)
    cell = Cell(0, parse_us("2025-03-01T22:00:00Z"), parse_us("2025-03-01T22:15:00Z"))
    with ScanClient(ScanConnectionConfig(base_urls=(sim.base_url,))) as client, pytest.raises(OSError) as err:
        ingest_cell(client, cell, settings, ingested_at_us=0)
    assert err.value.errno == errno.ENOSPC
    assert not glob.glob(os.path.join(tiny_disk, "**", "*.tmp-*"), recursive=True)
    # A final-named file is always complete (it may lack its sidecar if the disk filled right after
    # the rename: then it is not staged for upload, and the rerun rewrites it).
    for path in glob.glob(os.path.join(tiny_disk, "**", "*.parquet"), recursive=True):
        pq.read_metadata(path)

    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)  # space freed
    with ScanClient(ScanConnectionConfig(base_urls=(sim.base_url,))) as client:
        result = ingest_cell(client, cell, settings, ingested_at_us=0)
    expected = expected_items(ledger, cell.start_us, cell.end_us, migration=0)
    assert result.updates == len(expected)
    assert staging_usage(settings.staging_dir).files == len(result.files)


def test_interval_end_not_yet_in_the_scan_is_not_committed(sim, ledger, tmp_path):
    from scan_ingest.exceptions import ScanRangeNotAvailableError

    cell = Cell(1, parse_us("2025-03-02T00:00:00Z"), parse_us("2025-03-02T00:15:00Z"))
    sim.set_visible_until(parse_us("2025-03-02T00:07:00Z"))
    settings = IngestSettings(bucket="b", staging_dir=str(tmp_path))
    with ScanClient(ScanConnectionConfig(base_urls=(sim.base_url,))) as client, pytest.raises(ScanRangeNotAvailableError):
        ingest_cell(client, cell, settings, ingested_at_us=0)
    assert from_datetime(datetime(2025, 3, 2, tzinfo=UTC)) == cell.start_us


def test_live_edge_sensor_waits_until_the_scan_has_passed_the_interval_end(ingest_env, sim):
    from scan_ingest.tasks import scan_has_passed

    context = {"params": {"start": "2025-03-02T00:00:00Z", "end": "2025-03-02T00:15:00Z"}}
    sim.set_visible_until(parse_us("2025-03-02T00:14:59Z"))
    assert scan_has_passed(context) is False
    sim.set_visible_until(parse_us("2025-03-02T00:15:30Z"))
    assert scan_has_passed(context) is True
