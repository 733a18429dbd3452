"""
### scan_updates: Canton Scan ledger history → Parquet on GCS, exactly once

Each run ingests every update whose `record_time` lies in its data interval `(start, end]`, for
every migration with records there:

1. **wait_for_scan** (sensor, reschedule mode): waits, without holding a worker slot, until the Scan
   holds records at or after the interval end, so an interval is never committed while the Scan can
   still add to it.
2. **plan**: discovers migrations and cuts the interval into cursor ranges ("cells") on the
   `scan_ingest_range_minutes` grid.
3. **cell.fetch_write** (a task group mapped over cells, pool `parquet_writer`): pages
   `/v2/updates` and stages Parquet;
4. **cell.upload** (pool `gcs_upload`) with GCSHook, then **cell.verify** the MD5 of every object —
   per cell, as soon as that cell is written.
5. **commit**: data-quality checks, removal of objects of earlier attempts, the interval manifest
   and Asset events for `canton_scan_updates` / `canton_scan_events`.

Manual runs (UI "Trigger DAG w/ config" or `airflow dags trigger -c`) take Params `start`, `end`
(ISO-8601 record times on the range grid) and optionally `migration_id`. Clearing any task, a
backfill with reprocessing, or a retry always converges to the same objects. See README.md.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, CronDataIntervalTimetable, Param, get_current_context, task, task_group
from scan_ingest.tasks import (
    EVENTS_ASSET,
    UPDATES_ASSET,
    FetchWriteOperator,
    commit_files,
    plan_interval,
    scan_has_passed,
    task_kwargs,
    upload_files,
    verify_files,
)

# Parse-time settings come from the environment (reading Variables at parse time would hit the DB
# on every parse); per-run settings are the scan_ingest_* Variables, read inside the tasks.
_CRON = os.environ.get("SCAN_INGEST_SCHEDULE", "@hourly")
# A data-interval timetable, explicitly: Airflow 3 turns a bare cron string into a trigger
# timetable whose runs have an empty interval, and a run must know its (start, end].
SCHEDULE = None if _CRON.lower() in ("", "none") else CronDataIntervalTimetable(_CRON, timezone="UTC")
START_DATE = datetime.fromisoformat(os.environ.get("SCAN_INGEST_START_DATE", "2024-06-24T00:00:00+00:00"))
CATCHUP = os.environ.get("SCAN_INGEST_CATCHUP", "false") == "true"
MAX_ACTIVE_RUNS = int(os.environ.get("SCAN_INGEST_MAX_ACTIVE_RUNS", "4"))
MAX_WRITES_PER_RUN = int(os.environ.get("SCAN_INGEST_MAX_WRITES_PER_RUN", "4"))
BACKPRESSURE_WAIT = timedelta(seconds=float(os.environ.get("SCAN_INGEST_BACKPRESSURE_WAIT_SECONDS", "20")))

with DAG(
    dag_id="scan_updates",
    schedule=SCHEDULE,
    start_date=START_DATE,
    catchup=CATCHUP,
    max_active_runs=MAX_ACTIVE_RUNS,
    max_active_tasks=16,
    doc_md=__doc__,
    tags=["canton", "scan", "ingest"],
    params={
        "start": Param(None, type=["null", "string"], description="Manual runs: range start (exclusive), ISO-8601, e.g. 2025-03-01T00:00:00Z"),
        "end": Param(None, type=["null", "string"], description="Manual runs: range end (inclusive), ISO-8601"),
        "migration_id": Param(None, type=["null", "integer"], minimum=0, description="Only this migration (default: all)"),
    },
) as dag:

    @task.sensor(
        task_id="wait_for_scan",
        mode="reschedule",
        poke_interval=60,
        timeout=timedelta(days=2).total_seconds(),
        **task_kwargs("plan", pool="scan_api"),
    )
    def wait_for_scan() -> bool:
        return scan_has_passed(get_current_context())

    @task(task_id="plan", **task_kwargs("plan", pool="scan_api"))
    def plan() -> list[dict[str, Any]]:
        return plan_interval(get_current_context())

    planned = plan()

    @task(task_id="upload", **task_kwargs("upload", pool="gcs_upload"))
    def upload(result: dict[str, Any]) -> dict[str, Any]:
        return upload_files(result)

    @task(task_id="verify", **task_kwargs("verify", pool="gcs_upload"))
    def verify(result: dict[str, Any]) -> dict[str, Any]:
        return verify_files(result)

    # A mapped task group: upload[i] and verify[i] follow fetch_write[i] as soon as it is done, so
    # staged files are delivered while other cells are still being written (backpressure needs it).
    @task_group(group_id="cell")
    def ingest_cell(cell: dict[str, Any]) -> Any:
        written = FetchWriteOperator(
            task_id="fetch_write",
            cell=cell,
            max_active_tis_per_dagrun=MAX_WRITES_PER_RUN,
            execution_timeout=timedelta(hours=2),
            backpressure_wait=BACKPRESSURE_WAIT,
            **task_kwargs("fetch_write", pool="parquet_writer"),
        )
        return verify(upload(written.output))

    # none_failed: an interval without records (skipped mapped tasks) still gets its manifest.
    @task(task_id="commit", outlets=[UPDATES_ASSET, EVENTS_ASSET], trigger_rule="none_failed", **task_kwargs("commit"))
    def commit(verified: list[dict[str, Any]]) -> dict[str, Any]:
        return commit_files(verified, get_current_context())

    verified = ingest_cell.expand(cell=planned)
    wait_for_scan() >> planned
    commit(verified)
