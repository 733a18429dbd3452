"""Committing an interval: final checks, removal of stale objects, and the manifest.

An interval counts as ingested only once its manifest exists. The manifest is written last, after
every file of every cell was verified, the cross-file checks passed and objects left in the
interval's range by earlier attempts (other part numbering, another range grid) were deleted, so
the bucket never holds two copies of an update.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from scan_ingest.exceptions import DataQualityError, VerificationError
from scan_ingest.quality import check_interval
from scan_ingest.ranges import Cell, manifest_name, parse_object_name, partition_prefixes
from scan_ingest.schema import SCHEMA_VERSION
from scan_ingest.timestamps import date_of_us, format_us

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def _interval_dates(start_us: int, end_us: int) -> list[str]:
    day = 86_400_000_000
    dates, t = [], start_us + 1
    while t <= end_us:
        dates.append(date_of_us(t))
        t = (t // day + 1) * day
    last = date_of_us(end_us)
    if last not in dates:
        dates.append(last)
    return dates


def commit_interval(
    hook: Any,
    *,
    bucket: str,
    prefix: str,
    start_us: int,
    end_us: int,
    migration_filter: int | None,
    migrations: list[int],
    results: list[dict[str, Any]],
    run_id: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check, clean up and write the manifest of ``(start, end]``; returns the manifest."""
    summaries = [r["quality"] for r in results if r.get("quality")]
    check_interval(summaries, results)
    files = [f for r in results for f in r["files"]]
    produced = {f["object_name"]: f for f in files}

    # Every object of the interval must be in the bucket with the recorded MD5 right now.
    client = hook.get_conn()
    dates = _interval_dates(start_us, end_us)
    in_bucket: dict[str, Any] = {}
    for mig in sorted(set(migrations) | {Cell.from_dict(r["cell"]).migration_id for r in results}):
        if migration_filter is not None and mig != migration_filter:
            continue
        for pfx in partition_prefixes(prefix, mig, dates):
            for blob in client.list_blobs(bucket, prefix=pfx):
                in_bucket[blob.name] = blob
    problems = []
    for name, f in produced.items():
        blob = in_bucket.get(name)
        if blob is None:
            problems.append(f"{name} is missing from gs://{bucket}")
        elif blob.md5_hash and blob.md5_hash != f["md5_b64"]:
            problems.append(f"{name}: md5 {blob.md5_hash} in the bucket, {f['md5_b64']} written")
    if problems:
        raise VerificationError("commit refused, objects changed after verification: " + "; ".join(problems))

    stale = []
    for name in in_bucket:
        parsed = parse_object_name(name)
        if parsed is None or name in produced:
            continue
        if parsed.start_us >= start_us and parsed.end_us <= end_us:
            stale.append(name)
        elif parsed.start_us < end_us and parsed.end_us > start_us:
            raise DataQualityError(
                f"gs://{bucket}/{name} covers a range that straddles this interval ({format_us(start_us)}, "
                f"{format_us(end_us)}]; re-run an interval aligned with it or delete it after checking"
            )
    for name in sorted(stale):
        log.warning("deleting gs://%s/%s: written by an earlier attempt for this interval, not by this one", bucket, name)
        hook.delete(bucket_name=bucket, object_name=name)

    cells = sorted(Cell.from_dict(r["cell"]) for r in results)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "schema_version": SCHEMA_VERSION,
        "interval": {"start": format_us(start_us), "end": format_us(end_us)},
        "migration_filter": migration_filter,
        "migrations": sorted(set(migrations)),
        "cells": [c.to_dict() for c in cells],
        "files": [
            {k: f[k] for k in ("table", "object_name", "rows", "size", "md5_b64", "crc32c_b64", "migration_id",
                               "date", "part", "updates", "first_record_time", "last_record_time")}
            for f in sorted(files, key=lambda f: f["object_name"])
        ],
        "totals": {
            "updates": sum(r["updates"] for r in results),
            "events": sum(r["events"] for r in results),
            "files": len(files),
            "bytes": sum(f["size"] for f in files),
            "fetch_seconds": round(sum(r.get("seconds", 0.0) for r in results), 3),
            "pages": sum(r.get("pages", 0) for r in results),
            "in_call_retries": sum(r.get("retries", 0) for r in results),
        },
        "removed_stale_objects": sorted(stale),
        "run_id": run_id,
        "committed_at": datetime.now(UTC).isoformat(),
        **(extra or {}),
    }
    name = manifest_name(prefix, start_us, end_us, migration_filter)
    hook.upload(
        bucket_name=bucket,
        object_name=name,
        data=json.dumps(manifest, indent=1, sort_keys=True),
        mime_type="application/json",
    )
    log.info(
        "committed (%s, %s]: %d updates, %d events, %d files, %d bytes; manifest gs://%s/%s",
        format_us(start_us), format_us(end_us), manifest["totals"]["updates"], manifest["totals"]["events"],
        len(files), manifest["totals"]["bytes"], bucket, name,
    )
    return manifest
