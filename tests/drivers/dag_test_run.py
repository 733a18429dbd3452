"""Run one scan_updates DagRun with dag.test() in this process and report the outcome as JSON.

Used by tests that must signal the process running a task (SIGTERM, SIGKILL). Usage:
``dag_test_run.py CONF_JSON RESULT_PATH``; AIRFLOW_HOME and the scan_ingest settings come from the
environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]


def main() -> None:
    conf, result_path = json.loads(sys.argv[1]), sys.argv[2]
    from airflow import settings
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.db import initdb

    initdb()
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["scan_updates"]
    dr = dag.test(run_conf=conf)
    session = settings.Session()
    tries = []
    for model in (TaskInstanceHistory, TaskInstance):
        for ti in session.query(model).filter(model.run_id == dr.run_id, model.task_id == "cell.fetch_write"):
            tries.append({"map_index": ti.map_index, "try_number": ti.try_number, "state": str(ti.state),
                          "end": ti.end_date.timestamp() if ti.end_date else None})
    Path(result_path).write_text(json.dumps({"state": str(dr.state), "run_id": dr.run_id, "tries": tries}))


if __name__ == "__main__":
    main()
