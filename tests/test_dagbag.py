"""Every DAG file parses cleanly, without network access, and uses only pools from pools.json."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import DAGS, REPO

EXPECTED = {"scan_updates", "scan_upload_repair", "scan_audit"}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access at DAG parse time: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_dags_import_without_errors_or_network(no_network):
    from airflow.dag_processing.dagbag import DagBag

    pools = set(json.loads((REPO / "pools.json").read_text())) | {"default_pool"}
    bag = DagBag(dag_folder=str(DAGS), known_pools=pools)
    assert bag.import_errors == {}
    assert EXPECTED <= set(bag.dag_ids)
    assert not [w for w in bag.dag_warnings if "pool" in str(w).lower()]
    for dag_id in EXPECTED:
        dag = bag.dags[dag_id]
        assert dag.doc_md and dag.doc_md.strip(), f"{dag_id} has no doc_md"
        for t in dag.tasks:
            assert t.pool in pools, (dag_id, t.task_id, t.pool)


def test_scan_updates_shape_and_priorities():
    from tests.helpers import load_dag

    dag = load_dag("scan_updates")
    tasks = dag.task_dict
    assert {"wait_for_scan", "plan", "cell.fetch_write", "cell.upload", "cell.verify", "commit"} <= set(tasks)
    assert tasks["wait_for_scan"].mode == "reschedule"
    assert tasks["cell.fetch_write"].pool == "parquet_writer"
    assert tasks["cell.upload"].pool == "gcs_upload"
    # Delivering written files wins over writing more (absolute weights, not the upstream-favouring default).
    weight = {t: tasks[t].priority_weight for t in ("cell.fetch_write", "cell.upload", "cell.verify")}
    assert weight["cell.verify"] > weight["cell.upload"] > weight["cell.fetch_write"]
    assert all(str(tasks[t].weight_rule).endswith("absolute") for t in weight)
    assert dag.max_active_runs >= 1 and tasks["cell.fetch_write"].max_active_tis_per_dagrun
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"


def test_a_day_of_cells_stays_well_below_max_map_length():
    from scan_ingest.ranges import plan_cells
    from scan_ingest.timestamps import parse_us

    day = (parse_us("2025-03-01T00:00:00Z"), parse_us("2025-03-02T00:00:00Z"))
    migrations = [(m, day[0], day[1]) for m in range(3)]  # three migrations overlapping all day
    cells = plan_cells(day[0], day[1], 15 * 60 * 1_000_000, migrations)
    assert len(cells) == 288 < 1024 // 2
