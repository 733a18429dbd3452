"""Run a real Airflow (``airflow standalone``: scheduler, dag-processor, triggerer, api-server) on 127.0.0.1.

Used by the demo, the scheduler tests and the benchmark. Everything lives in one AIRFLOW_HOME; the
metadata DB is SQLite, which callers may read directly (``query``) to follow task instances
without paying for a CLI call each time.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowStandalone:
    def __init__(self, home: str | Path, *, env: dict[str, str] | None = None, parallelism: int = 4,
                 port: int | None = None, log_path: str | Path | None = None) -> None:
        self.home = Path(home)
        self.port = port or _free_port()
        self.log_path = Path(log_path or self.home / "standalone.log")
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
        }
        for key in ("AIRFLOW__CORE__UNIT_TEST_MODE", "AIRFLOW__LOGGING__BASE_LOG_FOLDER"):
            self.env.pop(key, None)
        self.env.update(env or {})
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True, attempts: int = 5) -> str:
        for attempt in range(attempts):
            out = subprocess.run(["airflow", *args], env=self.env, capture_output=True, text=True, timeout=300)
            # SQLite allows one writer; a CLI write racing the scheduler may find it locked: try again.
            if out.returncode == 0 or "database is locked" not in out.stderr or attempt + 1 == attempts:
                break
            time.sleep(2 * (attempt + 1))
        if check and out.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    def start(self, *, pools_file: str | Path | None = None, timeout: float = 180.0,
              progress: Callable[[str], None] | None = None) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.cli("db", "migrate")
        if pools_file is not None:
            self.cli("pools", "import", str(pools_file))
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(["airflow", "standalone"], env=self.env, stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self._proc.poll() is not None:
                raise RuntimeError(f"airflow standalone exited ({self._proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"airflow standalone not healthy after {timeout}s; see {self.log_path}")
            time.sleep(1)
        if progress:
            progress(f"Airflow is up on http://127.0.0.1:{self.port}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v2/monitor/health", timeout=2) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError):
            return False
        return data.get("scheduler", {}).get("status") == "healthy"

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGINT)
            self._proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> AirflowStandalone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- metadata DB -------------------------------------------------------------------------
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        con = sqlite3.connect(f"file:{self.home / 'airflow.db'}?mode=ro", uri=True, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def wait_for(self, condition: Callable[[], bool], *, timeout: float, what: str, poll: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; see {self.log_path}")
            time.sleep(poll)

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> None:
        self.wait_for(lambda: bool(self.query("SELECT 1 FROM dag WHERE dag_id=?", (dag_id,))),
                      timeout=timeout, what=f"DAG {dag_id} to be parsed")

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.query("SELECT state FROM dag_run WHERE dag_id=? AND run_id=?", (dag_id, run_id))
        return rows[0]["state"] if rows else None

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any] | None = None) -> None:
        self.cli("dags", "unpause", dag_id)
        self.cli("dags", "trigger", dag_id, "-r", run_id, "-c", json.dumps(conf or {}))

    def wait_for_run(self, dag_id: str, run_id: str, *, timeout: float = 600.0,
                     progress: Callable[[str], None] | None = None) -> str:
        last = ""

        def done() -> bool:
            nonlocal last
            state = self.run_state(dag_id, run_id)
            if progress is not None:
                rows = self.query("SELECT state, count(*) n FROM task_instance WHERE dag_id=? AND run_id=? GROUP BY state",
                                  (dag_id, run_id))
                line = ", ".join(f"{r['state'] or 'none'}={r['n']}" for r in rows)
                if line != last:
                    progress(f"{run_id}: {state}; tasks {line}")
                    last = line
            return state in ("success", "failed")

        self.wait_for(done, timeout=timeout, what=f"run {run_id} of {dag_id}", poll=2.0)
        return str(self.run_state(dag_id, run_id))
