"""Tests of the Scan API simulator, over real HTTP(S) with ``requests`` where it matters."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import trustme

from tools.scan_sim.ledger import (
    Ledger,
    LedgerConfig,
    format_date_time,
    format_instant,
    format_record_time,
    parse_time_us,
)
from tools.scan_sim.server import BACKFILLING_ERROR, FaultConfig, ScanSimulator

REPO = Path(__file__).resolve().parents[2]
RECORD_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
INSTANT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3}|\.\d{6}|\.\d{6}000)?Z$")
# Small but realistic: two migrations whose record times overlap by ~100 s (about 50 items).
SMALL = LedgerConfig(seed=11, updates_per_migration=(260, 240), overlap_us=100_000_000)


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger(SMALL)


@pytest.fixture(scope="module")
def sim(ledger: Ledger) -> Iterator[ScanSimulator]:
    with ScanSimulator(ledger) as s:
        yield s


@pytest.fixture()
def fresh_sim() -> Iterator[ScanSimulator]:
    """A simulator of its own, for tests that change runtime controls."""
    with ScanSimulator(Ledger(SMALL)) as s:
        yield s


def item_migration(item: dict[str, Any]) -> int:
    return item["migration_id"] if "migration_id" in item else item["event"]["migration_id"]


def post_page(
    session: requests.Session, base: str, page_size: int, after: tuple[int, str] | None = None
) -> Any:
    body: dict[str, Any] = {"page_size": page_size, "daml_value_encoding": "compact_json"}
    if after is not None:
        body["after"] = {"after_migration_id": after[0], "after_record_time": after[1]}
    return session.post(f"{base}/v2/updates", json=body, timeout=30)


def page_all(base: str, page_size: int) -> list[dict[str, Any]]:
    session = requests.Session()
    out: list[dict[str, Any]] = []
    after: tuple[int, str] | None = None
    while True:
        resp = post_page(session, base, page_size, after)
        assert resp.status_code == 200, resp.text
        items = resp.json()["transactions"]
        out.extend(items)
        if not items:
            return out
        assert len(items) <= page_size
        last = items[-1]
        after = (item_migration(last), last["record_time"])


def preorder(item: dict[str, Any]) -> list[str]:
    """Walk the item JSON itself: roots, then child_event_ids, depth first."""
    events = item["events_by_id"]
    out: list[str] = []
    stack = list(reversed(item["root_event_ids"]))
    while stack:
        eid = stack.pop()
        out.append(eid)
        stack.extend(reversed(events[eid].get("child_event_ids", [])))
    return out


# --------------------------------------------------------------------------------------------------
# Paging and cursor rule


def test_paging_visits_every_item_once_in_order_across_overlapping_migrations(
    ledger: Ledger, sim: ScanSimulator
) -> None:
    # The boundary really overlaps: migration 1 starts before migration 0 ends.
    assert ledger.first_record_time_us(1) < ledger.last_record_time_us(0)
    items = page_all(sim.base_url, 37)
    expected = [ledger.update_id(m, i) for m in ledger.migration_ids() for i in range(ledger.count(m))]
    assert [it["update_id"] for it in items] == expected
    keys = [(item_migration(it), parse_time_us(it["record_time"])) for it in items]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    # Record times go back at the boundary; only the pair order is monotonic.
    boundary = next(k for k in range(1, len(keys)) if keys[k][0] != keys[k - 1][0])
    assert keys[boundary][1] < keys[boundary - 1][1]
    for it in items:
        assert RECORD_TIME_RE.match(it["record_time"]), it["record_time"]
        if "event" in it:
            assert "migration_id" not in it and it["offset"] == "000000000000000001"
        else:
            assert isinstance(it["migration_id"], int)


def test_cursor_rule_matches_brute_force(ledger: Ledger) -> None:
    everything = [
        (m, ledger.record_time_us(m, i), i) for m in ledger.migration_ids() for i in range(ledger.count(m))
    ]
    for m, i in [(0, 0), (0, 259), (1, 0), (1, 120), (1, 239)]:
        t = ledger.record_time_us(m, i)
        for probe in (t - 1, t, t + 1):
            expect = [(mm, ii) for mm, tt, ii in everything if (mm == m and tt > probe) or mm > m][:50]
            assert ledger.page_positions((m, format_record_time(probe)), 50) == expect
    assert ledger.page_positions((5, "2020-01-01T00:00:00Z"), 10) == []
    assert ledger.page_positions((-1, "2999-01-01T00:00:00Z"), 2) == [(0, 0), (0, 1)]


def test_cursor_with_fewer_fractional_digits(ledger: Ledger, sim: ScanSimulator) -> None:
    session = requests.Session()
    us = ledger.record_time_us(0, 100)
    full = format_record_time(us)
    for digits in (0, 1, 3, 5):
        head, frac = full[:-1].split(".")
        text = f"{head}.{frac[:digits]}Z" if digits else f"{head}Z"
        cut_us = parse_time_us(text)
        resp = post_page(session, sim.base_url, 5, (0, text))
        assert resp.status_code == 200, resp.text
        got = [it["update_id"] for it in resp.json()["transactions"]]
        first = ledger.first_index_after(0, cut_us)
        assert got == [ledger.update_id(0, i) for i in range(first, first + 5)]
    # Nanosecond digits are fine when they are zeros (Daml is µs).
    resp = post_page(session, sim.base_url, 1, (0, full[:-1] + "000Z"))
    assert resp.json()["transactions"][0]["update_id"] == ledger.update_id(0, 101)


def test_page_size_and_request_errors(sim: ScanSimulator) -> None:
    session = requests.Session()
    url = f"{sim.base_url}/v2/updates"
    resp = session.post(url, json={"page_size": 0})
    assert resp.status_code == 400 and resp.json() == {"error": "Limit must be at least 1."}
    resp = session.post(url, json={"page_size": 1001})
    assert resp.status_code == 400 and resp.json() == {"error": "Exceeded limit maximum (1001 > 1000)."}
    assert session.post(url, json={"page_size": 1000}).status_code == 200
    assert session.post(url, json={}).status_code == 400
    assert (
        session.post(url, data=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    )
    resp = post_page(session, sim.base_url, 10, (0, "2025-13-01T00:00:00Z"))
    assert resp.status_code == 400 and resp.json()["error"].startswith("Invalid timestamp: ")
    resp = post_page(session, sim.base_url, 10, (0, "yesterday"))
    assert resp.status_code == 400 and resp.json()["error"].startswith("Invalid timestamp: ")
    resp = session.get(url)
    assert resp.status_code == 405 and "error" in resp.json()
    resp = session.get(f"{sim.base_url}/v0/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()


# --------------------------------------------------------------------------------------------------
# Item content


def test_events_sorted_and_preorder(ledger: Ledger, sim: ScanSimulator) -> None:
    resp = post_page(requests.Session(), sim.base_url, 300)
    items = resp.json()["transactions"]
    n_tx = 0
    for it in items:
        if "events_by_id" not in it:
            continue
        n_tx += 1
        keys = list(it["events_by_id"])
        assert keys == sorted(keys)  # string order: ":10" before ":2"
        expected = ledger.expected_event_ids(it)
        assert preorder(it) == expected
        assert expected == [f"{it['update_id']}:{n}" for n in range(len(expected))]
        assert set(keys) == set(expected)
        for eid, ev in it["events_by_id"].items():
            assert ev["event_id"] == eid
            if ev["event_type"] == "created_event":
                assert "child_event_ids" not in ev
                assert ev["signatories"] == sorted(ev["signatories"])
                assert ev["observers"] == sorted(ev["observers"])
                assert re.fullmatch(r"00[0-9a-f]{64}ca1012[0-9a-f]{66}", ev["contract_id"])
            else:
                assert ev["event_type"] == "exercised_event"
                assert "interface_id" in ev and isinstance(ev["consuming"], bool)
    assert n_tx > 250


def test_item_shapes_and_variety(ledger: Ledger) -> None:
    sizes: list[int] = []
    eff_shapes: set[int] = set()
    result_types: set[str] = set()
    workflow_ids: set[str] = set()
    unassign: dict[str, dict[str, Any]] = {}
    pairs = 0
    future_fields = 0
    raw_text = b""
    for m in ledger.migration_ids():
        for i in range(ledger.count(m)):
            raw = ledger.item_json(m, i)
            it = orjson.loads(raw)
            raw_text += raw if i < 50 else b""
            assert RECORD_TIME_RE.match(it["record_time"])
            if "event" in it:
                ev = it["event"]
                assert ev["migration_id"] == m and set(it) == {"update_id", "offset", "record_time", "event"}
                if "created_event" in ev:
                    first = unassign[ev["unassign_id"]]
                    assert first["contract_id"] == ev["created_event"]["contract_id"]
                    assert first["reassignment_counter"] == ev["reassignment_counter"]
                    assert list(ev) == [
                        "submitter",
                        "source_synchronizer",
                        "target_synchronizer",
                        "migration_id",
                        "unassign_id",
                        "created_event",
                        "reassignment_counter",
                    ]
                    pairs += 1
                else:
                    unassign[ev["unassign_id"]] = ev
                continue
            assert list(it)[:8] == [
                "update_id",
                "migration_id",
                "workflow_id",
                "record_time",
                "synchronizer_id",
                "effective_at",
                "root_event_ids",
                "events_by_id",
            ]
            assert re.fullmatch(r"1220[0-9a-f]{64}", it["update_id"])
            assert it["synchronizer_id"].startswith("global-domain::1220")
            future_fields += "future_field" in it
            workflow_ids.add(it["workflow_id"])
            sizes.append(len(it["events_by_id"]))
            eff = it["effective_at"]
            assert INSTANT_RE.match(eff), eff
            assert parse_time_us(eff) <= parse_time_us(it["record_time"])
            frac = eff[20:-1] if "." in eff else ""
            eff_shapes.add(len(frac))
            for ev in it["events_by_id"].values():
                if ev["event_type"] == "exercised_event":
                    result_types.add(type(ev["exercise_result"]).__name__)
                else:
                    assert parse_time_us(ev["created_at"]) == parse_time_us(eff)
                    assert not re.search(r"\.\d*0Z$", ev["created_at"])  # trailing zeros dropped
    assert pairs > 5
    assert 12 <= sum(sizes) / len(sizes) <= 18
    assert min(sizes) == 1 and max(sizes) >= 40
    assert eff_shapes >= {0, 3, 6, 9}
    assert result_types >= {"dict", "str", "NoneType", "list"}
    assert "" in workflow_ids and len(workflow_ids) > 1
    assert future_fields > 0
    assert "Zürich ✓ 東京".encode() in raw_text and b"null" in raw_text


def test_determinism_and_seed_sensitivity() -> None:
    cfg = LedgerConfig(seed=3, updates_per_migration=(200, 100))
    a, b = Ledger(cfg), Ledger(cfg, cache_bytes=0)
    positions = [(0, 0), (0, 57), (0, 199), (1, 0), (1, 99)]
    for m, i in positions:
        assert a.item_json(m, i) == b.item_json(m, i)
    assert list(a.iter_items())[120] == b.item(0, 120)
    other = Ledger(LedgerConfig(seed=4, updates_per_migration=(200, 100)))
    assert other.item_json(0, 57) != a.item_json(0, 57)


def test_update_ids_decode_and_times_distinct(ledger: Ledger) -> None:
    seen: set[int] = set()
    for m in ledger.migration_ids():
        prev = -1
        for i in range(ledger.count(m)):
            t = ledger.record_time_us(m, i)
            assert t > prev and t not in seen
            seen.add(t)
            prev = t
            assert ledger.locate(ledger.update_id(m, i)) == (m, i)
    assert ledger.locate("1220" + "0" * 64) is None
    assert ledger.locate("nope") is None


def test_time_helpers() -> None:
    us = parse_time_us("2025-03-01T00:00:07.5Z")
    assert format_record_time(us) == "2025-03-01T00:00:07.500000Z"
    assert format_date_time(us) == "2025-03-01T00:00:07.5Z"
    assert format_instant(us) == "2025-03-01T00:00:07.500Z"
    assert format_instant(us, nanos=True) == "2025-03-01T00:00:07.500000000Z"
    assert format_date_time(parse_time_us("2025-03-01T00:00:00Z")) == "2025-03-01T00:00:00Z"
    assert parse_time_us("1970-01-01T00:00:00.000001Z") == 1
    assert parse_time_us("2025-03-01T00:00:07.123456000Z") == parse_time_us("2025-03-01T00:00:07.123456Z")
    for bad in ("2025-03-01T00:00:07.1234567Z", "2025-03-01 00:00:07Z", "2025-02-30T00:00:00Z", "x"):
        with pytest.raises(ValueError):
            parse_time_us(bad)


def test_large_payload_items() -> None:
    lg = Ledger(LedgerConfig(updates_per_migration=(30,), large_payload_every=10, reassignment_ratio=0.0))
    sizes = [len(lg.item_json(0, i)) for i in range(30)]
    big = [i for i, n in enumerate(sizes) if n > 3_000_000]
    assert big == [9, 19, 29]
    assert max(n for i, n in enumerate(sizes) if i not in big) < 200_000
    item = lg.item(0, 19)
    assert lg.expected_event_ids(item) == preorder(item)


# --------------------------------------------------------------------------------------------------
# Other endpoints


def test_update_by_id_migration_info_and_discovery(ledger: Ledger, sim: ScanSimulator) -> None:
    session = requests.Session()
    base = sim.base_url
    uid = ledger.update_id(1, 7)
    resp = session.get(f"{base}/v2/updates/{uid}", params={"daml_value_encoding": "compact_json"})
    assert resp.status_code == 200 and resp.content == ledger.item_json(1, 7)
    missing = "1220" + "ab" * 32
    resp = session.get(f"{base}/v2/updates/{missing}")
    assert resp.status_code == 404 and resp.json() == {"error": f"Transaction with id {missing} not found"}

    info0 = session.post(f"{base}/v0/backfilling/migration-info", json={"migration_id": 0}).json()
    assert info0["previous_migration_id"] is None and info0["complete"] is True
    assert info0["import_updates_complete"] is True and "last_import_update_id" in info0
    (rng0,) = info0["record_time_range"]
    assert rng0["synchronizer_id"] == ledger.synchronizer_id
    assert parse_time_us(rng0["min"]) == ledger.record_time_us(0, 0)
    assert parse_time_us(rng0["max"]) == ledger.last_record_time_us(0)
    info1 = session.post(f"{base}/v0/backfilling/migration-info", json={"migration_id": 1}).json()
    assert info1["previous_migration_id"] == 0
    resp = session.post(f"{base}/v0/backfilling/migration-info", json={"migration_id": 9})
    assert resp.status_code == 404 and resp.json() == {"error": "No data for migration 9"}

    assert session.get(f"{base}/readyz").status_code == 200
    assert session.get(f"{base}/livez").status_code == 200
    assert set(session.get(f"{base}/version").json()) == {"version", "commit_ts"}
    assert session.get(f"{base}/status").json()["success"]["active"] is True
    scans = session.get(f"{base}/v0/scans").json()["scans"]
    assert scans[0]["domainId"] == ledger.synchronizer_id and scans[0]["scans"][0]["publicUrl"] == sim.origin
    assert session.get(f"{base}/v0/dso").json()["dso_party_id"] == ledger.dso_party
    assert session.get(f"{base}/v0/migrations/last").json() == {"migration_id": 1}


def test_not_ready(fresh_sim: ScanSimulator) -> None:
    session = requests.Session()
    base = fresh_sim.base_url
    fresh_sim.set_ready(False)
    assert session.get(f"{base}/readyz").status_code == 503
    resp = post_page(session, base, 10)
    assert resp.status_code == 503 and resp.json() == {"error": BACKFILLING_ERROR}
    assert "not_initialized" in session.get(f"{base}/status").json()
    fresh_sim.set_ready(True)
    assert post_page(session, base, 10).status_code == 200


def test_visible_until_hides_items_and_lowers_migration_info(fresh_sim: ScanSimulator) -> None:
    lg = fresh_sim.ledger
    session = requests.Session()
    base = fresh_sim.base_url
    edge = lg.record_time_us(0, 99)
    fresh_sim.set_visible_until(edge)
    items = page_all(base, 40)
    assert [it["update_id"] for it in items] == [lg.update_id(0, i) for i in range(100)]
    info = session.post(f"{base}/v0/backfilling/migration-info", json={"migration_id": 0}).json()
    assert parse_time_us(info["record_time_range"][0]["max"]) == edge
    # Migration 1 starts before migration 0 ends, but is not visible until migration 0 is complete.
    assert session.post(f"{base}/v0/backfilling/migration-info", json={"migration_id": 1}).status_code == 404
    assert session.get(f"{base}/v2/updates/{lg.update_id(0, 100)}").status_code == 404
    # An edge inside the overlap shows more of migration 0 but still none of migration 1.
    fresh_sim.set_visible_until(lg.record_time_us(1, 9))
    assert lg.record_time_us(1, 9) < lg.last_record_time_us(0)
    resp = post_page(session, base, 1000, (0, items[-1]["record_time"]))
    got = resp.json()["transactions"]
    assert got and all(item_migration(it) == 0 for it in got)
    # Past migration 0's end, the same cursor continues into migration 1 without a gap.
    k = lg.first_index_after(1, lg.last_record_time_us(0)) + 5
    fresh_sim.set_visible_until(lg.record_time_us(1, k - 1))
    resp = post_page(session, base, 1000, (0, items[-1]["record_time"]))
    got = [it["update_id"] for it in resp.json()["transactions"]]
    assert got == [lg.update_id(0, i) for i in range(100, 260)] + [lg.update_id(1, i) for i in range(k)]
    fresh_sim.set_visible_until(None)
    assert len(page_all(base, 1000)) == 500


# --------------------------------------------------------------------------------------------------
# Faults and corruptions


@pytest.mark.parametrize("kind", ["429", "500", "503", "slow", "reset", "truncated"])
def test_fault_kinds_are_observable(fresh_sim: ScanSimulator, kind: str) -> None:
    fresh_sim.set_faults(FaultConfig(rate=1.0, kinds=(kind,), slow_seconds=0.3, retry_after_seconds=3))
    session = requests.Session()
    base = fresh_sim.base_url
    assert session.get(f"{base}/readyz").status_code == 200  # other endpoints are not faulted
    start = time.monotonic()
    if kind == "reset":
        with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            post_page(session, base, 50)
    else:
        resp = post_page(session, base, 50)
        if kind == "429":
            assert resp.status_code == 429 and resp.headers["Retry-After"] == "3"
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert resp.text == "Too Many Requests: Server is busy, please try again later."
        elif kind == "500":
            assert resp.status_code == 500 and resp.json() == {"error": "An unexpected error occurred."}
        elif kind == "503":
            assert resp.status_code == 503 and resp.json() == {"error": BACKFILLING_ERROR}
        elif kind == "slow":
            assert resp.status_code == 200 and len(resp.json()["transactions"]) == 50
            assert time.monotonic() - start >= 0.3
        else:
            assert resp.status_code == 200
            assert int(resp.headers["Content-Length"]) == len(resp.content)
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(resp.content)
    assert fresh_sim.stats["faults"] == {kind: 1}
    fresh_sim.set_faults(None)
    assert post_page(session, base, 5).status_code == 200  # a new connection works again


def test_fault_rate_is_deterministic(fresh_sim: ScanSimulator) -> None:
    session = requests.Session()

    def pattern() -> list[int]:
        fresh_sim.set_faults(FaultConfig(rate=0.5, kinds=("500",), seed=42))
        return [post_page(session, fresh_sim.base_url, 1).status_code for _ in range(30)]

    first = pattern()
    assert first == pattern()
    assert 5 <= first.count(500) <= 25 and first.count(200) + first.count(500) == 30


@pytest.mark.parametrize("kind", ["unknown_shape", "bad_timestamp", "missing_field", "non_json"])
def test_corruptions(fresh_sim: ScanSimulator, kind: str) -> None:
    lg = fresh_sim.ledger
    target = next(i for i in range(5, 50) if lg.kind(0, i) == "transaction")
    uid = lg.update_id(0, target)
    fresh_sim.corrupt(uid, kind)
    session = requests.Session()
    resp = post_page(session, fresh_sim.base_url, 50)
    assert resp.status_code == 200
    if kind == "non_json":
        assert resp.content == b"<html>oops</html>"
    else:
        items = resp.json()["transactions"]
        bad = items[target]
        assert bad["update_id"] == uid
        if kind == "unknown_shape":
            assert "events_by_id" not in bad and "event" not in bad
        elif kind == "bad_timestamp":
            assert bad["effective_at"] == "not-a-time"
        else:
            assert "synchronizer_id" not in bad and "events_by_id" in bad
        assert items[target - 1] == lg.item(0, target - 1)  # neighbours untouched
    assert post_page(session, fresh_sim.base_url, 5).status_code == 200  # page without the item
    assert fresh_sim.stats["corruptions"] == {kind: 1}
    fresh_sim.clear_corruptions()
    assert post_page(session, fresh_sim.base_url, 50).json()["transactions"][target] == lg.item(0, target)


def test_stats(fresh_sim: ScanSimulator) -> None:
    session = requests.Session()
    post_page(session, fresh_sim.base_url, 10)
    post_page(session, fresh_sim.base_url, 7, (0, fresh_sim.ledger.record_time(0, 9)))
    session.get(f"{fresh_sim.base_url}/readyz")
    stats = fresh_sim.stats
    assert stats["requests"]["/v2/updates"] == 2 and stats["requests"]["/readyz"] == 1
    assert stats["pages"] == 2 and stats["items"] == 17 and stats["bytes"] > 0


# --------------------------------------------------------------------------------------------------
# TLS, scale, CLI


def test_tls_with_trustme(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with ScanSimulator(Ledger(SMALL), tls=(str(pem), str(pem))) as tls_sim:
        assert tls_sim.base_url.startswith("https://127.0.0.1:")
        session = requests.Session()
        session.trust_env = False  # the default trust store must not contain our CA
        resp = session.post(f"{tls_sim.base_url}/v2/updates", json={"page_size": 3}, verify=str(ca_file))
        assert resp.status_code == 200 and len(resp.json()["transactions"]) == 3
        with pytest.raises(requests.exceptions.SSLError):
            requests.Session().get(f"{tls_sim.base_url}/readyz", verify=True)
        # The failed handshake must not have hurt the server.
        assert session.get(f"{tls_sim.base_url}/readyz", verify=str(ca_file)).status_code == 200


def test_million_update_ledger_is_lazy_and_fast() -> None:
    tracemalloc.start()
    try:
        big = Ledger(LedgerConfig(updates_per_migration=(400_000, 600_000)), cache_bytes=32 * 1024 * 1024)
        assert tracemalloc.get_traced_memory()[0] < 1_000_000  # nothing per update
        with ScanSimulator(big, prefetch=False) as s:
            start = time.monotonic()
            resp = post_page(requests.Session(), s.base_url, 1000, (1, big.record_time(1, 599_000)))
            elapsed = time.monotonic() - start
            assert resp.status_code == 200
            body = resp.content
            info = requests.post(
                f"{s.base_url}/v0/backfilling/migration-info", json={"migration_id": 1}, timeout=5
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5.0
    assert peak < 150 * 1024 * 1024  # a ~19 MB page, its cache entries and the client's copy
    items = orjson.loads(body)["transactions"]
    assert len(items) == 999 and items[-1]["update_id"] == big.update_id(1, 599_999)
    assert parse_time_us(info.json()["record_time_range"][0]["max"]) == big.last_record_time_us(1)


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_serve_and_dump(tmp_path: Path) -> None:
    url_file = tmp_path / "url.txt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.scan_sim",
            "serve",
            "--updates",
            "30,20",
            "--seed",
            "5",
            "--url-file",
            str(url_file),
        ],
        cwd=REPO,
        env=_cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api/scan")
        assert url_file.read_text().strip() == url
        items = page_all(url, 13)
        assert len(items) == 50
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0

    out = subprocess.run(
        [sys.executable, "-m", "tools.scan_sim", "dump", "--updates", "30,20", "--seed", "5"],
        cwd=REPO,
        env=_cli_env(),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    lines = out.splitlines()
    assert len(lines) == 50
    ref = Ledger(LedgerConfig(seed=5, updates_per_migration=(30, 20)))
    assert [orjson.loads(line)["update_id"] for line in lines] == [it["update_id"] for it in items]
    assert lines[31] == ref.item_json(1, 1)
