"""The Scan API client against the real simulator over HTTP: paging, cursors, faults, failover."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from scan_ingest.config import ScanConnectionConfig
from scan_ingest.exceptions import (
    ConfigError,
    ScanPermanentError,
    ScanRangeNotAvailableError,
    ScanTransientError,
)
from scan_ingest.scan_client import RETRY_AFTER_CAP_S, ScanClient, item_migration_id, item_record_time_us
from scan_ingest.timestamps import format_us, parse_us

from tests.helpers import expected_items
from tests.sim_support import ObservedSimulator, wait_until
from tools.scan_sim import FaultConfig, Ledger, LedgerConfig, ScanSimulator

UPDATES = "/v2/updates"
MIGRATION_INFO = "/v0/backfilling/migration-info"




def make_client(*urls: str, **kwargs: Any) -> ScanClient:
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("health_timeout", 2.0)
    kwargs.setdefault("in_call_retries", 3)
    return ScanClient(ScanConnectionConfig(base_urls=urls, **kwargs))


def ledger_ids(ledger: Ledger, migration: int | None = None) -> list[str]:
    """Every update id in (migration, record_time) order, straight from the generator."""
    mids = ledger.migration_ids() if migration is None else [migration]
    return [ledger.update_id(m, i) for m in mids for i in range(ledger.count(m))]


def whole_ledger_bounds(ledger: Ledger) -> tuple[int, int]:
    lo = min(ledger.first_record_time_us(m) for m in ledger.migration_ids()) - 1
    hi = max(ledger.last_record_time_us(m) for m in ledger.migration_ids())
    return lo, hi


def page_everything(client: ScanClient, page_size: int, on_page: Any = None) -> list[dict[str, Any]]:
    """Raw ``updates_page`` paging from no cursor until an empty page, as the contract describes."""
    out: list[dict[str, Any]] = []
    after: tuple[int, str] | None = None
    n = 0
    while True:
        items = client.updates_page(after, page_size)
        if not items:
            return out
        out.extend(items)
        last = items[-1]
        after = (item_migration_id(last), last["record_time"])
        n += 1
        if on_page is not None:
            on_page(n)


def read_whole_ledger(client: ScanClient, ledger: Ledger, page_size: int, on_page: Any = None) -> list[dict[str, Any]]:
    """``iter_range`` once per discovered migration over the whole ledger's time span."""
    lo, hi = whole_ledger_bounds(ledger)
    out: list[dict[str, Any]] = []
    n = 0
    for info in client.discover_migrations():
        for page in client.iter_range(info.migration_id, lo, hi, page_size=page_size):
            out.extend(page)
            n += 1
            if on_page is not None:
                on_page(n)
    return out


def settled(sim: ObservedSimulator) -> bool:
    """Every /v2/updates request that arrived has been answered (a slow one answers late)."""
    stats = sim.stats
    return stats["requests"].get(UPDATES, 0) == len(sim.update_bodies) == stats["pages"]


def assert_exact(items: list[dict[str, Any]], ledger: Ledger) -> None:
    ids = [it["update_id"] for it in items]
    assert len(ids) == len(set(ids)), "an update was delivered twice"
    assert ids == ledger_ids(ledger)
    keys = [(item_migration_id(it), item_record_time_us(it)) for it in items]
    assert keys == sorted(keys)


# ----------------------------------------------------------------------------------------------
# Exact paging


def test_iter_range_reads_each_migration_exactly_once_across_overlap(scan: ObservedSimulator, ledger: Ledger) -> None:
    # The fixture ledger really overlaps: migration 1 starts before migration 0 ends.
    assert ledger.first_record_time_us(1) < ledger.last_record_time_us(0)
    with make_client(scan.base_url) as client:
        items = read_whole_ledger(client, ledger, page_size=50)
    assert_exact(items, ledger)
    assert items == list(ledger.iter_items())  # whole items, not just ids


@pytest.mark.parametrize("page_size", [1, 64, 1000])
def test_raw_paging_from_no_cursor_matches_ledger(scan: ObservedSimulator, ledger: Ledger, page_size: int) -> None:
    with make_client(scan.base_url) as client:
        items = page_everything(client, page_size)
    assert_exact(items, ledger)
    keys = [(item_migration_id(it), item_record_time_us(it)) for it in items]
    boundary = next(k for k in range(1, len(keys)) if keys[k][0] != keys[k - 1][0])
    assert keys[boundary][1] < keys[boundary - 1][1], "record time goes back at the migration boundary"


# ----------------------------------------------------------------------------------------------
# Cursor strings and range boundaries


def test_cursor_differing_in_sixth_fractional_digit(scan: ObservedSimulator, ledger: Ledger) -> None:
    # An update of migration 1 inside the overlap whose last µs digit is not 0, so rt-1 µs only
    # changes the sixth fractional digit.
    k = next(
        i for i in range(1, ledger.count(1))
        if ledger.record_time_us(1, i) % 10 and ledger.record_time_us(1, i) < ledger.last_record_time_us(0)
    )
    rt = ledger.record_time_us(1, k)
    at, before = format_us(rt), format_us(rt - 1)
    assert at[:-2] == before[:-2] and at[-2] != before[-2] and at[-1] == "Z"
    with make_client(scan.base_url) as client:
        assert client.updates_page((1, before), 2)[0]["update_id"] == ledger.update_id(1, k)
        assert client.updates_page((1, at), 2)[0]["update_id"] == ledger.update_id(1, k + 1)
        # The same through iter_range's resume cursor: the update at rt is still ahead of rt-1 µs.
        pages = list(client.iter_range(1, rt - 1, rt + 1, after_record_time=before, page_size=5))
    assert [it["update_id"] for p in pages for it in p] == [ledger.update_id(1, k)]
    sent = [b["after"]["after_record_time"] for b in scan.update_bodies]
    assert sent[:2] == [before, at] and sent[2] == before


def test_iter_range_echoes_the_last_record_time_string_verbatim(scan: ObservedSimulator, ledger: Ledger) -> None:
    # The Scan prints the same instants with 9 fractional digits: a client that parsed and
    # re-formatted its cursor would send 6 and be caught by the request log.
    scan.record_time_style = "nanos"
    start, end = ledger.record_time_us(0, 10), ledger.record_time_us(0, 60)
    with make_client(scan.base_url) as client:
        pages = list(client.iter_range(0, start, end, page_size=7))
        first_run = scan.update_bodies
        resumed_from = ledger.record_time(0, 30)[:-1] + "000Z"
        resumed = list(client.iter_range(0, start, end, after_record_time=resumed_from, page_size=7))
        resume_bodies = scan.update_bodies[len(first_run):]
    assert [it["update_id"] for p in pages for it in p] == [ledger.update_id(0, i) for i in range(11, 61)]
    assert all(it["record_time"].endswith("000Z") and len(it["record_time"]) == 30 for p in pages for it in p)
    cursors = [b["after"]["after_record_time"] for b in first_run]
    assert cursors[0] == format_us(start)
    assert len(first_run) in (len(pages), len(pages) + 1)
    for i in range(1, len(first_run)):
        assert cursors[i] == pages[i - 1][-1]["record_time"], f"request {i} did not echo the last record_time"
    # A resume cursor is sent exactly as given too.
    assert resume_bodies[0]["after"] == {"after_migration_id": 0, "after_record_time": resumed_from}
    assert [it["update_id"] for p in resumed for it in p] == [ledger.update_id(0, i) for i in range(31, 61)]


@pytest.mark.parametrize("page_size", [1, 30, 1000])
def test_range_is_start_exclusive_end_inclusive(scan: ObservedSimulator, ledger: Ledger, page_size: int) -> None:
    # 30 = exactly the range's size: the update at `end` closes a full page.
    a, b = 40, 70
    start, end = ledger.record_time_us(0, a), ledger.record_time_us(0, b)
    with make_client(scan.base_url) as client:
        got = [it["update_id"] for p in client.iter_range(0, start, end, page_size=page_size) for it in p]
    assert got == [ledger.update_id(0, i) for i in range(a + 1, b + 1)]


def test_range_inside_overlap_splits_by_migration(scan: ObservedSimulator, ledger: Ledger) -> None:
    start = ledger.first_record_time_us(1) + 1
    end = ledger.last_record_time_us(0) - 1
    expected = expected_items(ledger, start, end)
    assert {item_migration_id(i) for i in expected} == {0, 1}
    with make_client(scan.base_url) as client:
        got = [it for m in (0, 1) for p in client.iter_range(m, start, end, page_size=9) for it in p]
    assert [i["update_id"] for i in got] == [i["update_id"] for i in expected]


# ----------------------------------------------------------------------------------------------
# Page size bounds


@pytest.mark.parametrize("size", [0, 1001, -5])
def test_config_rejects_page_size_out_of_bounds(size: int) -> None:
    with pytest.raises(ConfigError, match="page_size"):
        ScanConnectionConfig(base_urls=("http://127.0.0.1:1/api/scan",), page_size=size)


def test_config_accepts_page_size_bounds() -> None:
    for size in (1, 1000):
        assert ScanConnectionConfig(base_urls=("http://127.0.0.1:1/api/scan",), page_size=size).page_size == size


@pytest.mark.parametrize(("size", "server_says"), [(0, "Limit must be at least 1."), (1001, "Exceeded limit maximum (1001 > 1000).")])
def test_server_400_is_permanent_and_names_url_status_body(scan: ObservedSimulator, size: int, server_says: str) -> None:
    with make_client(scan.base_url) as client:
        with pytest.raises(ScanPermanentError) as err:
            client.updates_page(None, size)
        assert client.stats.requests == 1 and client.stats.retries == 0  # never retried
    msg = str(err.value)
    assert f"{scan.base_url}/v2/updates" in msg
    assert "HTTP 400" in msg
    assert server_says in msg


# ----------------------------------------------------------------------------------------------
# Faults


TRANSIENT = ["429", "500", "503", "reset", "truncated"]


@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_fault_mid_paging_is_retried_and_data_stays_exact(
    scan: ObservedSimulator, ledger: Ledger, kind: str
) -> None:
    faults = FaultConfig(rate=1.0, kinds=(kind,), retry_after_seconds=1)

    def arm(n_pages: int) -> None:
        if n_pages == 3:  # in the middle of migration 0, not on the first request
            scan.inject(faults, count=1)

    with make_client(scan.base_url) as client:
        items = read_whole_ledger(client, ledger, page_size=50, on_page=arm)
        assert client.stats.retries == 1
    assert scan.stats["faults"] == {kind: 1}
    assert_exact(items, ledger)


def test_429_retry_after_is_honoured_with_a_real_wait(scan: ObservedSimulator, ledger: Ledger) -> None:
    scan.inject(FaultConfig(rate=1.0, kinds=("429",), retry_after_seconds=1), count=1)
    with make_client(scan.base_url) as client:
        t0 = time.monotonic()
        items = client.updates_page(None, 5)
        waited = time.monotonic() - t0
        assert client.stats.retries == 1
    assert scan.stats["faults"] == {"429": 1}
    assert [i["update_id"] for i in items] == ledger_ids(ledger)[:5]
    # Not a speed check: the lower bound proves the client waited the server's Retry-After.
    assert waited >= 0.9


def test_429_with_retry_after_beyond_cap_is_left_to_task_retry(scan: ObservedSimulator) -> None:
    too_long = int(RETRY_AFTER_CAP_S) + 30
    scan.inject(FaultConfig(rate=1.0, kinds=("429",), retry_after_seconds=too_long), count=1)
    with make_client(scan.base_url) as client:
        with pytest.raises(ScanTransientError, match="Retry-After") as err:
            client.updates_page(None, 5)
        assert client.stats.requests == 1  # no in-call wait of `too_long` seconds
    assert f"{scan.base_url}/v2/updates" in str(err.value)


def test_slow_page_halves_page_size_then_succeeds(scan: ObservedSimulator, ledger: Ledger) -> None:
    scan.inject(FaultConfig(rate=1.0, kinds=("slow",), slow_seconds=1.2), count=1)
    with make_client(scan.base_url, timeout=0.3) as client:
        first = client.updates_page(None, 40)
        assert client.stats.retries == 1
        # The slow request is handled (and logged) after its sleep; wait so it cannot leak.
        wait_until(lambda: len(scan.update_bodies) == 2, what="the slow request to finish")
        assert sorted(b["page_size"] for b in scan.update_bodies) == [20, 40]
        assert [i["update_id"] for i in first] == ledger_ids(ledger)[:20]

        # Inside iter_range: the halved page is followed by full-size pages again, data exact.
        scan.restore()
        scan.inject(FaultConfig(rate=1.0, kinds=("slow",), slow_seconds=1.2), count=1)
        lo, hi = whole_ledger_bounds(ledger)
        pages = list(client.iter_range(0, lo, hi, page_size=40))
        wait_until(lambda: settled(scan), what="the slow request to finish")
        assert scan.stats["faults"] == {"slow": 1}
        assert [b["page_size"] for b in scan.update_bodies].count(20) == 1
    assert [len(p) for p in pages[:3]] == [20, 40, 40]
    assert [i["update_id"] for p in pages for i in p] == ledger_ids(ledger, 0)


def test_404_on_update_by_id_is_permanent_and_names_url(scan: ObservedSimulator) -> None:
    missing = "1220" + "0" * 64
    with make_client(scan.base_url) as client:
        with pytest.raises(ScanPermanentError) as err:
            client.request_json("GET", f"/v2/updates/{missing}")
        assert client.stats.requests == 1
    msg = str(err.value)
    assert f"{scan.base_url}/v2/updates/{missing}" in msg and "HTTP 404" in msg and "not found" in msg


def test_persistent_non_json_body_is_permanent_and_names_url(scan: ObservedSimulator, ledger: Ledger) -> None:
    scan.corrupt(ledger.update_id(0, 3), "non_json")
    with make_client(scan.base_url, in_call_retries=1) as client:
        with pytest.raises(ScanPermanentError) as err:
            list(client.iter_range(0, ledger.first_record_time_us(0) - 1, ledger.record_time_us(0, 9), page_size=10))
        assert client.stats.requests == 2  # retried once (could have been a glitch), then given up
    msg = str(err.value)
    assert f"{scan.base_url}/v2/updates" in msg and "JSON" in msg
    assert scan.stats["corruptions"] == {"non_json": 2}


# ----------------------------------------------------------------------------------------------
# Failover


@pytest.fixture
def three_scans(ledger: Ledger) -> Iterator[tuple[ScanSimulator, ScanSimulator, ScanSimulator]]:
    """Two configured Scans on the same ledger and a third that no client is configured with."""
    sims = [ScanSimulator(ledger) for _ in range(3)]
    for s in sims:
        s.start()
    try:
        yield sims[0], sims[1], sims[2]
    finally:
        for s in sims:
            s.stop()


def test_failover_when_first_scan_stops_mid_paging(three_scans: Any, ledger: Ledger) -> None:
    first, second, stranger = three_scans

    def stop_first(n_pages: int) -> None:
        if n_pages == 4:
            first.stop()

    with make_client(first.base_url, second.base_url) as client:
        items = page_everything(client, 60, on_page=stop_first)
        assert client.stats.failovers == 1
        assert client.base_url == second.base_url
    assert_exact(items, ledger)
    assert second.stats["pages"] > 0
    assert stranger.stats["requests"] == {}


def test_failover_when_first_scan_is_not_ready(three_scans: Any, ledger: Ledger) -> None:
    first, second, stranger = three_scans
    first.set_ready(False)
    with make_client(first.base_url, second.base_url) as client:
        assert not client.is_healthy(first.base_url)
        assert client.is_healthy(second.base_url)
        items = read_whole_ledger(client, ledger, page_size=100)
        assert client.stats.failovers == 1
    assert_exact(items, ledger)
    assert first.stats["pages"] == 0
    assert stranger.stats["requests"] == {}


def test_no_healthy_scan_raises_transient_without_leaving_configured_urls(three_scans: Any) -> None:
    first, second, stranger = three_scans
    urls = (first.base_url, second.base_url)
    first.stop()
    second.set_ready(False)
    with make_client(*urls, in_call_retries=1) as client:
        with pytest.raises(ScanTransientError, match="after 2 attempts"):
            client.updates_page(None, 10)
        assert client.stats.failovers == 0
    assert stranger.stats["requests"] == {}


# ----------------------------------------------------------------------------------------------
# Availability and migration discovery


def test_range_not_available_when_end_is_hidden(scan: ObservedSimulator, ledger: Ledger) -> None:
    visible = ledger.record_time_us(1, 100)
    start, end = ledger.record_time_us(1, 50), ledger.record_time_us(1, 150)
    scan.set_visible_until(visible)
    got: list[str] = []
    with make_client(scan.base_url) as client:
        assert client.range_available(1, visible)
        assert not client.range_available(1, end)
        with pytest.raises(ScanRangeNotAvailableError, match="migration 1"):
            for page in client.iter_range(1, start, end, page_size=20):
                got.extend(i["update_id"] for i in page)
        # Everything that was visible was delivered once, nothing beyond the live edge.
        assert got == [ledger.update_id(1, i) for i in range(51, 101)]

        scan.set_visible_until(None)
        assert client.range_available(1, end)
        rest = [i["update_id"] for p in client.iter_range(1, start, end, after_record_time=ledger.record_time(1, 100)) for i in p]
    assert rest == [ledger.update_id(1, i) for i in range(101, 151)]


def test_range_available_for_a_closed_migration(scan: ObservedSimulator, ledger: Ledger) -> None:
    beyond = ledger.last_record_time_us(0) + 3_600_000_000
    with make_client(scan.base_url) as client:
        # Migration 1 exists, so migration 0 can gain nothing more: its range is complete.
        assert client.range_available(0, beyond)
        # While the Scan is still inside migration 0, migration 1 is not visible: not available.
        scan.set_visible_until(ledger.record_time_us(0, 200))
        assert not client.range_available(0, ledger.record_time_us(0, 250))
        assert not client.range_available(1, ledger.record_time_us(1, 1))


def test_discover_migrations_stops_at_first_404(scan: ObservedSimulator, ledger: Ledger) -> None:
    with make_client(scan.base_url) as client:
        found = client.discover_migrations()
        assert [m.migration_id for m in found] == [0, 1]
        assert scan.stats["requests"][MIGRATION_INFO] == 3  # 0, 1, then the 404 for 2
        for m in found:
            assert (m.min_us, m.max_us) == (ledger.first_record_time_us(m.migration_id), ledger.last_record_time_us(m.migration_id))
        assert found[1].previous_migration_id == 0

        scan.reset_stats()
        scan.set_visible_until(ledger.record_time_us(0, 100))
        hidden = client.discover_migrations()
        assert [(m.migration_id, m.max_us) for m in hidden] == [(0, ledger.record_time_us(0, 100))]
        assert scan.stats["requests"][MIGRATION_INFO] == 2


def test_discover_migrations_does_not_look_past_a_gap() -> None:
    # Migration 1 has no data (404); migration 2 does, but discovery must stop at the first 404.
    gap = Ledger(LedgerConfig(seed=5, updates_per_migration=(5, 0, 5), overlap_us=0))
    with ScanSimulator(gap) as s, make_client(s.base_url) as client:
        assert [m.migration_id for m in client.discover_migrations()] == [0]
        assert s.stats["requests"][MIGRATION_INFO] == 2


def test_record_time_helpers_agree_with_ledger(ledger: Ledger) -> None:
    # Guards the ground truth used above: format_us is the Scan's 6-digit form of the ledger's times.
    for m, i in [(0, 0), (0, 359), (1, 0), (1, 299)]:
        assert format_us(ledger.record_time_us(m, i)) == ledger.record_time(m, i)
        assert parse_us(ledger.record_time(m, i)) == ledger.record_time_us(m, i)
