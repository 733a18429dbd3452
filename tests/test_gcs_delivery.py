"""Verified delivery: upload with GCSHook, MD5 verification in a follow-on task, staging, repair."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from scan_ingest.config import IngestSettings, ScanConnectionConfig
from scan_ingest.delivery import upload_cell, verify_cell
from scan_ingest.exceptions import DestinationError, StagingError, VerificationError
from scan_ingest.gcs import get_hook
from scan_ingest.ingest import ingest_cell
from scan_ingest.ranges import Cell
from scan_ingest.scan_client import ScanClient
from scan_ingest.staging import iter_sidecars, staging_usage
from scan_ingest.timestamps import parse_us

from tests.helpers import blobs, clear_and_resume, read_table, run_dag, run_dag_marking, task_states

CONF = {"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T23:00:00Z"}


def _stage_cell(sim, staging_dir, bucket, prefix="raw") -> dict:
    settings = IngestSettings(bucket=bucket, prefix=prefix, staging_dir=str(staging_dir), rows_per_part=10)
    cell = Cell(0, parse_us("2025-03-01T22:00:00Z"), parse_us("2025-03-01T22:15:00Z"))
    with ScanClient(ScanConnectionConfig(base_urls=(sim.base_url,))) as client:
        return ingest_cell(client, cell, settings, ingested_at_us=0).to_xcom()


def _md5_b64(path: str) -> str:
    with open(path, "rb") as fh:
        return base64.b64encode(hashlib.md5(fh.read()).digest()).decode()


def test_upload_and_verify_release_the_staged_files(gcs_emulator, sim, bucket, gcs_client, tmp_path):
    result = _stage_cell(sim, tmp_path, bucket, prefix="t/deliver-ok")
    written = {f["object_name"]: _md5_b64(f["local_path"]) for f in result["files"]}
    assert written and all(f["md5_b64"] == written[f["object_name"]] for f in result["files"])
    hook = get_hook("google_cloud_default")
    verified = verify_cell(hook, upload_cell(hook, result))
    assert sorted(verified["verified"]) == sorted(f"gs://{bucket}/{n}" for n in written)
    in_bucket = blobs(gcs_client, bucket, "t/deliver-ok")
    # The values compared are base64 MD5 of the exact bytes written.
    assert {n: in_bucket[n].md5_hash for n in written} == written
    assert staging_usage(str(tmp_path)).files == 0
    assert not list(iter_sidecars(str(tmp_path)))


def test_replaced_object_fails_verify_deletes_it_and_keeps_the_local_file(gcs_emulator, sim, bucket, gcs_client, tmp_path):
    result = _stage_cell(sim, tmp_path, bucket, prefix="t/deliver-bad")
    hook = get_hook("google_cloud_default")
    upload_cell(hook, result)
    victim = result["files"][0]
    hook.upload(bucket_name=bucket, object_name=victim["object_name"], data=b"not the parquet file")
    with pytest.raises(VerificationError) as err:
        verify_cell(hook, result)
    bad_md5 = base64.b64encode(hashlib.md5(b"not the parquet file").digest()).decode()
    assert victim["md5_b64"] in str(err.value) and bad_md5 in str(err.value)
    assert not hook.exists(bucket_name=bucket, object_name=victim["object_name"])
    assert os.path.isfile(victim["local_path"])
    # The retry path (upload again, verify again) is verified exactly like the first one.
    verify_cell(hook, upload_cell(hook, result))
    assert not os.path.exists(victim["local_path"])


def test_missing_bucket_fails_clearly(gcs_emulator, sim, tmp_path):
    result = _stage_cell(sim, tmp_path, "no-such-bucket-here")
    with pytest.raises(DestinationError, match="no-such-bucket-here"):
        upload_cell(get_hook("google_cloud_default"), result)
    assert staging_usage(str(tmp_path)).files == len(result["files"])


def test_missing_staged_file_tells_the_operator_what_to_clear(gcs_emulator, sim, bucket, tmp_path):
    result = _stage_cell(sim, tmp_path, bucket, prefix="t/deliver-missing")
    os.remove(result["files"][0]["local_path"])
    with pytest.raises(StagingError, match="Clear the fetch_write task"):
        upload_cell(get_hook("google_cloud_default"), result)


@pytest.mark.usefixtures("airflow_db")
def test_clearing_failed_verify_and_upload_tasks_recovers(ingest_env, ledger, gcs_client, bucket):
    """Verify catches an object replaced after upload; clearing upload (with downstream) repairs it."""
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    staging = ingest_env["AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR"]
    dr = run_dag_marking("scan_updates", conf=CONF, mark_success=r"cell\.verify|commit")
    assert dr.state == "success"
    names = sorted(n for n in blobs(gcs_client, bucket, prefix) if n.endswith(".parquet"))
    assert names and staging_usage(staging).files == len(names)
    victim = gcs_client.bucket(bucket).blob(names[0])
    victim.upload_from_string(b"corrupted in the bucket")

    dr = clear_and_resume("scan_updates", dr.run_id, ["cell.verify", "commit"])
    assert dr.state == "failed"
    states = task_states("scan_updates", dr.run_id)
    assert "failed" in {s for (t, _), s in states.items() if t == "cell.verify"}
    assert states[("commit", -1)] in ("upstream_failed", "failed")
    assert names[0] not in blobs(gcs_client, bucket, prefix)  # the bad object was deleted
    assert staging_usage(staging).files > 0  # local copies kept for the retry
    assert not [n for n in blobs(gcs_client, bucket, prefix) if "_manifests" in n]

    dr = clear_and_resume("scan_updates", dr.run_id, ["cell.upload", "cell.verify", "commit"])
    assert dr.state == "success"
    assert staging_usage(staging).files == 0
    assert [n for n in blobs(gcs_client, bucket, prefix) if "_manifests" in n]
    ids = read_table(gcs_client, bucket, prefix, "updates").column("update_id").to_pylist()
    assert len(ids) == len(set(ids)) > 0

    # Clearing verify alone afterwards only re-checks the objects and succeeds.
    dr = clear_and_resume("scan_updates", dr.run_id, ["cell.verify", "commit"])
    assert dr.state == "success"


@pytest.mark.usefixtures("airflow_db")
def test_repair_dag_delivers_files_left_by_a_killed_run(ingest_env, sim, gcs_client, bucket):
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    staging = ingest_env["AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR"]
    result = _stage_cell(sim, staging, bucket, prefix=prefix)  # as if the worker died after writing
    assert staging_usage(staging).files == len(result["files"]) > 0
    dr = run_dag("scan_upload_repair", conf={"min_age_minutes": 0})
    assert dr.state == "success"
    assert staging_usage(staging).files == 0
    in_bucket = blobs(gcs_client, bucket, prefix)
    for f in result["files"]:
        assert in_bucket[f["object_name"]].md5_hash == f["md5_b64"]
