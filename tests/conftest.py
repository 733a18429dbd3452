"""Session fixtures: an isolated AIRFLOW_HOME, one GCS emulator and one Scan simulator per session.

Airflow reads its configuration when first imported, so the environment is set up here, at import
time of the conftest, before any test module imports Airflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
PLUGINS = REPO / "plugins"

_HOME = tempfile.mkdtemp(prefix="scan-ingest-airflow-home-")
os.environ.update(
    {
        "AIRFLOW_HOME": _HOME,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": os.path.join(_HOME, "logs"),
        "AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES_REGEXP": ".*",
        # google-auth must never probe a metadata server from a test
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "SCAN_INGEST_SCHEDULE": "@hourly",
        "SCAN_INGEST_START_DATE": "2025-03-01T00:00:00+00:00",
        "SCAN_INGEST_RETRY_DELAY_SECONDS": "1",
        "SCAN_INGEST_RETRIES": "3",
    }
)
os.environ.pop("INSECURE_TLS", None)
for p in (str(REPO), str(PLUGINS), str(DAGS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from tests.sim_support import ObservedSimulator  # noqa: E402
from tools.gcs_emulator import GcsEmulator  # noqa: E402
from tools.scan_sim import Ledger, LedgerConfig  # noqa: E402
from tools.scan_sim.server import ScanSimulator  # noqa: E402

# The default test ledger: two migrations whose record times overlap, crossing midnight.
TEST_LEDGER = LedgerConfig(
    seed=11,
    start="2025-03-01T21:00:00Z",
    updates_per_migration=(360, 300),
    mean_gap_us=25_000_000,
    overlap_us=40 * 60 * 1_000_000,
    reassignment_ratio=0.06,
)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """An initialised metadata DB (SQLite in the session's AIRFLOW_HOME)."""
    from airflow.utils.db import initdb

    initdb()


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """fake-gcs-server from its PyPI wheel; the Google connection is anonymous against it."""
    server = GcsEmulator()
    os.environ["STORAGE_EMULATOR_HOST"] = server.start()
    os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "test-project"}}
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_client(gcs_emulator: GcsEmulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test-project", credentials=AnonymousCredentials())


@pytest.fixture(scope="session")
def bucket(gcs_client) -> str:
    name = "scan-ingest-test"
    if gcs_client.lookup_bucket(name) is None:
        gcs_client.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return Ledger(TEST_LEDGER)


@pytest.fixture(scope="session")
def simulator(ledger: Ledger) -> Iterator[ScanSimulator]:
    sim = ScanSimulator(ledger)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def sim(simulator: ScanSimulator) -> Iterator[ScanSimulator]:
    """The shared simulator, restored to a clean state after the test."""
    yield simulator
    simulator.set_faults(None)
    simulator.set_visible_until(None)
    simulator.set_ready(True)
    simulator.clear_corruptions()


def _slug(nodeid: str) -> str:
    """A short, unique, readable prefix per test (parametrized cases must not share one)."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", nodeid.split("::", 1)[-1]).strip("-")[:48]
    return f"{readable}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"


@pytest.fixture
def ingest_env(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    sim: ScanSimulator,
    bucket: str,
) -> dict[str, str]:
    """Connections and Variables for one test: its own bucket prefix and staging directory."""
    env = {
        "AIRFLOW_CONN_SCAN_API": json.dumps({"conn_type": "http", "host": sim.base_url, "extra": {"timeout": 10}}),
        "AIRFLOW_VAR_SCAN_INGEST_BUCKET": bucket,
        "AIRFLOW_VAR_SCAN_INGEST_PREFIX": f"t/{_slug(request.node.nodeid)}",
        "AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR": str(tmp_path / "staging"),
        "AIRFLOW_VAR_SCAN_INGEST_ROWS_PER_PART": "20",
        "AIRFLOW_VAR_SCAN_INGEST_ROW_GROUP_ROWS": "50",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="module")
def observed(ledger: Ledger) -> Iterator[ObservedSimulator]:
    """A simulator of the module's ledger that records requests and limits injected faults."""
    with ObservedSimulator(ledger) as s:
        yield s


@pytest.fixture
def scan(observed: ObservedSimulator) -> Iterator[ObservedSimulator]:
    """The module's simulator with a clean request log, restored after the test."""
    observed.restore()
    yield observed
    observed.restore()
