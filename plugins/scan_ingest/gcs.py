"""Delivery to GCS through the Google provider's ``GCSHook``: upload, verify, list, delete.

Verification compares what GCS reports for the object with the hashes recorded while the file was
written (not recomputed from a local file that may have changed since): MD5 (base64) and size, or
CRC32C where GCS has no MD5 (composite objects).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from scan_ingest.exceptions import DestinationError, StagingError, UploadError, VerificationError
from scan_ingest.staging import STATE_UPLOADED, StagedFile, write_sidecar

log = logging.getLogger(__name__)


def _is_permanent(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    return code in (400, 401, 403, 404)


def get_hook(gcp_conn_id: str) -> Any:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    return GCSHook(gcp_conn_id=gcp_conn_id)


def upload_staged(hook: Any, staged: StagedFile, *, num_max_attempts: int = 3) -> None:
    """Upload one staged file (idempotent overwrite of the same object name)."""
    if not os.path.isfile(staged.local_path) or not os.path.exists(staged.sidecar_path):
        raise StagingError(
            f"staged file {staged.local_path} (for {staged.uri}) is missing: it was written on another worker's "
            f"disk or removed. Clear the fetch_write task of cell migration {staged.migration_id} "
            f"range {staged.range_start_us}..{staged.range_end_us} (it regenerates the identical file), "
            "or put the staging directory on storage shared by all workers."
        )
    size = os.path.getsize(staged.local_path)
    if size != staged.size:
        raise StagingError(
            f"staged file {staged.local_path} is {size} bytes but {staged.size} were written: it changed after "
            "writing. Clear the fetch_write task of its cell to regenerate it."
        )
    try:
        hook.upload(
            bucket_name=staged.bucket,
            object_name=staged.object_name,
            filename=staged.local_path,
            mime_type="application/vnd.apache.parquet",
            num_max_attempts=num_max_attempts,
        )
    except Exception as exc:  # classified below, never swallowed
        if _is_permanent(exc):
            raise DestinationError(f"upload of {staged.local_path} to {staged.uri} was refused: {exc}") from exc
        raise UploadError(f"upload of {staged.local_path} to {staged.uri} failed: {exc}") from exc
    staged.state = STATE_UPLOADED
    write_sidecar(staged)


@dataclass(frozen=True)
class ObjectCheck:
    uri: str
    ok: bool
    method: str
    expected: str
    actual: str | None
    expected_size: int
    actual_size: int | None

    def describe(self) -> str:
        return (
            f"{self.uri}: {self.method} expected {self.expected} got {self.actual}; "
            f"size expected {self.expected_size} got {self.actual_size}"
        )


def check_object(hook: Any, staged: StagedFile) -> ObjectCheck:
    """What GCS reports for the object against what was written (one metadata request)."""
    try:
        blob = hook.get_conn().bucket(staged.bucket).get_blob(staged.object_name)
    except Exception as exc:  # classified below
        if _is_permanent(exc):
            raise DestinationError(f"cannot read metadata of {staged.uri}: {exc}") from exc
        raise UploadError(f"cannot read metadata of {staged.uri}: {exc}") from exc
    if blob is None:
        return ObjectCheck(staged.uri, False, "md5", staged.md5_b64, None, staged.size, None)
    if blob.md5_hash:
        ok = blob.md5_hash == staged.md5_b64 and blob.size == staged.size
        return ObjectCheck(staged.uri, ok, "md5", staged.md5_b64, blob.md5_hash, staged.size, blob.size)
    log.warning("%s has no MD5 in GCS (composite object?): verifying by CRC32C instead", staged.uri)
    ok = blob.crc32c == staged.crc32c_b64 and blob.size == staged.size
    return ObjectCheck(staged.uri, ok, "crc32c", staged.crc32c_b64, blob.crc32c, staged.size, blob.size)


def verify_staged(hook: Any, staged: StagedFile) -> ObjectCheck:
    """Verify an uploaded object; on mismatch delete the object (keep the local file) and raise."""
    check = check_object(hook, staged)
    if check.ok:
        return check
    if check.actual is not None:
        try:
            hook.delete(bucket_name=staged.bucket, object_name=staged.object_name)
            deleted = "the bad object was deleted"
        except Exception as exc:  # noqa: BLE001 - reported in the error below
            deleted = f"deleting the bad object FAILED ({exc})"
    else:
        deleted = "the object does not exist"
    raise VerificationError(
        f"verification failed for {check.describe()}; {deleted}; the local file {staged.local_path} is kept. "
        "Clear the upload task of this range (with downstream) to upload it again."
    )


def list_objects(hook: Any, bucket: str, prefix: str) -> list[str]:
    return list(hook.list(bucket_name=bucket, prefix=prefix) or [])


def bucket_exists(hook: Any, bucket: str) -> bool:
    try:
        return hook.get_conn().bucket(bucket).exists()
    except Exception as exc:  # classified
        if _is_permanent(exc):
            raise DestinationError(f"cannot access bucket {bucket!r}: {exc}") from exc
        raise UploadError(f"cannot check bucket {bucket!r}: {exc}") from exc


def require_bucket(hook: Any, bucket: str) -> None:
    if not bucket_exists(hook, bucket):
        raise DestinationError(
            f"GCS bucket {bucket!r} (Variable scan_ingest_bucket) does not exist or is not visible to the "
            "connection; create it or fix the Variable"
        )
