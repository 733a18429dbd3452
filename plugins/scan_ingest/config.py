"""Validated configuration: the Scan connection and the ``scan_ingest_*`` Airflow Variables.

Everything here is a frozen dataclass built from plain values, so it is testable without Airflow;
``from_connection`` / ``from_variables`` adapt Airflow's objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scan_ingest.exceptions import ConfigError

DEFAULT_SCAN_CONN_ID = "scan_api"
DEFAULT_GCP_CONN_ID = "google_cloud_default"
MAX_PAGE_SIZE = 1000
GIB = 1024**3

VariableGetter = Callable[[str, Any], Any]


def _normalise_base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"Scan base URL {url!r} must start with http:// or https://")
    return url


@dataclass(frozen=True)
class ScanConnectionConfig:
    """Where and how to reach the Scan API.

    ``base_urls[0]`` is the connection's ``host``; the rest come from the extra ``fallback_urls``.
    Only these URLs are ever contacted.
    """

    base_urls: tuple[str, ...]
    ca_bundle: str | None = None
    timeout: float = 60.0
    health_timeout: float = 5.0
    in_call_retries: int = 4
    page_size: int = MAX_PAGE_SIZE

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ConfigError("the Scan connection needs a host (the full base URL, e.g. https://scan.example/api/scan)")
        object.__setattr__(self, "base_urls", tuple(dict.fromkeys(_normalise_base_url(u) for u in self.base_urls)))
        if self.timeout <= 0 or self.health_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ConfigError(f"page_size must be within 1..{MAX_PAGE_SIZE}, got {self.page_size}")
        if self.in_call_retries < 0:
            raise ConfigError("in_call_retries must be >= 0")

    @classmethod
    def from_connection(cls, conn: Any) -> ScanConnectionConfig:
        """Build from an Airflow ``Connection`` (conn_type ``http``; ``host`` = full base URL)."""
        host = (conn.host or "").strip()
        if not host:
            raise ConfigError(f"connection {conn.conn_id!r} has no host; set it to the Scan base URL")
        if "://" not in host:
            scheme = conn.schema or "https"
            port = f":{conn.port}" if conn.port else ""
            host = f"{scheme}://{host}{port}"
        extra: Mapping[str, Any] = conn.extra_dejson or {}
        fallbacks = extra.get("fallback_urls") or []
        if isinstance(fallbacks, str):
            fallbacks = [u for u in fallbacks.replace(",", " ").split() if u]
        if not isinstance(fallbacks, list | tuple):
            raise ConfigError(f"connection {conn.conn_id!r}: extra fallback_urls must be a list of URLs")
        kwargs: dict[str, Any] = {}
        for key, conv in (("timeout", float), ("health_timeout", float), ("in_call_retries", int), ("page_size", int)):
            if extra.get(key) is not None:
                try:
                    kwargs[key] = conv(extra[key])
                except (TypeError, ValueError):
                    raise ConfigError(f"connection {conn.conn_id!r}: extra {key}={extra[key]!r} is not a number") from None
        return cls(base_urls=(host, *fallbacks), ca_bundle=extra.get("ca_bundle") or None, **kwargs)


def _default_staging_dir() -> str:
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return os.path.join(home, "scan_ingest_staging")


@dataclass(frozen=True)
class IngestSettings:
    """Settings of an ingestion run, normally from the ``scan_ingest_*`` Airflow Variables."""

    bucket: str
    prefix: str = "raw"
    staging_dir: str = field(default_factory=_default_staging_dir)
    staging_budget_bytes: int = 2 * GIB
    range_minutes: int = 15
    rows_per_part: int = 50_000
    row_group_rows: int = 20_000
    scan_conn_id: str = DEFAULT_SCAN_CONN_ID
    gcp_conn_id: str = DEFAULT_GCP_CONN_ID
    daml_value_encoding: str = "compact_json"
    upload_attempts: int = 3

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket or self.bucket.startswith("gs:"):
            raise ConfigError(
                f"Variable scan_ingest_bucket must be a bare bucket name (no gs://, no path), got {self.bucket!r}"
            )
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        if self.range_minutes <= 0 or 1440 % self.range_minutes:
            raise ConfigError(f"scan_ingest_range_minutes must divide a day (1440), got {self.range_minutes}")
        if self.rows_per_part < 1 or self.row_group_rows < 1:
            raise ConfigError("scan_ingest_rows_per_part and scan_ingest_row_group_rows must be >= 1")
        if self.staging_budget_bytes < 1:
            raise ConfigError("scan_ingest_staging_budget_bytes must be positive")
        if self.daml_value_encoding not in ("compact_json", "protobuf_json"):
            raise ConfigError("scan_ingest_daml_value_encoding must be compact_json or protobuf_json")

    @property
    def range_us(self) -> int:
        return self.range_minutes * 60 * 1_000_000

    @classmethod
    def from_variables(cls, get: VariableGetter) -> IngestSettings:
        """Read every ``scan_ingest_*`` Variable through ``get(name, default)`` (e.g. ``Variable.get``)."""
        bucket = get("scan_ingest_bucket", None)
        if not bucket:
            raise ConfigError(
                "Airflow Variable scan_ingest_bucket is not set: set it to the destination GCS bucket name "
                "(e.g. `airflow variables set scan_ingest_bucket my-bucket`)"
            )
        kwargs: dict[str, Any] = {"bucket": str(bucket).strip()}
        ints = {
            "staging_budget_bytes": "scan_ingest_staging_budget_bytes",
            "range_minutes": "scan_ingest_range_minutes",
            "rows_per_part": "scan_ingest_rows_per_part",
            "row_group_rows": "scan_ingest_row_group_rows",
            "upload_attempts": "scan_ingest_upload_attempts",
        }
        strs = {
            "prefix": "scan_ingest_prefix",
            "staging_dir": "scan_ingest_staging_dir",
            "scan_conn_id": "scan_ingest_scan_conn_id",
            "gcp_conn_id": "scan_ingest_gcp_conn_id",
            "daml_value_encoding": "scan_ingest_daml_value_encoding",
        }
        for attr, name in ints.items():
            value = get(name, None)
            if value not in (None, ""):
                try:
                    kwargs[attr] = int(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"Variable {name}={value!r} is not an integer") from None
        for attr, name in strs.items():
            value = get(name, None)
            if value not in (None, ""):
                kwargs[attr] = str(value)
        return cls(**kwargs)
