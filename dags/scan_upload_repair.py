"""
### scan_upload_repair: deliver staged files that were never verified

Finds files in the staging directory (Variable `scan_ingest_staging_dir`) whose sidecar says they
were written but not verified — left by a killed worker, a failed upload or a run that was marked
failed — uploads each with GCSHook (pool `gcs_upload`), verifies its MD5 against the hash recorded
at write time, and only then deletes the local copy. The `report` task lists what was repaired and
what still fails (and fails itself if anything does, so the run shows red).

Param `min_age_minutes` skips files younger than that, which may belong to a run in progress.
Run it manually, or set `SCAN_UPLOAD_REPAIR_SCHEDULE` (e.g. `@hourly`) in the scheduler's environment.
Repaired objects become part of the dataset when the interval that owns them commits; re-run that
interval (see README, runbook) if it had failed.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task
from scan_ingest.tasks import repair_list, repair_report, repair_staged_file, task_kwargs

with DAG(
    dag_id="scan_upload_repair",
    schedule=None if os.environ.get("SCAN_UPLOAD_REPAIR_SCHEDULE", "").lower() in ("", "none")
    else os.environ["SCAN_UPLOAD_REPAIR_SCHEDULE"],
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["canton", "scan", "repair"],
    params={
        "min_age_minutes": Param(30, type="number", minimum=0, description="Only files staged at least this long ago"),
        "limit": Param(500, type="integer", minimum=1, maximum=1000, description="At most this many files per run"),
    },
) as dag:

    @task(task_id="find_unverified", **task_kwargs("plan"))
    def find_unverified() -> list[str]:
        return repair_list(get_current_context())

    @task(task_id="repair", **task_kwargs("verify", pool="gcs_upload"))
    def repair(sidecar: str) -> dict[str, Any]:
        return repair_staged_file(sidecar)

    @task(task_id="report", trigger_rule="all_done", **task_kwargs("commit", retries=0))
    def report(listed: list[str], repaired: list[dict[str, Any]]) -> dict[str, Any]:
        return repair_report(listed, repaired)

    listed = find_unverified()
    report(listed, repair.expand(sidecar=listed))
