"""`make demo`: the whole product on this machine, end to end, then everything it started is stopped.

1. starts the Scan simulator (a few simulated days, two migrations whose record times overlap),
   fake-gcs-server and Airflow (scheduler, dag-processor, triggerer, api-server on 127.0.0.1);
2. imports pools.json, sets the scan_api connection and scan_ingest_* Variables, unpauses
   scan_updates and starts an Airflow backfill over the simulated history;
3. waits with visible progress, then prints a summary read back from the bucket: intervals,
   updates, events, files, bytes, MD5 verification, the gs:// layout, and a DuckDB query whose
   counts per migration and day are compared with the simulator's own ledger.

Set DEMO_KEEP=1 to leave Airflow running (UI on the printed port) until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from tools.airflow_local import AirflowStandalone  # noqa: E402
from tools.gcs_emulator import GcsEmulator  # noqa: E402
from tools.scan_sim import Ledger, LedgerConfig  # noqa: E402

LEDGER = LedgerConfig(
    seed=2025,
    start="2025-03-01T00:00:00Z",
    updates_per_migration=(3500, 3500),
    mean_gap_us=40_000_000,  # ~1.6 simulated days per migration
    overlap_us=3 * 3600 * 1_000_000,  # migration 1 starts 3 h before migration 0 ends
)
BUCKET = "canton-scan-demo"
PREFIX = "raw"


def say(msg: str) -> None:
    print(f"[demo {datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def start_simulator(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    url_file = workdir / "scan.url"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cfg = LEDGER
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.scan_sim", "serve", "--port", "0", "--seed", str(cfg.seed),
         "--start", cfg.start, "--updates", ",".join(map(str, cfg.updates_per_migration)),
         "--mean-gap-us", str(cfg.mean_gap_us), "--overlap-us", str(cfg.overlap_us), "--url-file", str(url_file)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "simulator.log", "wb"),
    )
    deadline = time.monotonic() + 60
    while not url_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the simulator did not start; see {workdir / 'simulator.log'}")
        time.sleep(0.1)
    return proc, url_file.read_text().strip()


def main() -> int:
    # SIGTERM (e.g. from a CI timeout) must still run the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    (REPO / ".demo").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=REPO / ".demo"))
    ledger = Ledger(LEDGER)
    first = min(ledger.first_record_time_us(m) for m in ledger.migration_ids())
    last = max(ledger.last_record_time_us(m) for m in ledger.migration_ids())
    day = 86_400_000_000
    from_day = datetime.fromtimestamp(first // day * day / 1e6, tz=UTC)
    # Only days the Scan already holds completely (the live-edge sensor would wait for the rest).
    to_day = datetime.fromtimestamp((last // day * day) / 1e6, tz=UTC) - timedelta(days=1)
    say(f"ledger: {ledger.total_count()} updates in migrations {ledger.migration_ids()}, "
        f"{from_day:%Y-%m-%d} .. {datetime.fromtimestamp(last / 1e6, tz=UTC):%Y-%m-%d %H:%M}; backfilling "
        f"{from_day:%Y-%m-%d} .. {to_day:%Y-%m-%d} (daily runs)")

    sim_proc, scan_url = start_simulator(workdir)
    gcs = GcsEmulator(log_path=str(workdir / "fake-gcs.log"))
    airflow: AirflowStandalone | None = None
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.start()
        say(f"Scan simulator at {scan_url}; fake-gcs-server at {gcs.url}")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="demo", credentials=AnonymousCredentials())
        client.create_bucket(BUCKET)
        env = {
            "AIRFLOW_CONN_SCAN_API": json.dumps({"conn_type": "http", "host": scan_url}),
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
                {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "demo"}}),
            "STORAGE_EMULATOR_HOST": gcs.url,
            "AIRFLOW_VAR_SCAN_INGEST_BUCKET": BUCKET,
            "AIRFLOW_VAR_SCAN_INGEST_PREFIX": PREFIX,
            "AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR": str(workdir / "staging"),
            "AIRFLOW_VAR_SCAN_INGEST_RANGE_MINUTES": "360",
            "SCAN_INGEST_SCHEDULE": "@daily",
            "SCAN_INGEST_START_DATE": from_day.isoformat(),
        }
        airflow = AirflowStandalone(workdir / "airflow-home", env=env, parallelism=4)
        say("starting Airflow (scheduler, dag-processor, triggerer, api-server) ...")
        airflow.start(pools_file=REPO / "pools.json", progress=say)
        airflow.wait_for_dag("scan_updates")
        airflow.cli("dags", "unpause", "scan_updates")
        say("starting the backfill: airflow backfill create --dag-id scan_updates "
            f"--from-date {from_day:%Y-%m-%d} --to-date {to_day:%Y-%m-%d} --reprocess-behavior completed")
        airflow.cli("backfill", "create", "--dag-id", "scan_updates", "--from-date", from_day.isoformat(),
                    "--to-date", to_day.isoformat(), "--reprocess-behavior", "completed")
        started = time.monotonic()
        last_line = ""
        expected_runs = (to_day - from_day).days + 1
        while True:
            # Only the backfill's runs: the scheduler also starts today's run, whose sensor waits for the live edge.
            runs = airflow.query("SELECT state, count(*) n FROM dag_run WHERE dag_id='scan_updates' "
                                 "AND run_type='backfill' GROUP BY state")
            tis = airflow.query("SELECT ti.state, count(*) n FROM task_instance ti JOIN dag_run dr "
                                "ON ti.dag_id=dr.dag_id AND ti.run_id=dr.run_id WHERE dr.dag_id='scan_updates' "
                                "AND dr.run_type='backfill' GROUP BY ti.state")
            by_state = {r["state"]: r["n"] for r in runs}
            line = (f"runs {dict(sorted(by_state.items()))}; tasks "
                    + ", ".join(f"{r['state'] or 'pending'}={r['n']}" for r in tis))
            if line != last_line:
                say(line)
                last_line = line
            done = by_state.get("success", 0) + by_state.get("failed", 0)
            if done >= expected_runs and not by_state.get("running") and not by_state.get("queued"):
                break
            if time.monotonic() - started > 1800:
                raise TimeoutError("the backfill did not finish within 30 minutes")
            time.sleep(3)
        say(f"backfill finished in {time.monotonic() - started:.0f}s")
        ok = summarise(client, ledger, from_day, to_day + timedelta(days=1), workdir)
        if by_state.get("failed"):
            say("some runs FAILED: see the task logs under " + str(workdir / "airflow-home" / "logs"))
            ok = False
        if os.environ.get("DEMO_KEEP") == "1":
            say(f"Airflow stays up at http://127.0.0.1:{airflow.port} (login: admin, password in "
                f"{workdir / 'airflow-home' / 'simple_auth_manager_passwords.json.generated'}); Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        say("stopping everything the demo started ...")
        if airflow is not None:
            airflow.stop()
        gcs.stop()
        sim_proc.terminate()
        sim_proc.wait(timeout=30)
        say(f"stopped. Logs kept in {workdir}")


def summarise(client, ledger: Ledger, start: datetime, end: datetime, workdir: Path) -> bool:
    import duckdb
    from scan_ingest.scan_client import item_migration_id
    from scan_ingest.timestamps import date_of_us, from_datetime, parse_us

    manifests = [json.loads(b.download_as_bytes()) for b in client.list_blobs(BUCKET, prefix=f"{PREFIX}/_manifests/")]
    data = [b for b in client.list_blobs(BUCKET, prefix=f"{PREFIX}/") if b.name.endswith(".parquet")]
    listed = {f["object_name"]: f["md5_b64"] for m in manifests for f in m["files"]}
    verified = sum(1 for b in data if listed.get(b.name) == b.md5_hash)
    local = workdir / "bucket-copy"
    for b in data:
        target = local / b.name
        target.parent.mkdir(parents=True, exist_ok=True)
        b.download_to_filename(str(target))
    say(f"intervals committed: {len(manifests)}; updates {sum(m['totals']['updates'] for m in manifests)}, "
        f"events {sum(m['totals']['events'] for m in manifests)}, files {len(data)}, "
        f"bytes {sum(b.size for b in data):,}; MD5-verified against the manifests: {verified}/{len(data)}")
    say("layout:")
    for name in sorted(b.name for b in data)[:3] + ["..."] + sorted(listed)[-1:]:
        print(f"    gs://{BUCKET}/{name}" if name != "..." else "    ...")
    con = duckdb.connect()
    rows = con.execute(
        f"""SELECT migration, date, count(*) AS updates, count(DISTINCT update_id) AS distinct_ids
            FROM read_parquet('{local}/{PREFIX}/updates/**/*.parquet', hive_partitioning=true)
            GROUP BY ALL ORDER BY migration, date"""
    ).fetchall()
    events = dict(((m, str(d)), n) for m, d, n in con.execute(
        f"""SELECT migration, date, count(*) FROM read_parquet('{local}/{PREFIX}/events/**/*.parquet',
            hive_partitioning=true) GROUP BY ALL""").fetchall())
    lo, hi = from_datetime(start), from_datetime(end)
    truth: Counter[tuple[int, str]] = Counter()
    truth_events: Counter[tuple[int, str]] = Counter()
    for item in ledger.iter_items():
        rt = parse_us(item["record_time"])
        if lo < rt <= hi:
            key = (item_migration_id(item), date_of_us(rt))
            truth[key] += 1
            truth_events[key] += len(ledger.expected_event_ids(item)) if "events_by_id" in item else 1
    say("DuckDB over the bucket's files (read_parquet(..., hive_partitioning=true)) vs the simulator's ledger:")
    print(f"    {'migration':>9} {'date':>10} {'updates':>8} {'ledger':>8} {'events':>8} {'ledger':>8}")
    ok = True
    seen = set()
    for m, d, n, distinct in rows:
        key = (int(m), str(d))
        seen.add(key)
        match = n == distinct == truth[key] and events.get(key) == truth_events[key]
        ok &= match
        print(f"    {m:>9} {d!s:>10} {n:>8} {truth[key]:>8} {events.get(key, 0):>8} {truth_events[key]:>8}"
              f"  {'ok' if match else 'MISMATCH'}")
    missing = set(truth) - seen
    ok &= not missing
    say("every update exactly once: " + ("YES" if ok else f"NO (missing partitions {sorted(missing)})"))
    return ok


if __name__ == "__main__":
    sys.exit(main())
