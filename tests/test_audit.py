"""The completeness audit (scan_audit DAG, scan_ingest.audit) on buckets the real pipeline wrote.

One module fixture ingests 2025-03-01 of the test ledger with the real scan_updates DAG as two
manual runs, (00:00, 23:00] and (23:00, 24:00]: two manifests covering the whole day. Each test
gets a byte-for-byte copy under its own prefix (manifests rewritten to name the new prefix), damages
it on purpose and checks that exactly that damage is reported, with the interval to reprocess.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from scan_ingest.audit import (
    DuplicateGroup,
    Gap,
    ObjectInfo,
    audit_bucket,
    read_object,
    resolve_request,
)
from scan_ingest.config import ScanConnectionConfig
from scan_ingest.exceptions import ConfigError
from scan_ingest.ranges import parse_object_name
from scan_ingest.scan_client import ScanClient
from scan_ingest.timestamps import parse_us

from tests.conftest import REPO, TEST_LEDGER
from tests.helpers import blobs, expected_items, load_dag, run_dag
from tools.scan_sim import Ledger
from tools.scan_sim.server import ScanSimulator

pytestmark = pytest.mark.usefixtures("airflow_db")

PRISTINE = "t/audit-pristine"
RUNS = [("2025-03-01T00:00:00Z", "2025-03-01T23:00:00Z"), ("2025-03-01T23:00:00Z", "2025-03-02T00:00:00Z")]
DAY = ("2025-03-01T00:00:00Z", "2025-03-02T00:00:00Z")
RANGE_US = 15 * 60 * 1_000_000
M1 = "_manifests/20250301T000000Z_20250301T230000Z.json"
M2 = "_manifests/20250301T230000Z_20250302T000000Z.json"
TRIGGER_M1 = """airflow dags trigger scan_updates -c '{"start": "2025-03-01T00:00:00Z", "end": "2025-03-01T23:00:00Z"}'"""
TRIGGER_M2 = """airflow dags trigger scan_updates -c '{"start": "2025-03-01T23:00:00Z", "end": "2025-03-02T00:00:00Z"}'"""


def _env(sim_url: str, bucket: str, prefix: str, staging: Path) -> dict[str, str]:
    return {
        "AIRFLOW_CONN_SCAN_API": json.dumps({"conn_type": "http", "host": sim_url, "extra": {"timeout": 10}}),
        "AIRFLOW_VAR_SCAN_INGEST_BUCKET": bucket,
        "AIRFLOW_VAR_SCAN_INGEST_PREFIX": prefix,
        "AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR": str(staging),
        "AIRFLOW_VAR_SCAN_INGEST_ROWS_PER_PART": "20",
        "AIRFLOW_VAR_SCAN_INGEST_ROW_GROUP_ROWS": "50",
    }


@pytest.fixture(scope="module")
def pristine(airflow_db, simulator, gcs_emulator, bucket, tmp_path_factory) -> str:
    """2025-03-01 ingested by the real DAG, once per module (each test works on its own copy)."""
    env = _env(simulator.base_url, bucket, PRISTINE, tmp_path_factory.mktemp("staging"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for start, end in RUNS:
            assert run_dag("scan_updates", conf={"start": start, "end": end}).state == "success"
    return PRISTINE


def clone(gcs_client: Any, bucket: str, src: str, dst: str) -> None:
    """Copy every object of ``src`` to ``dst``; manifests name their objects, so those are rewritten."""
    b = gcs_client.bucket(bucket)
    for blob in gcs_client.list_blobs(bucket, prefix=src + "/"):
        rel = blob.name[len(src) + 1:]
        if rel.startswith("_manifests/"):
            text = blob.download_as_text().replace(f'"{src}/', f'"{dst}/')
            b.blob(f"{dst}/{rel}").upload_from_string(text, content_type="application/json")
        elif not rel.startswith("_audit/"):
            b.copy_blob(blob, b, f"{dst}/{rel}")


@dataclass
class Bucket:
    """One test's copy of the pristine bucket, with the helpers the tests share."""

    client: Any
    name: str
    prefix: str
    scan_url: str

    def path(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def blob(self, rel: str) -> Any:
        return self.client.bucket(self.name).blob(self.path(rel))

    def manifest(self, rel: str) -> dict[str, Any]:
        return json.loads(self.blob(rel).download_as_bytes())

    def ids(self, rel: str) -> list[str]:
        return pq.read_table(io.BytesIO(self.blob(rel).download_as_bytes()), columns=["update_id"]).column(
            "update_id").to_pylist()

    def audit(self, *, mode: str = "cheap", start: str = DAY[0], end: str = DAY[1], **kw: Any) -> Any:
        from scan_ingest.gcs import get_hook

        scan = ScanClient(ScanConnectionConfig(base_urls=(self.scan_url,), timeout=10)) if mode == "deep" else None
        try:
            return audit_bucket(get_hook("google_cloud_default"), bucket=self.name, prefix=self.prefix,
                                start_us=parse_us(start), end_us=parse_us(end), range_us=RANGE_US, mode=mode,
                                scan=scan, **kw)
        finally:
            if scan is not None:
                scan.close()

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads(b.download_as_bytes()) for _, b in sorted(blobs(self.client, self.name, self.path("_audit")).items())]


@pytest.fixture
def bkt(ingest_env, pristine, gcs_client, bucket, sim) -> Bucket:
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    clone(gcs_client, bucket, pristine, prefix)
    return Bucket(gcs_client, bucket, prefix, sim.base_url)


def _problems(report: Any) -> dict[str, int]:
    return {k: v for k, v in report.problem_counts().items() if v}


def _upd(mig: int, cell_start: str, cell_end: str, part: int, table: str = "updates") -> str:
    return f"{table}/migration={mig}/date=2025-03-01/{cell_start}_{cell_end}_p{part:04d}.parquet"


# -- the DAG --------------------------------------------------------------------------------------
def test_scan_audit_dag_imports_cleanly():
    dag = load_dag("scan_audit")
    assert dag.schedule is None  # SCAN_AUDIT_SCHEDULE unset: manual runs only
    assert set(dag.params.keys()) == {"start_date", "end_date", "migrations", "mode", "emit_repair_commands"}
    assert dag.params["mode"] == "cheap" and dag.params["emit_repair_commands"] is True
    assert dag.doc_md and "scan_audit" in dag.doc_md
    (audit,) = dag.tasks
    assert audit.retries == int(os.environ["SCAN_INGEST_RETRIES"]) and audit.retry_exponential_backoff == 2.0


def test_resolve_request_defaults_and_validation():
    midnight = datetime(2025, 3, 5, tzinfo=UTC)  # a @daily run's data interval end
    req = resolve_request({}, midnight)
    assert (req.start_date, req.end_date, req.migrations, req.mode, req.emit_repair_commands) == (
        "2025-03-04", "2025-03-04", None, "cheap", True)
    assert (req.start_us, req.end_us) == (parse_us("2025-03-04T00:00:00Z"), parse_us("2025-03-05T00:00:00Z"))
    assert resolve_request({"start_date": ""}, datetime(2025, 3, 5, 10, tzinfo=UTC)).start_date == "2025-03-04"
    req = resolve_request({"start_date": "2025-03-01", "migrations": [1, 0, 1], "mode": "deep"}, midnight)
    assert (req.start_date, req.end_date, req.migrations, req.mode) == ("2025-03-01", "2025-03-01", [0, 1], "deep")
    for bad in ({"start_date": "2025-3-1x"}, {"start_date": "2025-03-02", "end_date": "2025-03-01"},
                {"migrations": ["x"]}, {"mode": "full"}):
        with pytest.raises(ConfigError):
            resolve_request(bad, midnight)


def test_clean_bucket_passes_the_audit_dag_in_deep_mode(bkt, ledger):
    # 2025-02-28 has no manifest, but the Scan holds no record then: a gap with nothing lost.
    dr = run_dag("scan_audit", conf={"start_date": "2025-02-28", "end_date": "2025-03-01", "mode": "deep"})
    assert dr.state == "success"
    (report,) = bkt.reports()
    assert report["ok"] and report["problem_count"] == 0, report["problem_counts"]
    assert [(g["start"], g["end"], g["migration_id"], g["scan_updates"]) for g in report["gaps"]] == [
        ("2025-02-28T00:00:00.000000Z", "2025-03-01T00:00:00.000000Z", None, 0)]
    assert report["repairs"] == [] and report["superseded"] == []
    truth = expected_items(ledger, *map(parse_us, DAY))
    per_mig = {m: len(expected_items(ledger, *map(parse_us, DAY), migration=m)) for m in (0, 1)}
    assert {d["migration_id"]: (d["date"], d["scan_updates"], d["bucket_updates"]) for d in report["deep"]} == {
        m: ("2025-03-01", n, n) for m, n in per_mig.items()}
    assert report["stats"]["manifests"] == 2 and report["stats"]["update_rows"] == len(truth)


def test_audit_dag_fails_red_with_summary_and_repair_commands(bkt, caplog):
    bkt.blob(M2).delete()  # interval (23:00, 24:00] loses its manifest
    victim = _upd(0, "20250301T221500Z", "20250301T223000Z", 1, "events")
    bkt.blob(victim).delete()  # and a committed events file disappears
    dr = run_dag("scan_audit", conf={"start_date": "2025-03-01", "end_date": "2025-03-01"})
    assert dr.state == "failed"
    (report,) = bkt.reports()  # written before the task failed
    m2_files = {f["object_name"] for f in json.loads(
        bkt.client.bucket(bkt.name).blob(f"{PRISTINE}/{M2}").download_as_bytes())["files"]}
    assert report["problem_counts"] == {"gaps": 1, "manifest_problems": 1, "orphans": len(m2_files), "foreign_objects": 0,
                                        "unreadable": 0, "duplicates": 0, "event_mismatches": 1, "deep": 0}
    assert [(g["start"], g["end"], g["migration_id"]) for g in report["gaps"]] == [
        ("2025-03-01T23:00:00.000000Z", "2025-03-02T00:00:00.000000Z", None)]
    assert [(p["manifest"], p["kind"], p["object_name"]) for p in report["manifest_problems"]] == [
        (bkt.path(M1), "missing", bkt.path(victim))]
    assert {o["object_name"].replace(bkt.prefix, PRISTINE) for o in report["orphans"]} == m2_files
    assert [r["commands"] for r in report["repairs"]] == [
        [TRIGGER_M1],
        [TRIGGER_M2, "airflow tasks clear scan_updates -s 2025-03-01T23:00:00+00:00 -e 2025-03-01T23:59:59+00:00 -y"],
    ]
    log = caplog.text
    assert "RESULT: " in log and "gaps (no manifest covers these record times) (1):" in log
    assert TRIGGER_M1 in log and TRIGGER_M2 in log and f"gs://{bkt.name}/{bkt.path('_audit/')}" in log


# -- each damage, precisely -----------------------------------------------------------------------
def test_deleted_file_is_reported_and_deep_mode_lists_its_updates(bkt):
    victim = _upd(0, "20250301T231500Z", "20250301T233000Z", 1)
    lost = bkt.ids(victim)
    bkt.blob(victim).delete()
    r = bkt.audit(mode="deep")
    assert _problems(r) == {"manifest_problems": 1, "event_mismatches": 1, "deep": 1}
    assert [(p.manifest, p.kind, p.object_name) for p in r.manifest_problems] == [(bkt.path(M2), "missing", bkt.path(victim))]
    (em,) = r.event_mismatches  # its events lost their update rows
    assert (em.migration_id, em.cell_start, em.kind, em.count) == (0, "2025-03-01T23:15:00.000000Z", "events_without_update", len(lost))
    assert set(em.update_ids) == set(lost)
    (deep,) = [d for d in r.deep if d.is_problem]
    assert (deep.migration_id, deep.date, deep.missing_count, deep.unexpected_count) == (0, "2025-03-01", len(lost), 0)
    assert {m["update_id"] for m in deep.missing} == set(lost)
    assert deep.bucket_updates == deep.scan_updates - len(lost)
    assert [(x.start, x.end, x.migration_id, x.commands) for x in r.repairs] == [
        ("2025-03-01T23:00:00Z", "2025-03-02T00:00:00Z", None, [TRIGGER_M2])]


def test_copy_under_another_name_is_an_orphan_and_a_duplicate_and_the_repair_removes_it(bkt):
    src = _upd(0, "20250301T230000Z", "20250301T231500Z", 0)
    copy = _upd(0, "20250301T230000Z", "20250301T231500Z", 7)
    b = bkt.client.bucket(bkt.name)
    b.copy_blob(bkt.blob(src), b, bkt.path(copy))
    ids = bkt.ids(src)
    r = bkt.audit()
    assert _problems(r) == {"orphans": 1, "duplicates": 1}
    (orphan,) = r.orphans
    assert (orphan.object_name, orphan.covered_by) == (bkt.path(copy), bkt.path(M2))
    assert r.duplicates == [DuplicateGroup(sorted([bkt.path(src), bkt.path(copy)]), len(ids), sorted(ids))]
    (repair,) = r.repairs
    assert (repair.start, repair.end, repair.migration_id, repair.commands) == (
        "2025-03-01T23:00:00Z", "2025-03-02T00:00:00Z", None, [TRIGGER_M2])

    # The listed command's conf, run for real, removes the copy and the audit comes back clean.
    conf = json.loads(repair.commands[0].split(" -c ", 1)[1].strip("'"))
    assert run_dag("scan_updates", conf=conf).state == "success"
    assert not bkt.blob(copy).exists()
    after = bkt.audit()
    assert after.ok, after.summary()


def test_removed_manifest_is_a_gap_and_its_files_orphans(bkt):
    listed = {f["object_name"] for f in bkt.manifest(M1)["files"]}
    bkt.blob(M1).delete()
    r = bkt.audit()
    assert r.gaps == [Gap("2025-03-01T00:00:00.000000Z", "2025-03-01T23:00:00.000000Z", None, [])]
    assert {o.object_name for o in r.orphans} == listed and all(o.covered_by is None for o in r.orphans)
    assert _problems(r) == {"gaps": 1, "orphans": len(listed)}
    (repair,) = r.repairs  # the files' cells all lie inside the gap: one interval to reprocess
    assert repair.commands == [
        TRIGGER_M1, "airflow tasks clear scan_updates -s 2025-03-01T00:00:00+00:00 -e 2025-03-01T22:59:59+00:00 -y"]
    # Asking for one migration reports the gap for it alone, with a migration-filtered repair.
    r0 = bkt.audit(migrations=[0], emit_repair_commands=False)
    assert r0.gaps == [Gap("2025-03-01T00:00:00.000000Z", "2025-03-01T23:00:00.000000Z", 0, [])]
    assert {o.object_name for o in r0.orphans} == {n for n in listed if "/migration=0/" in n}
    assert _problems(r0) == {"gaps": 1, "orphans": len(r0.orphans)}
    assert [(x.start, x.end, x.migration_id, x.commands) for x in r0.repairs] == [
        ("2025-03-01T00:00:00Z", "2025-03-01T23:00:00Z", 0, [])]


def test_overwritten_object_is_changed_and_unreadable(bkt):
    victim = _upd(1, "20250301T233000Z", "20250301T234500Z", 0, "events")
    partner = pq.read_table(io.BytesIO(bkt.blob(_upd(1, "20250301T233000Z", "20250301T234500Z", 0)).download_as_bytes()),
                            columns=["update_id", "event_count"]).to_pylist()
    entry = next(f for f in bkt.manifest(M2)["files"] if f["object_name"] == bkt.path(victim))
    bkt.blob(victim).upload_from_string(b"these are other bytes, not Parquet")
    r = bkt.audit()
    assert _problems(r) == {"manifest_problems": 1, "unreadable": 1, "event_mismatches": 1}
    (p,) = r.manifest_problems
    assert (p.manifest, p.kind, p.object_name) == (bkt.path(M2), "changed", bkt.path(victim))
    assert f"md5 {entry['md5_b64']} size {entry['size']} in the manifest" in p.detail
    assert [u.object_name for u in r.unreadable] == [bkt.path(victim)]
    (em,) = r.event_mismatches  # the updates of that part lost their events
    assert (em.migration_id, em.cell_start, em.kind) == (1, "2025-03-01T23:30:00.000000Z", "event_count")
    assert set(em.update_ids) == {u["update_id"] for u in partner if u["event_count"]}
    assert [x.commands for x in r.repairs] == [[TRIGGER_M2]]

    # Other bytes over a manifest: it covers nothing any more.
    bkt.blob(M1).upload_from_string(b"{not json")
    r = bkt.audit()
    assert [(p.manifest, p.kind) for p in r.manifest_problems] == [(bkt.path(M1), "unreadable_manifest"), (bkt.path(M2), "changed")]
    assert [(g.start, g.end, g.migration_id) for g in r.gaps] == [
        ("2025-03-01T00:00:00.000000Z", "2025-03-01T23:00:00.000000Z", None)]
    assert [x.commands[0] for x in r.repairs] == [TRIGGER_M1, TRIGGER_M2]


def test_partial_rerun_supersedes_manifest_entries_without_failing(bkt):
    # Re-running part of a committed interval rewrites its files (new ingested_at, new MD5) under a
    # manifest of its own: the older manifest's entries are superseded, the data is still whole.
    rerun = {"start": "2025-03-01T23:00:00Z", "end": "2025-03-01T23:30:00Z"}
    assert run_dag("scan_updates", conf=rerun).state == "success"
    r = bkt.audit()
    assert r.ok, r.summary()
    rewritten = {f["object_name"] for f in bkt.manifest("_manifests/20250301T230000Z_20250301T233000Z.json")["files"]}
    assert {(p.manifest, p.object_name) for p in r.superseded} == {(bkt.path(M2), n) for n in rewritten}
    assert r.repairs == []


def test_deep_mode_reports_ids_the_scan_does_not_serve(bkt):
    # A migration-0 file copied into migration 1's partition under a valid name.
    src = _upd(0, "20250301T230000Z", "20250301T231500Z", 1)
    stray = _upd(1, "20250301T230000Z", "20250301T231500Z", 9)
    b = bkt.client.bucket(bkt.name)
    b.copy_blob(bkt.blob(src), b, bkt.path(stray))
    ids = set(bkt.ids(src))
    r = bkt.audit(mode="deep", migrations=[1])
    (deep,) = [d for d in r.deep if d.is_problem]
    assert (deep.migration_id, deep.missing_count, deep.unexpected_count) == (1, 0, len(ids))
    assert {u["update_id"] for u in deep.unexpected} == ids
    assert [o.object_name for o in r.orphans] == [bkt.path(stray)]
    assert [x.commands for x in r.repairs] == [[TRIGGER_M2]]


class _LedgerMissingOne(Ledger):
    """A Scan node that never serves one update (the loss a self-consistent bucket cannot show)."""

    def __init__(self, hidden: tuple[int, int]) -> None:
        super().__init__(TEST_LEDGER)
        self.hidden = hidden

    def page_positions(self, after: Any, limit: int, visible_until_us: int | None = None) -> list[tuple[int, int]]:
        positions = super().page_positions(after, limit + 1, visible_until_us)
        return [p for p in positions if p != self.hidden][:limit]


@pytest.fixture
def lossy_scan(ledger) -> Iterator[tuple[ScanSimulator, str, str]]:
    index = ledger.first_index_after(0, parse_us("2025-03-01T22:20:00Z"))
    lossy = ScanSimulator(_LedgerMissingOne((0, index)))
    lossy.start()
    try:
        yield lossy, ledger.update_id(0, index), ledger.record_time(0, index)
    finally:
        lossy.stop()


def test_deep_mode_catches_an_update_the_ingested_scan_never_served(ingest_env, monkeypatch, lossy_scan,
                                                                    gcs_client, bucket, sim):
    lossy, hidden_id, hidden_rt = lossy_scan
    monkeypatch.setenv("AIRFLOW_CONN_SCAN_API", json.dumps({"conn_type": "http", "host": lossy.base_url}))
    start, end = "2025-03-01T22:00:00Z", "2025-03-01T23:00:00Z"
    assert run_dag("scan_updates", conf={"start": start, "end": end}).state == "success"
    b = Bucket(gcs_client, bucket, ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"], sim.base_url)

    cheap = b.audit(start=start, end=end)
    assert cheap.ok, cheap.summary()  # files, manifest and events agree with each other

    deep = b.audit(mode="deep", start=start, end=end)  # against a Scan that serves everything
    assert _problems(deep) == {"deep": 1}
    (check,) = [d for d in deep.deep if d.is_problem]
    assert (check.migration_id, check.missing, check.unexpected_count) == (
        0, [{"update_id": hidden_id, "record_time": hidden_rt}], 0)
    assert [(x.start, x.end, x.migration_id, x.commands) for x in deep.repairs] == [
        (start, end, None, [f"""airflow dags trigger scan_updates -c '{{"start": "{start}", "end": "{end}"}}'"""])]


def test_ranged_reads_fetch_only_the_id_columns(bkt):
    # pyarrow reads the last 64 KiB first, so smaller objects cost one request; take the largest one.
    blob = max(blobs(bkt.client, bkt.name, bkt.prefix).values(), key=lambda b: b.size if b.name.endswith(".parquet") else 0)
    assert blob.size > 100_000
    content = read_object(ObjectInfo(blob.name, blob.size, blob.md5_hash, parse_object_name(blob.name), blob), block=4096)
    assert content.error is None and content.update_ids == bkt.ids(blob.name[len(bkt.prefix) + 1:])
    assert content.bytes_read < blob.size, (content.bytes_read, blob.size)  # the payload columns are skipped


# -- tools/bucket_summary.py --------------------------------------------------------------------------
def _summary_rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[1].startswith("2025-"):
            rows[(cols[0], cols[1])] = cols[2:]
    return rows


def test_bucket_summary_prints_counts_times_and_gaps(bkt, ledger, capsys):
    cmd = [sys.executable, str(REPO / "tools" / "bucket_summary.py"), "--bucket", bkt.name, "--prefix", bkt.prefix,
           "--from", "2025-03-01", "--to", "2025-03-02"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120, env=dict(os.environ)).stdout
    rows = _summary_rows(out)
    listing = [parse_object_name(n) for n in blobs(bkt.client, bkt.name, bkt.prefix)]
    for m in (0, 1):
        truth = expected_items(ledger, *map(parse_us, DAY), migration=m)
        times = sorted(parse_us(i["record_time"]) for i in truth)
        events_rows = sum(f["rows"] for mf in (M1, M2) for f in bkt.manifest(mf)["files"]
                 if f["migration_id"] == m and f["table"] == "events")
        files = sum(1 for p in listing if p is not None and p.migration_id == m)
        updates, events, n_files, first, last, gaps = rows[(str(m), "2025-03-01")]
        assert (int(updates), int(events), int(n_files), gaps) == (len(truth), events_rows, files, "none")
        assert (parse_us(first), parse_us(last)) == (times[0], times[-1])
    assert rows[("-", "2025-03-02")] == ["0", "0", "0", "-", "-", "00:00-24:00"]  # nothing ingested that day

    bkt.blob(M1).delete()
    from tools.bucket_summary import main

    assert main(["--bucket", bkt.name, "--prefix", bkt.prefix, "--from", "2025-03-01", "--to", "2025-03-01"]) == 0
    rows = _summary_rows(capsys.readouterr().out)
    assert rows[("0", "2025-03-01")][-1] == rows[("1", "2025-03-01")][-1] == "00:00-23:00"
