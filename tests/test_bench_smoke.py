"""The benchmark runs end to end at smoke size and writes every figure it promises (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_bench_smoke_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    # The bench sets up its own simulator, GCS emulator and AIRFLOW_HOME; keep the session's out of it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW_", "AIRFLOW__")) and k != "STORAGE_EMULATOR_HOST"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_bench.py"), "--smoke", "--skip-scheduler", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    res = json.loads(out.read_text())
    assert "errors" not in res
    assert res["ledger"]["updates_in_range"] > 0
    for stage in ("decode_limit", "ingest_core", "end_to_end_dag_test"):
        for key in ("updates_per_s", "events_per_s", "wall_s", "cpu_s", "peak_rss_mib"):
            assert res[stage][key] > 0, (stage, key)
    core = res["ingest_core"]
    assert core["updates"] == res["decode_limit"]["updates"] == res["ledger"]["updates_in_range"]
    assert core["events"] == res["decode_limit"]["events"]
    assert core["output_bytes"] > 0 and core["output_mb_per_s"] > 0
    assert res["end_to_end_dag_test"]["output_bytes"] > 0
    assert res["simulator"]["pages_per_s"] > 0
    mem = res["memory_check"]
    assert mem["peak_rss_mib_20k"] > 0 and mem["peak_rss_mib_200k"] > 0
    assert 0 < mem["updates_small"] < mem["updates_large"]
    size = res["parquet_size"]
    assert size["ours_bytes"] > 0 and size["pyarrow_zstd_defaults_bytes"] > 0 and size["raw_json_bytes"] > 0
    assert {"core_vs_decode", "dag_test_vs_decode", "dag_test_vs_core"} <= set(res["ratios"])
    assert "end_to_end_scheduler" not in res  # skipped on request
    assert "ingest core" in proc.stdout and "decode limit" in proc.stdout  # the table
