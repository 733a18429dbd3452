"""Backoff never busy-waits: in-call waits sleep in the kernel, cancel ends them, and anything longer
is Airflow's task retry with exponential backoff and the package's retry policy."""

from __future__ import annotations

import threading
import time

import pytest
from airflow.sdk import RetryAction
from scan_ingest.config import ScanConnectionConfig
from scan_ingest.exceptions import (
    ConfigError,
    DecodeError,
    ScanPermanentError,
    ScanRangeNotAvailableError,
    ScanTransientError,
)
from scan_ingest.retry import RETRY_POLICY
from scan_ingest.scan_client import IngestCancelledError, ScanClient

from tests.helpers import load_dag
from tests.sim_support import ObservedSimulator, wait_until
from tools.scan_sim import FaultConfig, Ledger


def make_client(url: str) -> ScanClient:
    return ScanClient(ScanConnectionConfig(base_urls=(url,), timeout=5, in_call_retries=2))


def test_retry_wait_takes_wall_time_but_no_cpu(scan: ObservedSimulator, ledger: Ledger) -> None:
    scan.inject(FaultConfig(rate=1.0, kinds=("429",), retry_after_seconds=2), count=1)
    with make_client(scan.base_url) as client:
        wall0, cpu0 = time.monotonic(), time.process_time()
        items = client.updates_page(None, 5)
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        assert client.stats.retries == 1
    assert scan.stats["faults"] == {"429": 1}
    assert [i["update_id"] for i in items] == [ledger.update_id(0, i) for i in range(5)]
    assert wall >= 1.9, "the client did not wait out Retry-After"
    # Process CPU (client, and the in-process simulator too) stays far below wall time: a
    # spinning wait would burn close to 100 % of one core.
    assert cpu < 0.25 * wall, f"{cpu:.2f}s CPU during a {wall:.2f}s call"


def test_cancel_from_another_thread_ends_the_wait(scan: ObservedSimulator) -> None:
    retry_after = 20  # below the in-call cap, so the client really starts waiting
    scan.inject(FaultConfig(rate=1.0, kinds=("429",), retry_after_seconds=retry_after), count=1)
    client = make_client(scan.base_url)

    def cancel_once_waiting() -> None:
        # stats.retries is bumped just before the client backs off.
        wait_until(lambda: client.stats.retries >= 1, what="the client to start backing off")
        client.cancel()

    canceller = threading.Thread(target=cancel_once_waiting, daemon=True)
    t0 = time.monotonic()
    canceller.start()
    with pytest.raises(IngestCancelledError):
        client.updates_page(None, 5)
    elapsed = time.monotonic() - t0
    canceller.join(timeout=10)
    # Generous bound: it only has to end well before the server's Retry-After.
    assert elapsed < retry_after / 2
    assert scan.stats["requests"]["/v2/updates"] == 1
    # A cancelled client stays cancelled: no further request leaves it.
    with pytest.raises(IngestCancelledError):
        client.updates_page(None, 5)
    assert scan.stats["requests"]["/v2/updates"] == 1


def test_dag_io_tasks_retry_with_exponential_backoff_and_the_policy() -> None:
    dag = load_dag("scan_updates")
    # The tasks that talk to the Scan or to GCS.
    io_tasks = {"wait_for_scan", "plan", "cell.fetch_write", "cell.upload", "cell.verify", "commit"}
    assert io_tasks <= set(dag.task_ids)
    for task in (dag.get_task(t) for t in sorted(io_tasks)):
        assert task.retries > 0, task.task_id
        assert task.retry_exponential_backoff >= 2, task.task_id
        assert task.max_retry_delay is not None and task.max_retry_delay.total_seconds() > 0, task.task_id
        assert task.retry_policy is RETRY_POLICY, task.task_id


@pytest.mark.parametrize(
    ("exc", "action"),
    [
        (ScanPermanentError("HTTP 400 from POST http://127.0.0.1:1/api/scan/v2/updates"), RetryAction.FAIL),
        (DecodeError("update 'x': field record_time is missing"), RetryAction.FAIL),
        (ConfigError("Variable scan_ingest_bucket is not set"), RetryAction.FAIL),
        (ScanTransientError("Scan API still failing after 5 attempts"), RetryAction.DEFAULT),
        (ScanRangeNotAvailableError("not yet"), RetryAction.DEFAULT),
    ],
)
def test_retry_policy_fails_permanent_errors_and_backs_off_transient_ones(exc: Exception, action: RetryAction) -> None:
    decision = RETRY_POLICY.evaluate(exc, try_number=1, max_tries=4, context=None)
    assert decision.action is action
    # DEFAULT keeps the task's own exponential retry_delay; no rule overrides it.
    assert decision.retry_delay is None
