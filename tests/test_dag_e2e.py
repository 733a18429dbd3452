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


@pytest.mark.usefixtures("airflow_db")
def test_consecutive_scheduled_intervals_across_migrations_exactly_once(ingest_env, ledger, gcs_client, bucket):
    """Data-interval runs over a migration boundary with overlapping record times, plus a re-run."""
    start = datetime(2025, 3, 1, 22, tzinfo=UTC)
    runs = _interval_runs(start, 2)  # (22:00, 23:00] and (23:00, 00:00]: both migrations, and midnight
    for _, end_us in runs:
        dr = run_dag("scan_updates", logical_date=datetime.fromtimestamp(end_us / 1e6, tz=UTC))
        assert dr.state == "success"
        interval = (from_datetime(dr.data_interval_start), from_datetime(dr.data_interval_end))
        assert interval in runs
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    expected = expected_items(ledger, runs[0][0], runs[-1][1])
    assert {i.get("migration_id", i.get("event", {}).get("migration_id")) for i in expected} == {0, 1}

    def check() -> None:
        updates = read_table(gcs_client, bucket, prefix, "updates")
        got = list(zip(updates.column("update_id").to_pylist(), updates.column("migration_id").to_pylist(), strict=True))
        assert Counter(u for u, _ in got) == Counter(i["update_id"] for i in expected)
        events = read_table(gcs_client, bucket, prefix, "events")
        per_update = Counter(events.column("update_id").to_pylist())
        for item in expected:
            want = len(ledger.expected_event_ids(item)) if "events_by_id" in item else 1
            assert per_update[item["update_id"]] == want

    check()
    names_before = set(blobs(gcs_client, bucket, prefix))
    # Clearing and re-running an interval replaces its objects instead of adding copies.
    dr = run_dag("scan_updates", logical_date=datetime.fromtimestamp(runs[0][1] / 1e6, tz=UTC))
    assert dr.state == "success"
    check()
    assert set(blobs(gcs_client, bucket, prefix)) == names_before


@pytest.mark.usefixtures("airflow_db")
def test_rerun_with_another_part_size_removes_objects_of_the_earlier_attempt(ingest_env, monkeypatch, ledger, gcs_client, bucket):
    conf = {"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T23:00:00Z"}
    monkeypatch.setenv("AIRFLOW_VAR_SCAN_INGEST_ROWS_PER_PART", "7")
    assert run_dag("scan_updates", conf=conf).state == "success"
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    first = {n for n in blobs(gcs_client, bucket, prefix) if n.endswith(".parquet")}
    monkeypatch.setenv("AIRFLOW_VAR_SCAN_INGEST_ROWS_PER_PART", "20")
    assert run_dag("scan_updates", conf=conf).state == "success"
    second = {n for n in blobs(gcs_client, bucket, prefix) if n.endswith(".parquet")}
    # Fewer, larger parts the second time: commit removed the first attempt's extra parts.
    assert first - second and len(second) < len(first)
    ids = read_table(gcs_client, bucket, prefix, "updates").column("update_id").to_pylist()
    expected = expected_items(ledger, from_datetime(datetime(2025, 3, 1, 22, tzinfo=UTC)),
                              from_datetime(datetime(2025, 3, 1, 23, tzinfo=UTC)))
    assert sorted(ids) == sorted(i["update_id"] for i in expected)


@pytest.mark.usefixtures("airflow_db")
def test_interval_without_records_is_committed_empty(ingest_env, gcs_client, bucket):
    dr = run_dag("scan_updates", conf={"start": "2025-03-01T19:00:00Z", "end": "2025-03-01T20:00:00Z"})
    assert dr.state == "success"
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    names = list(blobs(gcs_client, bucket, prefix))
    assert [n for n in names if "_manifests" in n] and not [n for n in names if n.endswith(".parquet")]


@pytest.mark.usefixtures("airflow_db")
def test_ingest_is_exact_with_five_percent_faults_of_every_kind(ingest_env, sim, ledger, gcs_client, bucket):
    from tools.scan_sim.server import FaultConfig

    sim.set_faults(FaultConfig(rate=0.05, slow_seconds=0.5, seed=5, endpoints=("*",)))
    conf = {"start": "2025-03-01T22:00:00Z", "end": "2025-03-02T00:00:00Z"}
    dr = run_dag("scan_updates", conf=conf)
    assert dr.state == "success"
    assert sum(sim.stats["faults"].values()) > 0
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    ids = read_table(gcs_client, bucket, prefix, "updates").column("update_id").to_pylist()
    expected = expected_items(ledger, from_datetime(datetime(2025, 3, 1, 22, tzinfo=UTC)),
                              from_datetime(datetime(2025, 3, 2, tzinfo=UTC)))
    assert Counter(ids) == Counter(i["update_id"] for i in expected)


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("conf, message", [
    ({"start": "2025-03-01T23:00:00Z", "end": "2025-03-01T22:00:00Z"}, "must be after start"),
    ({"start": "2025-03-01T22:00:00Z", "end": "not-a-time"}, "invalid Param"),
    ({"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T22:07:00Z"}, "not aligned"),
    ({"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T23:00:00Z", "migration_id": 9}, "not a migration"),
])
def test_invalid_params_fail_the_plan_with_a_clear_error(ingest_env, conf, message, caplog):
    from scan_ingest.exceptions import ConfigError
    from scan_ingest.tasks import plan_interval
    from scan_ingest.timestamps import parse_us

    class _TI:
        def xcom_push(self, key, value):  # the plan never gets this far
            raise AssertionError("plan must fail before publishing")

    with pytest.raises(ConfigError, match=message):
        plan_interval({"params": conf, "ti": _TI()})
    assert parse_us(conf["start"])
