"""End-to-end: the scan_updates DAG through dag.test() against the simulator and fake-gcs-server."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from scan_ingest.timestamps import from_datetime

from tests.helpers import blobs, expected_items, read_table, run_dag


def _interval_runs(start: datetime, hours: int) -> list[tuple[int, int]]:
    return [(from_datetime(start + timedelta(hours=h)), from_datetime(start + timedelta(hours=h + 1))) for h in range(hours)]


@pytest.mark.usefixtures("airflow_db")
def test_manual_run_ingests_range_exactly_once(ingest_env, ledger, gcs_client, bucket):
    dr = run_dag("scan_updates", conf={"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T23:00:00Z"})
    assert dr.state == "success"
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    updates = read_table(gcs_client, bucket, prefix, "updates")
    events = read_table(gcs_client, bucket, prefix, "events")
    expected = expected_items(ledger, from_datetime(datetime(2025, 3, 1, 22, tzinfo=UTC)),
                              from_datetime(datetime(2025, 3, 1, 23, tzinfo=UTC)))
    assert expected, "the test interval must hold updates"
    ids = updates.column("update_id").to_pylist()
    assert Counter(ids) == Counter(i["update_id"] for i in expected)
    n_events = sum(len(ledger.expected_event_ids(i)) if "events_by_id" in i else 1 for i in expected)
    assert events.num_rows == n_events
    assert any(n.endswith(".json") for n in blobs(gcs_client, bucket, prefix + "/_manifests"))
