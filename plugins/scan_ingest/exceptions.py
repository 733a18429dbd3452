"""Exceptions of the package, split by what Airflow should do with them.

``ScanTransientError`` and subclasses are retried (Airflow task retries with exponential backoff);
``ScanIngestPermanentError`` and subclasses fail the task at once (see ``retry.py``).
"""

from __future__ import annotations


class ScanIngestError(Exception):
    """Base class of every error raised by this package."""


class ScanIngestTransientError(ScanIngestError):
    """A condition that may pass by itself: retrying later is the right response."""


class ScanIngestPermanentError(ScanIngestError):
    """A condition that will not pass by retrying: an operator must act."""


class ScanTransientError(ScanIngestTransientError):
    """The Scan API was unreachable, slow, rate-limited or not ready."""


class ScanRangeNotAvailableError(ScanIngestTransientError):
    """The Scan does not yet hold the whole requested record-time range (live edge or lagging node)."""


class ScanPermanentError(ScanIngestPermanentError):
    """The Scan API rejected the request (4xx) or answered with a body that cannot be decoded."""


class ConfigError(ScanIngestPermanentError):
    """Configuration (connection, Variable, Param) is missing or invalid."""


class DecodeError(ScanIngestPermanentError):
    """An update item cannot be flattened: unknown shape, missing field or bad value."""


class StagingError(ScanIngestPermanentError):
    """A staged file or its sidecar is missing or inconsistent."""


class UploadError(ScanIngestTransientError):
    """A transient failure while uploading to GCS."""


class DestinationError(ScanIngestPermanentError):
    """The GCS destination is unusable (bucket missing, access denied)."""


class VerificationError(ScanIngestPermanentError):
    """An object in GCS does not match the file that was written (or is missing)."""


class DataQualityError(ScanIngestPermanentError):
    """The files of an interval fail a data-quality check; the interval is not committed."""
