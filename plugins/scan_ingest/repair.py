"""Recovery of staged files that were never verified (the ``scan_upload_repair`` DAG).

Unlike the original pipeline's retry script, a repaired file is always verified (MD5 against the
hash recorded when it was written) before its local copy is released.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from scan_ingest.gcs import upload_staged, verify_staged
from scan_ingest.staging import StagedFile, iter_sidecars, read_sidecar, remove_staged

log = logging.getLogger(__name__)


def find_unverified(staging_dir: str, *, min_age_s: float = 0.0, limit: int = 500) -> list[str]:
    """Sidecar paths of staged files older than ``min_age_s`` (younger ones may belong to a live run)."""
    now = time.time()
    found = []
    for staged in iter_sidecars(staging_dir):
        try:
            age = now - os.path.getmtime(staged.sidecar_path)
        except FileNotFoundError:
            continue
        if age >= min_age_s:
            found.append(staged.sidecar_path)
        if len(found) >= limit:
            break
    return found


def repair_one(hook: Any, sidecar_path: str, *, num_max_attempts: int = 3) -> dict[str, Any]:
    """Upload (idempotent) and verify one staged file; release it only once verified."""
    staged: StagedFile = read_sidecar(sidecar_path)
    upload_staged(hook, staged, num_max_attempts=num_max_attempts)
    check = verify_staged(hook, staged)
    remove_staged(staged)
    log.info("repaired %s (%d rows, %d bytes, %s verified)", staged.uri, staged.rows, staged.size, check.method)
    return {"uri": staged.uri, "rows": staged.rows, "size": staged.size, "method": check.method}


def summarise(listed: list[str], repaired: list[dict[str, Any]]) -> dict[str, Any]:
    done = {r["uri"] for r in repaired}
    still_staged = [p for p in listed if os.path.exists(p)]
    return {
        "listed": len(listed),
        "repaired": sorted(done),
        "still_failing": still_staged,
        "bytes": sum(r["size"] for r in repaired),
    }
