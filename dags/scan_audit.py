"""
### scan_audit: completeness audit of the ingested bucket

Checks record times `(start_date 00:00, end_date + 1 day 00:00]` of `gs://{scan_ingest_bucket}/{scan_ingest_prefix}`
and writes a JSON report to `{prefix}/_audit/{timestamp}.json`. The task log holds a readable summary;
the run **fails (red) when problems are found** (after the report is written).

**cheap** mode (default) reads listings, manifests and, from each Parquet object, only its footer and
id/time columns. It reports gaps (record times no manifest covers), manifests whose files are missing
or changed (MD5/size), orphan objects listed in no manifest, unreadable objects, update ids present
in more than one file, and events that do not match their updates (`event_count`).
**deep** mode also pages the Scan per migration and day and reports update ids missing from the
bucket and ids the Scan does not serve.

With `emit_repair_commands` the summary and report list, per damaged interval, the command that
reprocesses it: `airflow dags trigger scan_updates -c '{"start": ..., "end": ...}'` (exactly the damaged
manifest's interval, or the gap) and, for hour-aligned intervals of scheduled runs,
`airflow tasks clear scan_updates -s <start> -e <end - 1s> -y`.

Params: `start_date`, `end_date` (YYYY-MM-DD; empty = yesterday, relative to the run), `migrations`
(list of ids, null = all), `mode` (`cheap` | `deep`), `emit_repair_commands` (bool).
Schedule: environment `SCAN_AUDIT_SCHEDULE` (default: none, manual runs only). Set it to `@daily` to
audit yesterday every day.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task
from scan_ingest.retry import io_task_defaults

# Parse-time settings come from the environment, like scan_updates; the audit itself reads the
# scan_ingest_* Variables inside the task.
SCHEDULE = os.environ.get("SCAN_AUDIT_SCHEDULE", "").strip() or None
if SCHEDULE is not None and SCHEDULE.lower() == "none":
    SCHEDULE = None
START_DATE = datetime.fromisoformat(os.environ.get("SCAN_INGEST_START_DATE", "2024-06-24T00:00:00+00:00"))
RETRIES = int(os.environ.get("SCAN_INGEST_RETRIES", "6"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("SCAN_INGEST_RETRY_DELAY_SECONDS", "30")))

with DAG(
    dag_id="scan_audit",
    schedule=SCHEDULE,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["canton", "scan", "audit"],
    params={
        "start_date": Param(None, type=["null", "string"], pattern=r"^(\d{4}-\d{2}-\d{2})?$",
                            description="First day audited (YYYY-MM-DD, UTC); empty = yesterday"),
        "end_date": Param(None, type=["null", "string"], pattern=r"^(\d{4}-\d{2}-\d{2})?$",
                          description="Last day audited, inclusive (YYYY-MM-DD); empty = start_date"),
        "migrations": Param(None, type=["null", "array"], items={"type": "integer", "minimum": 0},
                            description="Migration ids to audit (null = all)"),
        "mode": Param("cheap", enum=["cheap", "deep"],
                      description="cheap: bucket and manifests only; deep: also compare update ids with the Scan"),
        "emit_repair_commands": Param(True, type="boolean",
                                      description="List the intervals to reprocess and the CLI commands that do it"),
    },
) as dag:

    @task(
        task_id="audit",
        pool="scan_api",  # deep mode pages the Scan: share its connection budget (pools.json)
        execution_timeout=timedelta(hours=6),
        **io_task_defaults(retries=RETRIES, retry_delay=RETRY_DELAY),
    )
    def audit() -> dict[str, Any]:
        from scan_ingest.audit import run_audit_task

        return run_audit_task(get_current_context())

    audit()
