"""Verified retries: an upload retried after a failure, or re-run by clearing, is MD5-verified, and a
mismatch on the retry path fails exactly like on the first path.

GCS faults are injected into GCSHook.upload (the emulator cannot be made to fail one request);
everything else is the real DAG, Airflow's retry loop and fake-gcs-server.
"""

from __future__ import annotations

import os

import pytest
from google.api_core.exceptions import ServiceUnavailable

from tests.helpers import blobs, clear_and_resume, run_dag, task_states

CONF = {"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T22:30:00Z", "migration_id": 0}


@pytest.fixture
def flaky_upload(monkeypatch):
    """The first upload of each cell fails transiently; ``mode["corrupt_retry"]`` corrupts retried uploads."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    real_upload = GCSHook.upload
    seen: set[str] = set()
    mode = {"corrupt_retry": False, "calls": 0}

    def upload(self, bucket_name, object_name, filename=None, data=None, **kwargs):
        mode["calls"] += 1
        cell = os.path.basename(object_name).rsplit("_p", 1)[0]  # the first upload of each cell fails
        if object_name.endswith(".parquet") and cell not in seen:
            seen.add(cell)
            raise ServiceUnavailable("injected: backend unavailable")
        if object_name.endswith(".parquet") and mode["corrupt_retry"]:
            with open(filename, "rb") as fh:
                data, filename = fh.read() + b"garbage", None
        return real_upload(self, bucket_name, object_name, filename=filename, data=data, **kwargs)

    monkeypatch.setattr(GCSHook, "upload", upload)
    return mode


def _manifest_names(gcs_client, bucket, prefix) -> list[str]:
    return [n for n in blobs(gcs_client, bucket, prefix) if "_manifests" in n]


@pytest.mark.usefixtures("airflow_db")
def test_retried_upload_is_verified(ingest_env, flaky_upload, gcs_client, bucket):
    dr = run_dag("scan_updates", conf=CONF)
    assert dr.state == "success"
    states = task_states("scan_updates", dr.run_id)
    assert all(s == "success" for (t, _), s in states.items() if t in ("cell.upload", "cell.verify"))
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    session = settings.Session()
    uploads = session.query(TaskInstance).filter(TaskInstance.run_id == dr.run_id, TaskInstance.task_id == "cell.upload").all()
    assert uploads and all(ti.try_number == 2 for ti in uploads), "each upload failed once and was retried"
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    import json

    manifest = json.loads(gcs_client.bucket(bucket).blob(_manifest_names(gcs_client, bucket, prefix)[0]).download_as_bytes())
    in_bucket = blobs(gcs_client, bucket, prefix)
    assert manifest["files"] and all(in_bucket[f["object_name"]].md5_hash == f["md5_b64"] for f in manifest["files"])


@pytest.mark.usefixtures("airflow_db")
def test_mismatch_on_the_retry_path_fails_like_the_first_path(ingest_env, flaky_upload, gcs_client, bucket):
    flaky_upload["corrupt_retry"] = True
    dr = run_dag("scan_updates", conf=CONF)
    assert dr.state == "failed"
    states = task_states("scan_updates", dr.run_id)
    assert {s for (t, _), s in states.items() if t == "cell.verify"} == {"failed"}
    assert states[("commit", -1)] == "upstream_failed"
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    assert not [n for n in blobs(gcs_client, bucket, prefix) if n.endswith(".parquet")], "bad objects deleted"
    assert not _manifest_names(gcs_client, bucket, prefix)

    # Re-run by clearing, with a healthy upload path: verified and committed.
    flaky_upload["corrupt_retry"] = False
    dr = clear_and_resume("scan_updates", dr.run_id, ["cell.upload", "cell.verify", "commit"])
    assert dr.state == "success"
    assert _manifest_names(gcs_client, bucket, prefix)
