"""TLS on the production code path: the simulator serves HTTPS with a trustme certificate.

Verification is on by default; only the connection's ``ca_bundle`` or ``INSECURE_TLS=true``
(exactly) lets the client talk to a server whose CA is not in the default trust store.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from scan_ingest.config import ScanConnectionConfig
from scan_ingest.exceptions import ScanPermanentError, ScanTransientError
from scan_ingest.scan_client import ScanClient
from scan_ingest.tasks import scan_config

from tests.helpers import blobs, run_dag
from tools.scan_sim import Ledger, ScanSimulator

TLS_LOGGER = "scan_ingest.tls"


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(server cert+key PEM, CA PEM) of a throwaway CA that no trust store knows."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    server_pem, ca_pem = d / "server.pem", d / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    yield str(server_pem), str(ca_pem)


@pytest.fixture(scope="module")
def https_sim(ledger: Ledger, ca_file: tuple[str, str]) -> Iterator[ScanSimulator]:
    server_pem, _ = ca_file
    with ScanSimulator(ledger, tls=(server_pem, server_pem)) as s:
        assert s.base_url.startswith("https://127.0.0.1:")
        yield s


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither the switch nor a process-wide CA bundle may leak in from the outside.
    for name in ("INSECURE_TLS", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)


def client_for(url: str, ca_bundle: str | None = None) -> ScanClient:
    return ScanClient(ScanConnectionConfig(base_urls=(url,), ca_bundle=ca_bundle, timeout=5, in_call_retries=2))


def assert_refused(url: str) -> None:
    with client_for(url) as client:
        assert not client.is_healthy(url)
        with pytest.raises(ScanPermanentError, match="TLS") as err:
            client.updates_page(None, 3)
        # A certificate problem is not retried into success (nor retried at all).
        assert client.stats.requests == 1 and client.stats.retries == 0
    assert url in str(err.value) and "ca_bundle" in str(err.value)


def assert_served(client: ScanClient, url: str, ledger: Ledger) -> None:
    assert client.is_healthy(url)
    items = client.updates_page(None, 3)
    assert [i["update_id"] for i in items] == [ledger.update_id(0, i) for i in range(3)]
    assert [m.migration_id for m in client.discover_migrations()] == ledger.migration_ids()


def test_refused_by_default(https_sim: ScanSimulator) -> None:
    assert_refused(https_sim.base_url)


def test_environment_ca_bundle_is_not_used(
    https_sim: ScanSimulator, ca_file: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests would honour REQUESTS_CA_BUNDLE; the client takes CAs from the connection only.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file[1])
    assert_refused(https_sim.base_url)


def test_accepted_with_connection_extra_ca_bundle(
    https_sim: ScanSimulator, ca_file: tuple[str, str], ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Through Airflow's connection lookup, as the tasks do it.
    monkeypatch.setenv(
        "AIRFLOW_CONN_SCAN_TLS_TEST",
        json.dumps({"conn_type": "http", "host": https_sim.base_url, "extra": {"ca_bundle": ca_file[1], "timeout": 5}}),
    )
    config = scan_config("scan_tls_test")
    assert config.ca_bundle == ca_file[1]
    with ScanClient(config) as client:
        assert_served(client, https_sim.base_url, ledger)


def test_accepted_with_insecure_tls_exactly_true_and_warned(
    https_sim: ScanSimulator, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("INSECURE_TLS", "true")
    with caplog.at_level(logging.WARNING, logger=TLS_LOGGER):
        client = client_for(https_sim.base_url)
    warnings = [r for r in caplog.records if r.name == TLS_LOGGER and r.levelno >= logging.WARNING]
    assert warnings and "INSECURE_TLS" in warnings[0].getMessage()
    with client:
        assert_served(client, https_sim.base_url, ledger)


@pytest.mark.parametrize("value", ["TRUE", "True", "1", "yes", " true", ""])
def test_other_insecure_tls_spellings_do_not_disable_verification(
    https_sim: ScanSimulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv("INSECURE_TLS", value)
    with caplog.at_level(logging.WARNING, logger=TLS_LOGGER):
        assert_refused(https_sim.base_url)
    assert not [r for r in caplog.records if r.name == TLS_LOGGER]


def test_failover_health_probe_follows_the_same_rule(
    https_sim: ScanSimulator, simulator: ScanSimulator, ca_file: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain-HTTP primary that is not ready and the HTTPS Scan as fallback: failing over to it
    # needs a successful health probe, which needs a trusted certificate.
    primary, fallback = simulator.base_url, https_sim.base_url
    simulator.set_ready(False)
    try:
        for ca_bundle, insecure, healthy in [(None, None, False), (ca_file[1], None, True),
                                             (None, "true", True), (None, "TRUE", False)]:
            if insecure is None:
                monkeypatch.delenv("INSECURE_TLS", raising=False)
            else:
                monkeypatch.setenv("INSECURE_TLS", insecure)
            config = ScanConnectionConfig(base_urls=(primary, fallback), ca_bundle=ca_bundle, timeout=5, in_call_retries=1)
            with ScanClient(config) as client:
                assert client.is_healthy(fallback) is healthy, (ca_bundle, insecure)
                if healthy:
                    assert len(client.updates_page(None, 4)) == 4
                    assert client.stats.failovers == 1 and client.base_url == fallback
                else:
                    # Stays on the (unready) primary rather than talking to an untrusted server.
                    with pytest.raises(ScanTransientError) as err:
                        client.updates_page(None, 4)
                    assert client.stats.failovers == 0 and client.base_url == primary, err.value
    finally:
        simulator.set_ready(True)


@pytest.mark.usefixtures("airflow_db")
def test_dag_run_fails_against_untrusted_https_and_writes_nothing(
    https_sim: ScanSimulator,
    ingest_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    gcs_client: object,
    bucket: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_SCAN_API", json.dumps({"conn_type": "http", "host": https_sim.base_url, "extra": {"timeout": 5}})
    )
    https_sim.reset_stats()
    dr = run_dag("scan_updates", conf={"start": "2025-03-01T22:00:00Z", "end": "2025-03-01T23:00:00Z"})
    assert dr.state == "failed"
    states = {ti.task_id: (ti.state, ti.try_number) for ti in dr.get_task_instances()}
    # The first Scan call fails on the certificate, at once: a permanent error is not retried.
    assert states.pop("wait_for_scan") == ("failed", 1)
    assert {state for state, _ in states.values()} == {"upstream_failed"}
    out, err = capfd.readouterr()
    assert f"TLS verification failed for {https_sim.base_url}" in out + err
    prefix = ingest_env["AIRFLOW_VAR_SCAN_INGEST_PREFIX"]
    assert blobs(gcs_client, bucket, prefix) == {}
    staging = Path(ingest_env["AIRFLOW_VAR_SCAN_INGEST_STAGING_DIR"])
    assert not staging.exists() or not any(p.is_file() for p in staging.rglob("*"))
    # The run reached the HTTPS Scan but no request got past the handshake.
    assert https_sim.stats["requests"] == {}
