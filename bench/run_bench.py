"""Ingestion benchmark: decode limit, ingest core, end to end (dag.test and the real scheduler).

    .venv/bin/python bench/run_bench.py                 # 200,000 updates, every stage (make bench)
    .venv/bin/python bench/run_bench.py --smoke         # a few hundred updates, every stage
    .venv/bin/python bench/run_bench.py --updates 20000 --skip-scheduler --profile core,dag_test

One simulated Scan (its own process) serves one ledger; every stage reads the same range of it,
``(D, D + 1 day]``, page size 1000, each stage in a fresh child process:

- ``sim_only``: the simulator's own pages/s (the client reads the bytes, decodes nothing);
- ``decode``: every page fetched and ``orjson.loads``-ed, nothing else: the floor (plain
  ``requests``), and again reading each body in one call as ``ScanClient`` does;
- ``core``: ``scan_ingest.ingest.ingest_cell`` (what the DAG's fetch_write task runs), one cell of
  ``range_minutes=1440`` covering the range; then the Parquet size against plain pyarrow;
- ``memory_check``: ``core`` again over a tenth of the range (one 144-minute cell), to show that
  peak RSS does not grow with the range;
- ``end_to_end_dag_test``: the whole ``scan_updates`` DAG through ``dag.test()`` (manual run with
  Params start/end) against fake-gcs-server;
- ``end_to_end_scheduler``: the same run under a real scheduler, dag-processor and api-server.

Results go to ``bench/results/latest.json`` and a short table to stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO / "plugins"), str(REPO)):  # the repo root first (an installed package ships `tools`)
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

import psutil  # noqa: E402
from scan_ingest.timestamps import format_us, parse_us  # noqa: E402

from tools.gcs_emulator import GcsEmulator  # noqa: E402
from tools.scan_sim.ledger import Ledger, LedgerConfig  # noqa: E402

PYTHON = sys.executable
STAGES_PY = str(REPO / "bench" / "stages.py")
RESULTS = REPO / "bench" / "results"
DAY_US = 86_400 * 1_000_000
RANGE_DAY = "2025-03-01T00:00:00Z"  # the benchmark range is (RANGE_DAY, RANGE_DAY + 1 day]
TAIL_UPDATES = 10  # a few updates after the range, so the Scan has passed its end (the DAG's sensor)
BUCKET = "scan-bench"
MIB = 2**20

TARGETS = {
    "core_vs_decode": 0.6,
    "dag_test_vs_decode": 0.4,
    "peak_rss_mib_200k_max": 512,
    "rss_growth_max": 0.10,
    "parquet_vs_pyarrow_max": 1.2,
}


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "plugins"), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"})
    env.pop("INSECURE_TLS", None)
    env.update(extra or {})
    return env


class StageError(RuntimeError):
    pass


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="scan-bench-"))
        self.sim_proc: subprocess.Popen[bytes] | None = None
        self.airflow: Any = None
        self._airflow_thread: threading.Thread | None = None
        self.gcs: GcsEmulator | None = None
        self.base_url = ""
        self.start_us = parse_us(RANGE_DAY)
        self.end_us = self.start_us + DAY_US
        n = args.updates
        self.gap_us = max(1, (DAY_US - 1) // n)
        # First update 1 µs after the range start; gap chosen so ~n updates fall inside the range.
        self.ledger_cfg = LedgerConfig(
            seed=args.seed,
            start=format_us(self.start_us + 1),
            updates_per_migration=(n + TAIL_UPDATES,),
            mean_gap_us=self.gap_us,
            reassignment_ratio=args.reassignment_ratio,
            mean_events=args.mean_events,
            payload_bytes=args.payload_bytes,
        )
        ledger = Ledger(self.ledger_cfg, cache_bytes=0)
        self.in_range = ledger.first_index_after(0, self.end_us)
        if self.in_range >= n + TAIL_UPDATES:
            raise SystemExit("the ledger has no update after the range end; choose fewer --updates")
        self.results: dict[str, Any] = {}

    # -- services ---------------------------------------------------------------------------------
    def start_simulator(self) -> None:
        url_file = self.work / "sim.url"
        c = self.ledger_cfg
        cmd = [
            PYTHON, "-m", "tools.scan_sim", "serve", "--url-file", str(url_file),
            "--seed", str(c.seed), "--updates", str(c.updates_per_migration[0]), "--start", c.start,
            "--mean-gap-us", str(c.mean_gap_us), "--reassignment-ratio", str(c.reassignment_ratio),
            "--mean-events", str(c.mean_events), "--payload-bytes", str(c.payload_bytes),
            # A few pages of cache: the server's prefetch works, yet every stage reads cold pages.
            "--cache-mib", str(self.args.sim_cache_mib),
        ]
        log = open(self.work / "sim.log", "wb")
        self.sim_proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while not url_file.exists():
            if self.sim_proc.poll() is not None:
                raise StageError(f"simulator exited with {self.sim_proc.returncode}: {self._tail(self.work / 'sim.log')}")
            if time.monotonic() > deadline:
                raise StageError("simulator did not start within 30s")
            time.sleep(0.05)
        self.base_url = url_file.read_text().strip()

    def start_gcs(self) -> None:
        self.gcs = GcsEmulator(root=str(self.work / "gcs"), log_path=str(self.work / "gcs.log"))
        self.gcs.start()
        req = urllib.request.Request(
            f"{self.gcs.url}/storage/v1/b?project=bench", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def stop(self) -> None:
        self.stop_airflow()
        if self.sim_proc is not None and self.sim_proc.poll() is None:
            self.sim_proc.terminate()
            try:
                self.sim_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.sim_proc.kill()
                self.sim_proc.wait()
        if self.gcs is not None:
            self.gcs.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- running stages ---------------------------------------------------------------------------
    @staticmethod
    def _tail(path: Path, n: int = 40) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _cpu(self, proc: Any) -> float:
        try:
            t = psutil.Process(proc.pid if hasattr(proc, "pid") else proc).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def run_stage(self, stage: str, cfg: dict[str, Any], *, env: dict[str, str] | None = None,
                  name: str | None = None, profile: bool = False, timeout: float = 3600) -> dict[str, Any]:
        name = name or stage
        cfg_path, out_path, log_path = (self.work / f"{name}.{s}" for s in ("cfg.json", "out.json", "log"))
        cfg_path.write_text(json.dumps(cfg))
        cmd = [PYTHON, STAGES_PY, stage, str(cfg_path), str(out_path)]
        load0 = os.getloadavg()[0]
        if profile:
            prof = RESULTS / f"profile-{name}.txt"
            cmd = [str(Path(PYTHON).with_name("py-spy")), "record", "--rate", "50", "--format", "raw",
                   "--nonblocking", "-o", str(prof), "--", *cmd]
        sim0 = self._cpu(self.sim_proc)
        gcs0 = self._cpu(self.gcs._proc) if self.gcs and self.gcs._proc else 0.0
        with open(log_path, "wb") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=env or _child_env(), stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        if proc.returncode != 0 or not out_path.exists():
            raise StageError(f"stage {name} failed (exit {proc.returncode}); log {log_path}:\n{self._tail(log_path)}")
        result = json.loads(out_path.read_text())
        # Other work on the machine skews wall times: keep the 1-minute load average around each stage.
        result["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        result["simulator_cpu_s"] = self._cpu(self.sim_proc) - sim0
        if self.gcs and self.gcs._proc:
            result["gcs_emulator_cpu_s"] = self._cpu(self.gcs._proc) - gcs0
        if profile:
            result["profile"] = str(RESULTS / f"profile-{name}.txt")
            result["profile_top"] = _profile_top(RESULTS / f"profile-{name}.txt")
        return result

    def _profiled(self, stage: str) -> bool:
        return stage in {s.strip() for s in self.args.profile.split(",")}

    def _range_cfg(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "migration_id": 0, "start_us": self.start_us, "end_us": self.end_us,
                "page_size": self.args.page_size}

    def _core_cfg(self, name: str, range_minutes: int, end_us: int) -> dict[str, Any]:
        return {
            **self._range_cfg(), "end_us": end_us, "range_minutes": range_minutes,
            "staging_dir": str(self.work / f"staging-{name}"), "prefix": "raw",
            "rows_per_part": self.args.rows_per_part, "row_group_rows": self.args.row_group_rows,
            "ingested_at_us": int(time.time() * 1_000_000),
        }

    def _airflow_env(self, home: Path, prefix: str, *, unit_test_mode: bool) -> dict[str, str]:
        assert self.gcs is not None
        env = {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES_REGEXP": ".*",
            "SCAN_INGEST_SCHEDULE": "@hourly",
            "SCAN_INGEST_START_DATE": "2025-03-01T00:00:00+00:00",
            "SCAN_INGEST_RETRY_DELAY_SECONDS": "1",
            "SCAN_INGEST_RETRIES": "1",
            "STORAGE_EMULATOR_HOST": self.gcs.url,
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
                {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "bench"}}),
            "AIRFLOW_CONN_SCAN_API": json.dumps({"conn_type": "http", "host": self.base_url}),
            "AIRFLOW_VAR_SCAN_INGEST_BUCKET": BUCKET,
            "AIRFLOW_VAR_SCAN_INGEST_PREFIX": prefix,
            "AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR": str(home / "staging"),
            "AIRFLOW_VAR_SCAN_INGEST_RANGE_MINUTES": str(self.args.e2e_range_minutes),
            "AIRFLOW_VAR_SCAN_INGEST_ROWS_PER_PART": str(self.args.rows_per_part),
            "AIRFLOW_VAR_SCAN_INGEST_ROW_GROUP_ROWS": str(self.args.row_group_rows),
        }
        if unit_test_mode:
            env["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
        return _child_env(env)

    def _bucket_bytes(self, prefix: str) -> tuple[int, int]:
        assert self.gcs is not None
        root = Path(self.gcs.root) / BUCKET / prefix
        sizes = [p.stat().st_size for p in root.rglob("*.parquet")] if root.exists() else []
        return sum(sizes), len(sizes)

    # -- the stages ----------------------------------------------------------------------------------
    def stage_sim_only(self) -> None:
        r = self.run_stage("sim_only", self._range_cfg())
        r["pages_per_s"] = r["pages"] / r["wall_s"]
        r["updates_per_s"] = self.in_range / r["wall_s"]
        r["json_mb_per_s"] = r["json_bytes"] / MIB / r["wall_s"]
        self.results["simulator"] = r

    def stage_decode(self) -> None:
        self.results["decode_limit"] = _rates(self.run_stage("decode", self._range_cfg(), profile=self._profiled("decode")))
        # The client reads each body in one call, not requests' 10 KiB chunks: the same floor with that read.
        self.results["decode_limit_single_read"] = _rates(
            self.run_stage("decode", {**self._range_cfg(), "read": "single"}, name="decode-single"))

    def stage_core(self) -> None:
        r = _rates(self.run_stage("core", self._core_cfg("core", 1440, self.end_us), profile=self._profiled("core")))
        files = r.pop("files")
        cmp = self.run_stage("compare", {"files": files})
        shutil.rmtree(self.work / "staging-core", ignore_errors=True)
        r["files"] = len(files)
        self.results["ingest_core"] = r
        self.results["parquet_size"] = {
            "ours_bytes": cmp["ours_bytes"],
            "pyarrow_zstd_defaults_bytes": cmp["pyarrow_zstd_defaults_bytes"],
            "raw_json_bytes": r["json_bytes"],
            "vs_pyarrow_zstd_defaults": cmp["ours_bytes"] / max(1, cmp["pyarrow_zstd_defaults_bytes"]),
            "vs_raw_json": cmp["ours_bytes"] / max(1, r["json_bytes"]),
            "per_table": cmp["per_table"],
        }

    def stage_memory_check(self) -> None:
        small = _rates(self.run_stage("core", self._core_cfg("core-small", 144, self.start_us + DAY_US // 10),
                                      name="core-small"))
        shutil.rmtree(self.work / "staging-core-small", ignore_errors=True)
        big = self.results["ingest_core"]
        growth = big["peak_rss_mib"] / small["peak_rss_mib"] - 1
        self.results["memory_check"] = {
            "updates_small": small["updates"], "updates_large": big["updates"],
            "peak_rss_mib_20k": small["peak_rss_mib"], "peak_rss_mib_200k": big["peak_rss_mib"],
            "growth": growth,
            "note": "keys name the default sizes; the ranges are a tenth of the ledger and the whole ledger",
        }

    def stage_dag_test(self) -> None:
        home = self.work / "airflow-dag-test"
        home.mkdir()
        env = self._airflow_env(home, "dagtest", unit_test_mode=True)
        cfg = {"start": format_us(self.start_us), "end": format_us(self.end_us)}
        r = self.run_stage("dag_test", cfg, env=env, profile=self._profiled("dag_test"))
        r["output_bytes"], r["objects"] = self._bucket_bytes("dagtest")
        r["updates"], r["events"] = self.results["ingest_core"]["updates"], self.results["ingest_core"]["events"]
        r["json_bytes"] = self.results["ingest_core"]["json_bytes"]
        self.results["end_to_end_dag_test"] = _rates(r)

    def start_airflow(self) -> None:
        """Start ``airflow standalone`` (tools/airflow_local.py) with pools from pools.json, in a
        thread (``stage_scheduler`` joins it)."""
        from tools.airflow_local import AirflowStandalone

        home = self.work / "airflow-scheduler"
        home.mkdir()
        env = self._airflow_env(home, "scheduler", unit_test_mode=False)
        env["SCAN_INGEST_SCHEDULE"] = "none"  # only the benchmark's manual run, no scheduled ones
        env = {k: v for k, v in env.items() if k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_", "SCAN_INGEST_"))
               or k in ("STORAGE_EMULATOR_HOST", "PYTHONPATH")}
        pools = REPO / "pools.json"
        self.airflow = AirflowStandalone(home, env=env, parallelism=4, log_path=self.work / "standalone.log")
        started = time.monotonic()

        def start() -> None:
            try:
                self.airflow.start(pools_file=pools if pools.exists() else None)
                self.airflow.wait_for_dag("scan_updates", timeout=180)
            except BaseException as exc:  # noqa: BLE001 - re-raised by stage_scheduler
                self._airflow_error = exc
            self.airflow_startup_s = time.monotonic() - started

        self._airflow_error: BaseException | None = None
        self._airflow_thread = threading.Thread(target=start, name="bench-airflow-start", daemon=True)
        self._airflow_thread.start()

    def stop_airflow(self) -> None:
        if self.airflow is None:
            return
        if self._airflow_thread is not None:
            self._airflow_thread.join()
        proc = self.airflow._proc
        if proc is not None and proc.poll() is None:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
            # SIGINT to the standalone process alone: it stops its components in ~7 s. (Signalling
            # the whole process group at once, as AirflowStandalone.stop does, hung for its 30 s.)
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is not None:
                _gone, alive = psutil.wait_procs(children, timeout=5)
                for child in alive:  # stragglers this run started, by pid
                    try:
                        child.kill()
                    except psutil.Error:
                        pass
                self.airflow._proc = None
        self.airflow.stop()  # the harness's own fallback if it is still running
        self.airflow = None

    def stage_scheduler(self) -> None:
        """One manual run of scan_updates under the real scheduler, dag-processor and api-server."""
        if self.airflow is None:
            self.start_airflow()
        assert self.airflow is not None and self._airflow_thread is not None
        af = self.airflow
        home = af.home
        conf = {"start": format_us(self.start_us), "end": format_us(self.end_us)}
        run_id = "bench"
        try:
            self._airflow_thread.join()
            if self._airflow_error is not None:
                raise StageError(f"airflow standalone did not start: {self._airflow_error}")
            startup_s = self.airflow_startup_s
            sampler = _TreeSampler(af._proc.pid if af._proc else 0)
            sim0 = self._cpu(self.sim_proc)
            gcs0 = self._cpu(self.gcs._proc) if self.gcs and self.gcs._proc else 0.0
            t0 = time.monotonic()
            sampler.start()
            _trigger(af, "scan_updates", run_id, conf)
            state = af.wait_for_run("scan_updates", run_id, timeout=self.args.scheduler_timeout)
            trigger_to_done = time.monotonic() - t0
            sampler.stop()
            run = af.query("SELECT start_date, end_date FROM dag_run WHERE dag_id=? AND run_id=?",
                           ("scan_updates", run_id))[0]
            tis = af.query("SELECT id, task_id, start_date, end_date FROM task_instance WHERE dag_id=? AND run_id=?",
                           ("scan_updates", run_id))
        finally:
            self.stop_airflow()
        if state != "success":
            raise StageError(f"the scheduler run ended in state {state}; see {af.log_path} and {home / 'logs'}")
        tasks: dict[str, float] = {}
        for ti in tis:
            if ti["start_date"] and ti["end_date"]:
                tasks[ti["task_id"]] = tasks.get(ti["task_id"], 0.0) + _seconds(ti["start_date"], ti["end_date"])
        r: dict[str, Any] = {
            "state": state, "startup_s": startup_s, "trigger_to_done_s": trigger_to_done,
            "wall_s": _seconds(run["start_date"], run["end_date"]), "tasks_s": tasks,
            # Task processes are titled "airflow worker -- <task instance id>".
            "cpu_s": sampler.cpu_s(),
            "peak_rss_mib": max((sampler.peak_mib(str(ti["id"]).replace("-", "")) or 0.0 for ti in tis
                                 if ti["task_id"].endswith("fetch_write")), default=None) or None,
            "peak_rss_any_process_mib": sampler.peak_mib(""), "peak_rss_top_processes": sampler.top(),
            "simulator_cpu_s": self._cpu(self.sim_proc) - sim0,
            "gcs_emulator_cpu_s": (self._cpu(self.gcs._proc) - gcs0) if self.gcs and self.gcs._proc else None,
            "note": "wall_s is the DagRun's start→end in the metadata DB; cpu_s sums all Airflow processes "
                    "(sampled every 0.2 s); peak_rss_mib is the VmHWM of the fetch_write task process",
        }
        r["output_bytes"], r["objects"] = self._bucket_bytes("scheduler")
        r["updates"], r["events"] = self.results["ingest_core"]["updates"], self.results["ingest_core"]["events"]
        r["json_bytes"] = self.results["ingest_core"]["json_bytes"]
        self.results["end_to_end_scheduler"] = _rates(r)


def _trigger(af: Any, dag_id: str, run_id: str, conf: dict[str, Any]) -> None:
    """Unpause and trigger through the REST API (0.2 s; the CLI takes ~3 s per call), else the CLI."""
    base = f"http://127.0.0.1:{af.port}"

    def call(method: str, path: str, body: dict[str, Any], token: str | None = None) -> Any:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    try:
        passwords = json.loads((Path(af.home) / "simple_auth_manager_passwords.json.generated").read_text())
        user, password = next(iter(passwords.items()))
        token = call("POST", "/auth/token", {"username": user, "password": password})["access_token"]
        call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False}, token)
        call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": None, "conf": conf}, token)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        print(f"[bench] REST trigger failed ({exc}); using the CLI", file=sys.stderr)
        af.trigger(dag_id, run_id, conf)


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    def ts(v: str) -> float:
        return datetime.fromisoformat(v.replace(" ", "T")).timestamp()

    return ts(end) - ts(start)


class _TreeSampler:
    """Samples the process tree under a root: CPU per process and peak RSS (VmHWM) with its command line."""

    def __init__(self, root_pid: int, every_s: float = 0.2) -> None:
        self.root_pid = root_pid
        self.every_s = every_s
        self._cpu: dict[int, float] = {}
        self._hwm: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._sample()
        self._cpu0 = dict(self._cpu)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
                with open(f"/proc/{p.pid}/status") as fh:
                    hwm = next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0) / 1024
                cmd = " ".join(p.cmdline()).replace("-", "")  # task instance ids without dashes
            except (psutil.Error, OSError):
                continue
            if hwm > self._hwm.get(p.pid, (0.0, ""))[0]:
                self._hwm[p.pid] = (hwm, cmd)

    def cpu_s(self) -> float:
        return sum(v - self._cpu0.get(pid, 0.0) for pid, v in self._cpu.items())

    def top(self, n: int = 6) -> list[tuple[float, str]]:
        return sorted(((round(h, 1), c[:80].strip()) for h, c in self._hwm.values()), reverse=True)[:n]

    def peak_mib(self, needle: str) -> float | None:
        values = [hwm for hwm, cmd in self._hwm.values() if needle in cmd]
        return max(values) if values else None


def _profile_top(path: Path, n: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Share of py-spy samples per function: ``self`` (the innermost frame) and ``inclusive``
    (anywhere on the stack, counted once per sample)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, round(100 * c / total, 1)) for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": total, "self_pct": top(own), "inclusive_pct": top(incl)} if total else {}


def _rates(r: dict[str, Any]) -> dict[str, Any]:
    wall = r["wall_s"]
    r["updates_per_s"] = r["updates"] / wall
    r["events_per_s"] = r["events"] / wall
    r["json_mb_per_s"] = r.get("json_bytes", 0) / MIB / wall
    if "output_bytes" in r:
        r["output_mb_per_s"] = r["output_bytes"] / MIB / wall
    return r


def _ratios(res: dict[str, Any]) -> dict[str, Any]:
    def rate(key: str) -> float | None:
        return (res.get(key) or {}).get("updates_per_s")

    out: dict[str, Any] = {}
    dec, core = rate("decode_limit"), rate("ingest_core")
    single = rate("decode_limit_single_read")
    if single and core:
        out["core_vs_decode_single_read"] = core / single
    dag, sch = rate("end_to_end_dag_test"), rate("end_to_end_scheduler")
    if dec and core:
        out["core_vs_decode"] = core / dec
    if dec and dag:
        out["dag_test_vs_decode"] = dag / dec
    if core and dag:
        out["dag_test_vs_core"] = dag / core
    if core and sch:
        out["scheduler_vs_core"] = sch / core
    if dec and sch:
        out["scheduler_vs_decode"] = sch / dec
    return out


def _targets(res: dict[str, Any]) -> dict[str, Any]:
    ratios = res.get("ratios", {})
    mem = res.get("memory_check") or {}
    size = res.get("parquet_size") or {}
    checks: dict[str, Any] = {}
    if "core_vs_decode" in ratios:
        checks["core_ge_0.6x_decode"] = ratios["core_vs_decode"] >= TARGETS["core_vs_decode"]
    if "dag_test_vs_decode" in ratios:
        checks["dag_test_ge_0.4x_decode"] = ratios["dag_test_vs_decode"] >= TARGETS["dag_test_vs_decode"]
    if mem:
        checks["peak_rss_le_512mib"] = mem["peak_rss_mib_200k"] <= TARGETS["peak_rss_mib_200k_max"]
        checks["rss_growth_le_10pct"] = mem["growth"] <= TARGETS["rss_growth_max"]
    if size:
        checks["parquet_le_1.2x_pyarrow"] = size["vs_pyarrow_zstd_defaults"] <= TARGETS["parquet_vs_pyarrow_max"]
    return checks


def _table(res: dict[str, Any]) -> str:
    rows = [("stage", "upd/s", "events/s", "JSON MB/s", "out MB/s", "wall s", "CPU s", "peak RSS MiB")]
    for key, label in (("decode_limit", "decode limit"), ("decode_limit_single_read", "  (single read)"),
                       ("ingest_core", "ingest core"),
                       ("end_to_end_dag_test", "e2e dag.test"), ("end_to_end_scheduler", "e2e scheduler")):
        r = res.get(key)
        if not r:
            continue
        rss = r.get("peak_rss_mib")
        rows.append((label, f"{r['updates_per_s']:,.0f}", f"{r['events_per_s']:,.0f}", f"{r['json_mb_per_s']:.1f}",
                     f"{r['output_mb_per_s']:.1f}" if "output_mb_per_s" in r else "-", f"{r['wall_s']:.1f}",
                     f"{r['cpu_s']:.1f}" if r.get("cpu_s") is not None else "-",
                     f"{rss:.0f}" if rss is not None else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    sim = res.get("simulator")
    if sim:
        lines.append(f"simulator alone: {sim['pages_per_s']:.1f} pages/s ({sim['updates_per_s']:,.0f} upd/s, "
                     f"{sim['json_mb_per_s']:.0f} MB/s)")
    ratios = res.get("ratios", {})
    if ratios:
        lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    size = res.get("parquet_size")
    if size:
        lines.append(f"parquet: {size['ours_bytes'] / MIB:.1f} MiB = {size['vs_pyarrow_zstd_defaults']:.3f} x pyarrow "
                     f"zstd defaults ({size['pyarrow_zstd_defaults_bytes'] / MIB:.1f} MiB), "
                     f"{size['vs_raw_json']:.3f} x raw JSON ({size['raw_json_bytes'] / MIB:.0f} MiB)")
    mem = res.get("memory_check")
    if mem:
        lines.append(f"memory: peak RSS {mem['peak_rss_mib_20k']:.0f} MiB over {mem['updates_small']:,} updates, "
                     f"{mem['peak_rss_mib_200k']:.0f} MiB over {mem['updates_large']:,} ({100 * mem['growth']:+.1f}%)")
    checks = res.get("targets")
    if checks:
        lines.append("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    for stage, message in (res.get("errors") or {}).items():
        lines.append(f"ERROR in {stage}: {message.splitlines()[0] if message else ''}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=None, help="updates in the range (default 200000; 300 with --smoke)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--mean-events", type=float, default=15.0)
    p.add_argument("--payload-bytes", type=int, default=300)
    p.add_argument("--reassignment-ratio", type=float, default=0.05)
    p.add_argument("--page-size", type=int, default=1000)
    p.add_argument("--rows-per-part", type=int, default=50_000)
    p.add_argument("--row-group-rows", type=int, default=20_000)
    p.add_argument("--sim-cache-mib", type=int, default=64)
    p.add_argument("--e2e-range-minutes", type=int, default=1440,
                   help="scan_ingest_range_minutes of the end-to-end runs (1440: one cell for the whole range)")
    p.add_argument("--smoke", action="store_true", help="a few hundred updates, every stage")
    p.add_argument("--skip-dag-test", action="store_true")
    p.add_argument("--skip-scheduler", action="store_true")
    p.add_argument("--skip-memory-check", action="store_true")
    p.add_argument("--profile", nargs="?", const="core", default="",
                   help="comma-separated stages (decode, core, dag_test) to run under py-spy; raw samples go to "
                        "bench/results/profile-STAGE.txt (default: core)")
    p.add_argument("--scheduler-timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(RESULTS / "latest.json"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, staging)")
    args = p.parse_args(argv)
    if args.updates is None:
        args.updates = 300 if args.smoke else 200_000
    if args.updates < 20:
        p.error("--updates must be at least 20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    started = time.monotonic()
    res = bench.results
    res["ledger"] = {
        "updates_in_range": bench.in_range, "updates_total": args.updates + TAIL_UPDATES, "seed": args.seed,
        "mean_events": args.mean_events, "payload_bytes": args.payload_bytes,
        "reassignment_ratio": args.reassignment_ratio, "mean_gap_us": bench.gap_us,
        "range": [format_us(bench.start_us), format_us(bench.end_us)], "page_size": args.page_size,
        "rows_per_part": args.rows_per_part, "row_group_rows": args.row_group_rows,
    }
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                      "loadavg_at_start": os.getloadavg()}
    stages: list[tuple[str, Any]] = [("simulator", bench.stage_sim_only), ("decode", bench.stage_decode),
                                     ("core", bench.stage_core)]
    if not args.skip_memory_check:
        stages.append(("memory_check", bench.stage_memory_check))
    if not args.skip_dag_test:
        stages.append(("dag_test", bench.stage_dag_test))
    if not args.skip_scheduler:
        stages.append(("scheduler", bench.stage_scheduler))
    errors: dict[str, str] = {}
    try:
        bench.start_simulator()
        if not (args.skip_dag_test and args.skip_scheduler):
            bench.start_gcs()
        needs_core = {"memory_check", "dag_test", "scheduler"}
        for name, fn in stages:
            if name in needs_core and "ingest_core" not in res:
                errors[name] = "skipped: the core stage failed"
                continue
            t0 = time.monotonic()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                fn()
            except (StageError, subprocess.TimeoutExpired, TimeoutError, RuntimeError) as exc:
                # One failed stage does not hide the others' figures; the exit status reports it.
                print(f"[bench] {name} FAILED: {exc}", file=sys.stderr, flush=True)
                errors[name] = str(exc)
                continue
            print(f"[bench] {name} done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    except StageError as exc:  # the simulator or the GCS emulator did not start
        print(f"[bench] FAILED: {exc}", file=sys.stderr)
        errors["setup"] = str(exc)
    finally:
        bench.stop()
    if errors:
        res["errors"] = errors
    status = 1 if errors else 0
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    res["ratios"] = _ratios(res)
    # Smoke sizes are too small for the targets to mean anything (fixed costs dominate).
    res["targets"] = {} if args.smoke else _targets(res)
    res["bench_seconds"] = time.monotonic() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True))
    os.replace(tmp, out)
    print(_table(res))
    print(f"(written to {out}; {res['bench_seconds']:.0f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
