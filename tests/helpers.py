"""Shared test helpers: run a DAG with dag.test(), read what landed in the bucket, ground truth."""

from __future__ import annotations

import io
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
