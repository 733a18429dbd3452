"""Upload and verification of a cell's staged files (the DAG's ``upload`` and ``verify`` tasks)."""

from __future__ import annotations

import logging
import os
from typing import Any

from scan_ingest.exceptions import StagingError, VerificationError
from scan_ingest.gcs import check_object, upload_staged, verify_staged
from scan_ingest.quality import check_cell_files
from scan_ingest.ranges import Cell
from scan_ingest.staging import StagedFile, read_sidecar, remove_staged

log = logging.getLogger(__name__)


def staged_files_of(result: dict[str, Any]) -> list[StagedFile]:
    """The cell's files as the sidecars on disk describe them (falling back to the XCom copy)."""
    files = []
    for data in result.get("files", []):
        staged = StagedFile.from_dict(data)
        try:
            staged = read_sidecar(staged.sidecar_path)
        except FileNotFoundError:
            pass
        files.append(staged)
    return files


def upload_cell(hook: Any, result: dict[str, Any], *, num_max_attempts: int = 3) -> dict[str, Any]:
    """Upload every file of a cell; an already verified object (same MD5 and size) is not re-sent."""
    cell = Cell.from_dict(result["cell"])
    files = staged_files_of(result)
    sent = skipped = 0
    for staged in files:
        try:
            upload_staged(hook, staged, num_max_attempts=num_max_attempts)
            sent += 1
        except StagingError:
            # The local copy is gone; if the bucket already holds exactly these bytes the file was
            # verified and cleaned up by an earlier attempt: nothing to redo.
            if check_object(hook, staged).ok:
                skipped += 1
                continue
            raise
    log.info("%s: uploaded %d file(s) (%d already in place), %d bytes", cell, sent, skipped, sum(f.size for f in files))
    return result


def verify_cell(hook: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Check data quality on the local files, verify every object, then release the local files."""
    cell = Cell.from_dict(result["cell"])
    files = staged_files_of(result)
    present = [f for f in files if _exists(f)]
    if len(present) == len(files):
        summary = check_cell_files(cell, files)
    elif present:
        raise StagingError(
            f"{cell}: {len(files) - len(present)} of {len(files)} staged files are missing locally; clear the "
            "fetch_write task of this cell to regenerate them"
        )
    else:
        # Re-check of a cell verified before (its local copies are released): objects only.
        log.info("%s: local copies already released; re-checking the objects against the recorded hashes", cell)
        summary = summary_from_metadata(cell, files)
    checks, failures = [], []
    for f in files:  # check every object, so every bad one is deleted, before failing
        try:
            checks.append(verify_staged(hook, f))
        except VerificationError as exc:
            failures.append(str(exc))
    if failures:
        raise VerificationError(f"{cell}: {len(failures)} of {len(files)} object(s) failed verification: " + " | ".join(failures))
    for f in files:
        remove_staged(f)
    log.info("%s: %d object(s) verified (%s), local copies released", cell, len(checks),
             ", ".join(sorted({c.method for c in checks})) or "none")
    return {**result, "quality": summary, "verified": [c.uri for c in checks]}


def _exists(f: StagedFile) -> bool:
    return os.path.isfile(f.local_path)


def summary_from_metadata(cell: Cell, files: list[StagedFile]) -> dict[str, Any]:
    parts = {
        str(f.part): {"updates": f.updates, "first": f.first_record_time, "last": f.last_record_time, "events": None}
        for f in files
        if f.table == "updates"
    }
    return {"cell": cell.to_dict(), "parts": parts, "updates": sum(p["updates"] for p in parts.values())}
