"""Graceful shutdown: a running fetch_write killed with SIGTERM or SIGKILL leaves nothing partial.

The DagRun runs in a child process (dag.test(), so the task runs in that process under Airflow's
real task runner and its SIGTERM handler); the test signals it while a part is being written.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scan_ingest.timestamps import parse_us

from tests.helpers import expected_items, read_table
from tools.scan_sim.server import FaultConfig

DRIVER = Path(__file__).parent / "drivers" / "dag_test_run.py"
CONF = {"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T22:15:00Z", "migration_id": 0}
SLOW_S = 20.0


def _start(tmp_path: Path, sim, ingest_env) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ)
    env["AIRFLOW_HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir(exist_ok=True)
    env["AIRFLOW_CONN_SCAN_API"] = json.dumps(
        {"conn_type": "http", "host": sim.base_url, "extra": {"timeout": 60, "page_size": 5}})
    result = tmp_path / f"result-{time.monotonic_ns()}.json"
    proc = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(CONF), str(result)], env=env,
                            stdout=open(tmp_path / "driver.log", "ab"), stderr=subprocess.STDOUT)
    return proc, result


def _temp_files(staging: str) -> list[str]:
    return glob.glob(os.path.join(staging, "**", "*.tmp-*"), recursive=True)


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _assert_exact(ledger, gcs_client, bucket, prefix) -> None:
    ids = read_table(gcs_client, bucket, prefix, "updates").column("update_id").to_pylist()
    expected = expected_items(ledger, parse_us(CONF["start"]), parse_us(CONF["end"]), migration=0)
    assert sorted(ids) == sorted(i["update_id"] for i in expected)


@pytest.mark.usefixtures("airflow_db")
def test_sigterm_stops_the_write_promptly_and_the_retry_completes(tmp_path, sim, ingest_env, ledger, gcs_client, bucket):
    staging = ingest_env["AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR"]
    # The first page comes at once; every later page is held back by the simulator.
    sim.set_faults(FaultConfig(rate=1.0, kinds=("slow",), slow_seconds=SLOW_S))
    proc, result = _start(tmp_path, sim, ingest_env)
    try:
        _wait(lambda: bool(_temp_files(staging)), 120, "a part being written")
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        sim.set_faults(None)
        assert proc.wait(timeout=240) == 0
    finally:
        proc.kill()
    outcome = json.loads(result.read_text())
    assert outcome["state"] == "success"
    first = [t for t in outcome["tries"] if t["try_number"] == 1 and t["end"]]
    assert first and first[0]["state"] in ("up_for_retry", "failed")
    # The killed attempt ended long before the held-back page would have arrived.
    assert first[0]["end"] - signalled < SLOW_S / 2
    assert max(t["try_number"] for t in outcome["tries"]) == 2
    assert not _temp_files(staging)
    _assert_exact(ledger, gcs_client, bucket, ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"])


@pytest.mark.usefixtures("airflow_db")
def test_sigkill_mid_write_leaves_no_partial_file_and_a_rerun_is_exact(tmp_path, sim, ingest_env, ledger, gcs_client, bucket):
    staging = ingest_env["AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR"]
    sim.set_faults(FaultConfig(rate=1.0, kinds=("slow",), slow_seconds=SLOW_S))
    proc, _ = _start(tmp_path, sim, ingest_env)
    try:
        _wait(lambda: bool(_temp_files(staging)), 120, "a part being written")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    sim.set_faults(None)
    leftovers = _temp_files(staging)
    assert leftovers, "the kill landed while a part was being written"
    finals = [p for p in glob.glob(os.path.join(staging, "**", "*.parquet"), recursive=True)]
    assert all(os.path.exists(p + ".meta.json") for p in finals), "a final-named file without its sidecar"

    proc, result = _start(tmp_path, sim, ingest_env)
    assert proc.wait(timeout=240) == 0
    assert json.loads(result.read_text())["state"] == "success"
    assert not _temp_files(staging)
    _assert_exact(ledger, gcs_client, bucket, ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"])
