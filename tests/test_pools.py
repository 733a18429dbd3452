"""Under the real scheduler: pools bound concurrency, slots are reused, retries back off exponentially.

One ``airflow standalone`` (LocalExecutor, SQLite) serves the module; its tasks reach the session's
simulator and GCS emulator over 127.0.0.1. Task-instance timestamps come from its metadata DB.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from scan_ingest.timestamps import parse_us

from tests.helpers import expected_items, read_table
from tools.airflow_local import AirflowStandalone
from tools.scan_sim.server import FaultConfig

pytestmark = [pytest.mark.scheduler, pytest.mark.slow]

POOLS = {"scan_api": 2, "parquet_writer": 2, "gcs_upload": 1}
RETRY_DELAY_S = 2
PREFIX = "t/scheduler"


@pytest.fixture(scope="module")
def airflow(simulator, gcs_emulator, bucket):
    # Outside pytest's tmp dirs (pruned by later sessions), so a failing run's logs can be read.
    home = Path(tempfile.mkdtemp(prefix="scan-standalone-"))
    pools = home / "pools.json"
    pools.write_text(json.dumps({k: {"slots": v, "description": k, "include_deferred": False} for k, v in POOLS.items()}))
    env = {
        "AIRFLOW_CONN_SCAN_API": json.dumps(
            {"conn_type": "http", "host": simulator.base_url, "extra": {"timeout": 10, "in_call_retries": 0}}
        ),
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "test-project"}}
        ),
        "STORAGE_EMULATOR_HOST": gcs_emulator.url,
        "AIRFLOW_VAR_SCAN_INGEST_BUCKET": bucket,
        "AIRFLOW_VAR_SCAN_INGEST_PREFIX": PREFIX,
        "AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR": str(home / "staging"),
        "AIRFLOW_VAR_SCAN_INGEST_ROWS_PER_PART": "20",
        "SCAN_INGEST_SCHEDULE": "none",
        "SCAN_INGEST_RETRIES": "4",
        "SCAN_INGEST_RETRY_DELAY_SECONDS": str(RETRY_DELAY_S),
    }
    af = AirflowStandalone(home, env=env, parallelism=6)
    af.start(pools_file=pools)
    try:
        af.wait_for_dag("scan_updates")
        yield af
    finally:
        af.stop()
    shutil.rmtree(home, ignore_errors=True)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace(" ", "T")).timestamp()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, step in points:  # an end at the same instant as a start sorts first (-1 < 1)
        cur += step
        best = max(best, cur)
    return best


def _intervals(af: AirflowStandalone, run_id: str, task_ids: tuple[str, ...]) -> list[tuple[float, float]]:
    marks = ",".join("?" * len(task_ids))
    rows = af.query(
        f"SELECT start_date, end_date FROM task_instance WHERE run_id=? AND task_id IN ({marks}) "
        "AND start_date IS NOT NULL AND end_date IS NOT NULL", (run_id, *task_ids))
    return [(_ts(r["start_date"]), _ts(r["end_date"])) for r in rows]


def test_pools_bound_concurrency_and_slots_are_reused(airflow, ledger, gcs_client, bucket):
    prefix = PREFIX
    conf = {"start": "2025-03-01T21:00:00Z", "end": "2025-03-02T00:00:00Z"}
    airflow.trigger("scan_updates", "pools_run", conf)
    assert airflow.wait_for_run("scan_updates", "pools_run", timeout=600) == "success"

    writes = _intervals(airflow, "pools_run", ("cell.fetch_write",))
    deliveries = _intervals(airflow, "pools_run", ("cell.upload", "cell.verify"))
    assert len(writes) > POOLS["parquet_writer"] * 2, "more mapped writes than slots, so slots were reused"
    assert _max_overlap(writes) <= POOLS["parquet_writer"]
    assert _max_overlap(deliveries) <= POOLS["gcs_upload"]
    pools_used = {r["pool"] for r in airflow.query("SELECT DISTINCT pool FROM task_instance WHERE run_id='pools_run'")}
    assert {"parquet_writer", "gcs_upload", "scan_api"} <= pools_used

    ids = read_table(gcs_client, bucket, prefix, "updates").column("update_id").to_pylist()
    expected = expected_items(ledger, parse_us(conf["start"]), parse_us(conf["end"]))
    assert sorted(ids) == sorted(i["update_id"] for i in expected)


def test_failing_task_retries_back_off_exponentially(airflow, sim, gcs_client, bucket):
    prefix = PREFIX
    # Every /v2/updates call answers 503 until the third try of a fetch_write has started.
    sim.set_faults(FaultConfig(rate=1.0, kinds=("503",)))
    conf = {"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T22:30:00Z", "migration_id": 0}
    airflow.trigger("scan_updates", "retry_run", conf)
    airflow.wait_for(
        lambda: bool(airflow.query("SELECT 1 FROM task_instance WHERE run_id='retry_run' AND task_id='cell.fetch_write' "
                                   "AND try_number >= 3")),
        timeout=300, what="a third try of fetch_write")
    sim.set_faults(None)
    assert airflow.wait_for_run("scan_updates", "retry_run", timeout=300) == "success"

    rows = airflow.query(
        "SELECT map_index, try_number, start_date, end_date FROM task_instance_history "
        "WHERE run_id='retry_run' AND task_id='cell.fetch_write' ORDER BY map_index, try_number")
    current = airflow.query("SELECT map_index, try_number, start_date FROM task_instance "
                            "WHERE run_id='retry_run' AND task_id='cell.fetch_write'")
    tries: dict[int, dict[int, tuple[float, float | None]]] = {}
    for r in rows:
        tries.setdefault(r["map_index"], {})[r["try_number"]] = (_ts(r["start_date"]), _ts(r["end_date"]))
    for r in current:
        tries.setdefault(r["map_index"], {})[r["try_number"]] = (_ts(r["start_date"]), None)
    checked = 0
    for by_try in tries.values():
        if {1, 2, 3} <= set(by_try):
            gap1 = by_try[2][0] - by_try[1][1]
            gap2 = by_try[3][0] - by_try[2][1]
            # Airflow waits at least retry_delay * 2**(try-1): 2 s after try 1, 4 s after try 2.
            assert gap1 >= RETRY_DELAY_S * 0.99
            assert gap2 >= 2 * RETRY_DELAY_S * 0.99
            checked += 1
    assert checked, f"no mapped fetch_write reached three tries: {tries}"
    assert read_table(gcs_client, bucket, prefix, "updates").num_rows > 0
    assert Path(airflow.log_path).exists()
