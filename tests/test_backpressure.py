"""Backpressure: writes wait (rescheduled, no slot held) while staged-but-unverified bytes exceed the budget."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime

import pytest
from scan_ingest.ranges import parse_object_name
from scan_ingest.staging import staging_usage
from scan_ingest.timestamps import from_datetime

from tests.helpers import expected_items, read_table, run_dag

BUDGET = 40_000  # bytes: about one cell's files, so every further write must wait for delivery


@pytest.mark.usefixtures("airflow_db")
def test_staging_stays_within_budget_plus_one_cell_and_writes_wait(ingest_env, monkeypatch, ledger, gcs_client, bucket):
    monkeypatch.setenv("AIRFLOW_VAR_SCAN_INGEST_STAGING_BUDGET_BYTES", str(BUDGET))
    monkeypatch.setenv("SCAN_INGEST_BACKPRESSURE_WAIT_SECONDS", "0.5")
    staging = ingest_env["AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR"]
    peak = {"bytes": 0}
    stop = threading.Event()

    def sample() -> None:  # watches the staging directory while the DAG runs
        while not stop.wait(0.005):
            peak["bytes"] = max(peak["bytes"], staging_usage(staging).bytes)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        dr = run_dag("scan_updates", conf={"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T23:00:00Z"})
    finally:
        stop.set()
        watcher.join()
    assert dr.state == "success"

    from airflow import settings
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskreschedule import TaskReschedule

    session = settings.Session()
    writes = session.query(TaskInstance).filter(TaskInstance.run_id == dr.run_id, TaskInstance.task_id == "cell.fetch_write").all()
    rescheduled = session.query(TaskReschedule).filter(TaskReschedule.ti_id.in_([ti.id for ti in writes])).count()
    assert rescheduled > 0, "with a one-cell budget some writes must have waited"
    assert all(ti.try_number == 1 for ti in writes), "waiting is not failing: no write used a retry"

    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    per_cell: Counter[str] = Counter()
    for b in gcs_client.list_blobs(bucket, prefix=prefix + "/"):
        parsed = parse_object_name(b.name)
        if parsed is not None:
            per_cell[f"{parsed.migration_id}/{parsed.start_us}"] += b.size
    cell_max = max(per_cell.values())  # what one write adds before it can next be held back
    assert peak["bytes"] <= BUDGET + cell_max, (peak, BUDGET, cell_max)
    ids = read_table(gcs_client, bucket, prefix, "updates").column("update_id").to_pylist()
    expected = expected_items(ledger, from_datetime(datetime(2025, 3, 1, 22, tzinfo=UTC)),
                              from_datetime(datetime(2025, 3, 1, 23, tzinfo=UTC)))
    assert Counter(ids) == Counter(i["update_id"] for i in expected)
