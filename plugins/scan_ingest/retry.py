"""Airflow retry policy: permanent errors fail at once, everything else backs off exponentially."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

from scan_ingest.exceptions import ScanIngestPermanentError, ScanIngestTransientError

RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(
            exception=ScanIngestPermanentError,
            action=RetryAction.FAIL,
            reason="permanent error (bad request, auth, bad data, missing bucket, verification): retrying cannot fix it",
        ),
        RetryRule(exception=ScanIngestTransientError, action=RetryAction.DEFAULT),
    ]
)


def io_task_defaults(
    *,
    retries: int = 6,
    retry_delay: timedelta = timedelta(seconds=30),
    max_retry_delay: timedelta = timedelta(minutes=30),
) -> dict[str, Any]:
    """Arguments for every task that does I/O: exponential backoff (x2) capped, and the policy above."""
    return {
        "retries": retries,
        "retry_delay": retry_delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": max_retry_delay,
        "retry_policy": RETRY_POLICY,
    }
