"""The local staging area: files wait here, each with a sidecar, until their upload is verified.

Layout mirrors the bucket: ``{staging_dir}/{object_name}`` plus ``{…}.meta.json``. The sidecar is
written atomically after the data file, so a sidecar always describes a complete file; anything
staged can be recovered after a crash (see the ``scan_upload_repair`` DAG).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

SIDECAR_SUFFIX = ".meta.json"
TEMP_MARKER = ".tmp-"

STATE_STAGED = "staged"
STATE_UPLOADED = "uploaded"


@dataclass
class StagedFile:
    """One Parquet file written for a cursor range, and everything needed to deliver it."""

    table: str
    bucket: str
    object_name: str
    local_path: str
    rows: int
    size: int
    md5_b64: str
    crc32c_b64: str
    migration_id: int
    date: str
    range_start_us: int
    range_end_us: int
    part: int
    updates: int
    first_record_time: str | None
    last_record_time: str | None
    schema_version: str
    state: str = STATE_STAGED
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.object_name}"

    @property
    def sidecar_path(self) -> str:
        return self.local_path + SIDECAR_SUFFIX

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagedFile:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (the latter makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write via a temp name, fsync, rename, fsync the directory: never a torn file under ``path``."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}{TEMP_MARKER}{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(directory)


def write_sidecar(staged: StagedFile) -> None:
    atomic_write_bytes(staged.sidecar_path, json.dumps(staged.to_dict(), sort_keys=True, indent=1).encode())


def read_sidecar(sidecar_path: str) -> StagedFile:
    with open(sidecar_path, encoding="utf-8") as fh:
        return StagedFile.from_dict(json.load(fh))


def iter_sidecars(staging_dir: str) -> Iterator[StagedFile]:
    """Every staged file with a sidecar (its data file may be missing; callers check)."""
    pattern = os.path.join(glob.escape(staging_dir), "**", "*" + SIDECAR_SUFFIX)
    for path in sorted(glob.iglob(pattern, recursive=True)):
        if TEMP_MARKER in os.path.basename(path):
            continue
        try:
            yield read_sidecar(path)
        except (OSError, ValueError, TypeError):
            continue


def remove_staged(staged: StagedFile) -> None:
    """Delete a verified file and then its sidecar (sidecar last: a crash leaves a recoverable pair)."""
    for path in (staged.local_path, staged.sidecar_path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class StagingUsage:
    bytes: int
    files: int
    temp_bytes: int


def staging_usage(staging_dir: str) -> StagingUsage:
    """Bytes and files staged but not yet verified (data files, including in-progress temp files)."""
    total = files = temp = 0
    if not os.path.isdir(staging_dir):
        return StagingUsage(0, 0, 0)
    for root, _dirs, names in os.walk(staging_dir):
        for name in names:
            if name.endswith(SIDECAR_SUFFIX):
                continue
            try:
                size = os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if TEMP_MARKER in name:
                temp += size
            else:
                files += 1
            total += size
    return StagingUsage(total, files, temp)


def remove_temp_files(directory: str, name_prefix: str) -> list[str]:
    """Delete leftovers (``*.tmp-*``) of an earlier, killed attempt whose names start with ``name_prefix``."""
    removed = []
    pattern = os.path.join(glob.escape(directory), glob.escape(name_prefix) + "*" + TEMP_MARKER + "*")
    for path in glob.glob(pattern):
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
