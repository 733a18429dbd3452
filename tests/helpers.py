"""Shared test helpers: run a DAG with dag.test(), read what landed in the bucket, ground truth."""

from __future__ import annotations

import io
import logging
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from scan_ingest.scan_client import item_migration_id
from scan_ingest.timestamps import parse_us

from tests.conftest import DAGS


def load_dag(dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def run_dag(dag_id: str, *, logical_date: datetime | None = None, conf: dict[str, Any] | None = None) -> Any:
    """One DagRun through the real Airflow dag.test() loop (tasks in-process, retries honoured)."""
    dag = load_dag(dag_id)
    return dag.test(logical_date=logical_date, run_conf=conf)


def blobs(gcs_client: Any, bucket: str, prefix: str) -> dict[str, Any]:
    return {b.name: b for b in gcs_client.list_blobs(bucket, prefix=prefix + "/")}


def read_table(gcs_client: Any, bucket: str, prefix: str, table: str) -> pa.Table:
    """Every Parquet file of one table under the prefix, concatenated (as a reader of the bucket sees it)."""
    parts = []
    for name, blob in sorted(blobs(gcs_client, bucket, f"{prefix}/{table}").items()):
        if name.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(blob.download_as_bytes()))
            parts.append(t.replace_schema_metadata(None))
    if not parts:
        from scan_ingest.schema import TABLES

        return TABLES[table].empty_table()
    return pa.concat_tables(parts)


def expected_items(ledger: Any, start_us: int, end_us: int, migration: int | None = None) -> list[dict[str, Any]]:
    """Ground truth from the simulator's own ledger: items with start < record_time <= end."""
    out = []
    for item in ledger.iter_items():
        rt = parse_us(item["record_time"])
        if start_us < rt <= end_us and migration in (None, item_migration_id(item)):
            out.append(item)
    return out


def run_dag_marking(dag_id: str, *, conf: dict[str, Any], mark_success: str) -> Any:
    """dag.test() with the tasks matching ``mark_success`` marked successful without running."""
    return load_dag(dag_id).test(run_conf=conf, mark_success_pattern=mark_success)


def clear_and_resume(dag_id: str, run_id: str, task_ids: list[str], *, timeout_s: float = 300.0) -> Any:
    """Clear tasks of an existing run (as the UI's "Clear" does) and drive the run to its end.

    Uses Airflow's own ``clear_task_instances`` and the same in-process loop as dag.test(), so the
    cleared tasks run again through the real task runner with their XComs and dependencies.
    """
    import time as _time

    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import clear_task_instances
    from airflow.sdk import timezone
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import DagRunState, TaskInstanceState

    dag = load_dag(dag_id)
    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    session = settings.Session()
    dr = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one()
    tis = [ti for ti in dr.get_task_instances(session=session) if ti.task_id in task_ids]
    assert tis, f"no task instances {task_ids} in {run_id}"
    clear_task_instances(tis, session, dag_run_state=DagRunState.RUNNING)
    dr.state = DagRunState.RUNNING
    session.commit()
    dr.dag = scheduler_dag
    deadline = _time.monotonic() + timeout_s
    while dr.state == DagRunState.RUNNING:
        assert _time.monotonic() < deadline, "run did not finish in time"
        session.expire_all()
        schedulable, _ = dr.update_state(session=session)
        for ti in schedulable:
            if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
            ti.scheduled_dttm = timezone.utcnow()
        session.commit()
        scheduled = [ti for ti in dr.get_task_instances(session=session) if ti.state == TaskInstanceState.SCHEDULED]
        if not scheduled:
            _time.sleep(0.5)  # waiting for a retry delay, exactly as dag.test() does
        for ti in scheduled:
            try:
                _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
            except Exception:  # the task's state records the failure, as in dag.test()
                logging.getLogger(__name__).exception("task %s failed", ti.task_id)
    return dr


def task_states(dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    session = settings.Session()
    rows = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id).all()
    return {(ti.task_id, ti.map_index): str(ti.state) for ti in rows}
