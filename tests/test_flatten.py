"""Flattening of ``/v2/updates`` items into ``updates`` and ``events`` rows.

Ground truth comes from the constructed and documentation examples (tests/fixtures/scan_api) and from
the simulator's ``Ledger``, whose ``expected_event_ids`` derives the pre-order from the generator's own
trees rather than from the item JSON.
"""

from __future__ import annotations

import calendar
import copy
import json
import logging
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scan_ingest.exceptions import DecodeError
from scan_ingest.flatten import EVENT_COLUMNS, UPDATE_COLUMNS, ColumnBuffer, Flattener
from scan_ingest.scan_client import item_migration_id, item_record_time_us
from scan_ingest.schema import EVENTS_SCHEMA, UPDATES_SCHEMA
from scan_ingest.timestamps import parse_us

from tools.scan_sim import Ledger

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "scan_api"
INGESTED_AT = 1_741_000_000_123_456
TX_ID = "12209cb8e72f22b52d65b516bd1a4931f3464936d71114a4385c6e97ea829738570d"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def page(name: str) -> list[dict[str, Any]]:
    return load(name)["transactions"]


def utc_us(y: int, mo: int, d: int, h: int, mi: int, s: int, us: int = 0) -> int:
    """Microseconds since the epoch computed without the code under test."""
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1_000_000 + us


def flatten(items: list[dict[str, Any]]) -> tuple[pa.Table, pa.Table]:
    """Flatten items as the writer does (migration and record time taken from the item)."""
    updates, events = ColumnBuffer(UPDATE_COLUMNS), ColumnBuffer(EVENT_COLUMNS)
    flattener = Flattener(updates, events, INGESTED_AT)
    for item in items:
        flattener.add(item, item_migration_id(item), item_record_time_us(item))
    u = pa.Table.from_pydict(updates.columns, schema=UPDATES_SCHEMA)
    e = pa.Table.from_pydict(events.columns, schema=EVENTS_SCHEMA)
    for table in (u, e):
        for f in table.schema:
            if not f.nullable:  # from_pydict does not enforce nullability; the Parquet writer would
                assert table.column(f.name).null_count == 0, f.name
    return u, e


def flatten_one(item: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    u, e = flatten([item])
    assert u.num_rows == 1
    return u.to_pylist()[0], e.to_pylist()


def us_column(table: pa.Table, name: str) -> list[int | None]:
    return table.column(name).cast(pa.int64()).to_pylist()


def reference_preorder(item: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(event_id, parent) by recursion over the item: an independent walk to compare with."""
    out: list[tuple[str, str | None]] = []

    def visit(eid: str, parent: str | None) -> None:
        out.append((eid, parent))
        for child in item["events_by_id"][eid].get("child_event_ids") or []:
            visit(child, eid)

    for root in item["root_event_ids"]:
        visit(root, None)
    return out


def events_of(events: pa.Table, update_id: str) -> list[dict[str, Any]]:
    return [r for r in events.to_pylist() if r["update_id"] == update_id]


def parents_from_children(item: dict[str, Any]) -> dict[str, str | None]:
    parents: dict[str, str | None] = dict.fromkeys(item["root_event_ids"])
    for eid, ev in item["events_by_id"].items():
        for child in ev.get("child_event_ids") or []:
            parents[child] = eid
    return parents


def tx(update_id: str, events: dict[str, dict[str, Any]], roots: list[str], **extra: Any) -> dict[str, Any]:
    """A minimal valid transaction item around hand-made events."""
    item: dict[str, Any] = {
        "update_id": update_id,
        "migration_id": 2,
        "workflow_id": "",
        "record_time": "2025-03-03T10:15:43.120007Z",
        "synchronizer_id": "global-domain::1220aa",
        "effective_at": "2025-03-03T10:15:43.004512Z",
        "root_event_ids": roots,
        "events_by_id": dict(sorted(events.items())),  # v2 sorts the keys as strings
    }
    item.update(extra)
    return item


def created(eid: str, **over: Any) -> dict[str, Any]:
    ev = {
        "event_type": "created_event",
        "event_id": eid,
        "contract_id": f"00{eid[-4:]}",
        "template_id": "pkg:Splice.Amulet:Amulet",
        "package_name": "splice-amulet",
        "create_arguments": {"owner": "alice::1220", "amount": {"initialAmount": "1.0000000000"}},
        "created_at": "2025-03-03T10:15:43.004512Z",
        "signatories": ["alice::1220"],
        "observers": [],
    }
    ev.update(over)
    return ev


def exercised(eid: str, children: list[str], **over: Any) -> dict[str, Any]:
    ev = {
        "event_type": "exercised_event",
        "event_id": eid,
        "contract_id": f"00{eid[-4:]}",
        "template_id": "pkg:Splice.AmuletRules:AmuletRules",
        "package_name": "splice-amulet",
        "choice": "AmuletRules_Transfer",
        "choice_argument": {"transfer": {"amount": "1.0"}},
        "child_event_ids": children,
        "exercise_result": {"round": {"number": "1"}},
        "consuming": False,
        "acting_parties": ["alice::1220"],
        "interface_id": None,
    }
    ev.update(over)
    return ev


def tree(uid: str, shape: dict[int, list[int]], roots: list[int]) -> dict[str, Any]:
    """A transaction whose node ``n`` is ``uid:n``; nodes with children are exercises."""
    nodes = set(shape) | {c for cs in shape.values() for c in cs} | set(roots)
    events = {
        f"{uid}:{n}": exercised(f"{uid}:{n}", [f"{uid}:{c}" for c in shape[n]]) if shape.get(n) else created(f"{uid}:{n}")
        for n in nodes
    }
    return tx(uid, events, [f"{uid}:{r}" for r in roots])


def completed_genesis() -> dict[str, Any]:
    """The documented genesis transaction with its placeholder events replaced.

    Header (ids, times, roots) and events ``:4`` and ``:7`` are the real documented values; the other
    nodes are minimal stand-ins shaped so that ``:4``'s documented children ``:5 :6 :7`` follow it.
    """
    item = page("v2-updates.response.genesis-excerpt.json")[0]
    uid = item["update_id"]
    real = {**load("events_by_id.exercised-AmuletRules_Bootstrap_Rounds.json"), **load("events_by_id.created-OpenMiningRound.json")}
    events = {f"{uid}:{n}": created(f"{uid}:{n}") for n in (0, 2, 3, 5, 6)}
    events[f"{uid}:1"] = exercised(f"{uid}:1", [f"{uid}:2", f"{uid}:3", f"{uid}:4"])
    events.update(real)
    item["events_by_id"] = dict(sorted(events.items()))
    return item


EXAMPLE_PAGES = (
    "v2-updates.response.transaction.json",
    "v2-updates.response.reassignments.json",
    "v2-updates.response.migration-boundary.json",
)


def example_items() -> list[dict[str, Any]]:
    items = [i for name in EXAMPLE_PAGES for i in page(name)]
    return [*items, load("v2-updates-by-id.response.transaction.json"), completed_genesis()]


# -- the examples ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXAMPLE_PAGES)
def test_example_page_each_update_once_in_order(name: str) -> None:
    items = page(name)
    updates, events = flatten(items)
    assert updates.column("update_id").to_pylist() == [i["update_id"] for i in items]
    assert updates.column("migration_id").to_pylist() == [item_migration_id(i) for i in items]
    for item in items:
        rows = events_of(events, item["update_id"])
        if "events_by_id" in item:
            assert [(r["event_id"], r["parent_event_id"]) for r in rows] == reference_preorder(item)
        else:
            assert len(rows) == 1
        assert [r["event_index"] for r in rows] == list(range(len(rows)))
    assert events.num_rows == sum(updates.column("event_count").to_pylist())
    # rows of one update are contiguous and in page order
    seen = [r["update_id"] for r in events.to_pylist()]
    assert list(dict.fromkeys(seen)) == [i["update_id"] for i in items]


def test_transaction_example_tree_and_columns() -> None:
    item = page("v2-updates.response.transaction.json")[0]
    upd, evs = flatten_one(item)
    ids = [f"{TX_ID}:{n}" for n in range(4)]
    assert [e["event_id"] for e in evs] == ids
    assert [e["parent_event_id"] for e in evs] == [None, ids[0], ids[0], ids[0]]
    assert [e["event_type"] for e in evs] == ["exercised_event", "exercised_event", "created_event", "created_event"]
    assert upd["update_type"] == "transaction"
    assert upd["migration_id"] == 4
    assert upd["workflow_id"] is None  # "" from the API
    assert upd["root_event_ids"] == [ids[0]]
    assert upd["event_count"] == 4
    assert upd["external_transaction_hash"] is None
    assert upd["synchronizer_id"] == item["synchronizer_id"]
    assert upd["reassignment_kind"] is None and upd["reassignment_counter"] is None
    assert upd["ingested_at"].year == 2025
    root, archive, create = evs[0], evs[1], evs[2]
    src = item["events_by_id"]
    assert root["choice"] == "AmuletRules_Transfer" and root["consuming"] is False
    assert root["child_event_ids"] == ids[1:]
    assert root["acting_parties"] == src[ids[0]]["acting_parties"]
    assert json.loads(root["choice_argument"]) == src[ids[0]]["choice_argument"]
    assert json.loads(root["exercise_result"]) == src[ids[0]]["exercise_result"]
    assert root["create_arguments"] is None and root["signatories"] is None
    assert archive["consuming"] is True and archive["child_event_ids"] == []
    assert json.loads(archive["choice_argument"]) == {}
    assert json.loads(create["create_arguments"]) == src[ids[2]]["create_arguments"]
    assert create["signatories"] == src[ids[2]]["signatories"] and create["observers"] == []
    assert create["choice"] is None and create["consuming"] is None and create["child_event_ids"] is None
    for e in evs:
        assert e["template_id"] == src[e["event_id"]]["template_id"]
        assert e["contract_id"] == src[e["event_id"]]["contract_id"]
        assert e["package_name"] == "splice-amulet"
        assert e["update_type"] == "transaction" and e["migration_id"] == 4
        assert e["synchronizer_id"] == item["synchronizer_id"]


def test_update_by_id_item_flattens_like_the_page_item() -> None:
    by_id = load("v2-updates-by-id.response.transaction.json")
    from_page = page("v2-updates.response.transaction.json")[0]
    assert flatten([by_id])[0].drop(["update_data"]).equals(flatten([from_page])[0].drop(["update_data"]))
    assert flatten([by_id])[1].equals(flatten([from_page])[1])


def test_genesis_excerpt_with_placeholder_events_fails_naming_the_root() -> None:
    item = page("v2-updates.response.genesis-excerpt.json")[0]
    with pytest.raises(DecodeError) as exc:
        flatten([item])
    msg = str(exc.value)
    assert item["update_id"] in msg and f"{item['update_id']}:0" in msg
    assert "root_event_ids" in msg and "events_by_id" in msg


def test_completed_genesis_transaction() -> None:
    item = completed_genesis()
    upd, evs = flatten_one(item)
    uid = item["update_id"]
    assert [e["event_id"] for e in evs] == [f"{uid}:{n}" for n in range(8)]
    parent = {e["event_id"]: e["parent_event_id"] for e in evs}
    assert parent[f"{uid}:0"] is None and parent[f"{uid}:1"] is None  # two roots
    assert [parent[f"{uid}:{n}"] for n in (5, 6, 7)] == [f"{uid}:4"] * 3
    # Real data: effective_at is after record_time; both exact.
    assert us_column(flatten([item])[0], "record_time") == [utc_us(2024, 9, 20, 13, 31, 28, 405180)]
    assert upd["effective_at"] == evs[0]["effective_at"]
    assert us_column(flatten([item])[1], "effective_at") == [utc_us(2024, 9, 20, 13, 31, 29, 552807)] * 8
    bootstrap = evs[4]
    assert bootstrap["choice"] == "AmuletRules_Bootstrap_Rounds"
    assert json.loads(bootstrap["choice_argument"]) == {"amuletPrice": "0.0050000000", "round0Duration": {"microseconds": "97200000000"}}


def test_all_examples_keep_the_item_verbatim_in_update_data() -> None:
    items = example_items()
    updates, _ = flatten(items)
    for item, data in zip(items, updates.column("update_data").to_pylist(), strict=True):
        decoded = json.loads(data)
        assert decoded == item
        assert json.dumps(decoded) == json.dumps(item)  # same key order too


def test_example_timestamps_are_exact_through_parquet(tmp_path: Path) -> None:
    items = example_items()
    updates, events = flatten(items)
    rt = [parse_us(i["record_time"]) for i in items]
    eff = [parse_us(i["effective_at"]) if "effective_at" in i else None for i in items]
    # independent of parse_us: the transaction example's record time, computed by the calendar
    assert rt[0] == utc_us(2025, 3, 3, 10, 15, 43, 120_007)
    for name, table in (("updates", updates), ("events", events)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    u_back, e_back = pq.read_table(tmp_path / "updates.parquet"), pq.read_table(tmp_path / "events.parquet")
    for table in (updates, u_back):
        assert us_column(table, "record_time") == rt
        assert us_column(table, "effective_at") == eff
    by_id = {i["update_id"]: (r, e) for i, r, e in zip(items, rt, eff, strict=True)}
    for table in (events, e_back):
        ids = table.column("update_id").to_pylist()
        assert us_column(table, "record_time") == [by_id[u][0] for u in ids]
        assert us_column(table, "effective_at") == [by_id[u][1] for u in ids]
    assert e_back.equals(events) and u_back.equals(updates)


# -- the simulator's ledger ----------------------------------------------------------------------------
def test_ledger_items_match_generator_ground_truth(ledger: Ledger) -> None:
    items = list(ledger.iter_items())
    updates, events = flatten(items)
    assert updates.column("update_id").to_pylist() == [i["update_id"] for i in items]
    by_update: dict[str, list[dict[str, Any]]] = {}
    for row in events.to_pylist():
        by_update.setdefault(row["update_id"], []).append(row)
    assert set(by_update) == {i["update_id"] for i in items}
    kinds = set()
    with_future_fields = 0
    for item, upd in zip(items, updates.to_pylist(), strict=True):
        rows = by_update[item["update_id"]]
        assert upd["event_count"] == len(rows)
        assert [r["event_index"] for r in rows] == list(range(len(rows)))
        if "events_by_id" in item:
            kinds.add("transaction")
            assert [r["event_id"] for r in rows] == ledger.expected_event_ids(item)
            parents = parents_from_children(item)
            assert [r["parent_event_id"] for r in rows] == [parents[r["event_id"]] for r in rows]
            with_future_fields += "future_field" in item
        elif "created_event" in item["event"]:
            kinds.add("assign")
            assert [r["event_id"] for r in rows] == ledger.expected_event_ids(item)
        else:
            kinds.add("unassign")
            assert ledger.expected_event_ids(item) == [] and [r["event_id"] for r in rows] == [None]
    assert kinds == {"transaction", "assign", "unassign"}
    assert with_future_fields > 0, "the test ledger should exercise unknown extra fields"
    # timestamps exact to the microsecond
    assert us_column(updates, "record_time") == [parse_us(i["record_time"]) for i in items]
    assert us_column(updates, "effective_at") == [parse_us(i["effective_at"]) if "effective_at" in i else None for i in items]
    for item, data in zip(items, updates.column("update_data").to_pylist(), strict=True):
        assert json.dumps(json.loads(data)) == json.dumps(item)


def test_ledger_event_timestamps_and_parquet_round_trip(ledger: Ledger, tmp_path: Path) -> None:
    items = [ledger.item(0, i) for i in range(120)]
    updates, events = flatten(items)
    rt = {i["update_id"]: parse_us(i["record_time"]) for i in items}
    eff = {i["update_id"]: parse_us(i["effective_at"]) if "effective_at" in i else None for i in items}
    src_created: dict[str | None, int | None] = {}
    for item in items:
        if "events_by_id" in item:
            for eid, ev in item["events_by_id"].items():
                src_created[eid] = parse_us(ev["created_at"]) if "created_at" in ev else None
        elif "created_event" in item["event"]:
            ce = item["event"]["created_event"]
            src_created[ce["event_id"]] = parse_us(ce["created_at"])
    ids = events.column("update_id").to_pylist()
    eids = events.column("event_id").to_pylist()
    assert us_column(events, "record_time") == [rt[u] for u in ids]
    assert us_column(events, "effective_at") == [eff[u] for u in ids]
    assert us_column(events, "created_at") == [src_created.get(e) for e in eids]

    # through Parquet and back: same microseconds, same timestamp type
    for name, table in (("updates", updates), ("events", events)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path)
        back = pq.read_table(path)
        assert back.schema.field("record_time").type == pa.timestamp("us", tz="UTC")
        for col in ("record_time", "effective_at", "ingested_at"):
            assert us_column(back, col) == us_column(table, col)
    back_rt = pq.read_table(tmp_path / "updates.parquet").column("record_time").to_pylist()
    assert [calendar.timegm(d.utctimetuple()) * 1_000_000 + d.microsecond for d in back_rt] == [rt[i["update_id"]] for i in items]


# -- trees -------------------------------------------------------------------------------------------
def test_tree_with_more_than_ten_events_walks_numerically_not_by_key_order() -> None:
    uid = "1220" + "ab" * 32
    # 0 -> (1 -> 2 3 4) (5 -> 6 7 8) (9 -> 10 11); keys sort as :0 :1 :10 :11 :2 ...
    item = tree(uid, {0: [1, 5, 9], 1: [2, 3, 4], 5: [6, 7, 8], 9: [10, 11]}, [0])
    assert list(item["events_by_id"])[:4] == [f"{uid}:0", f"{uid}:1", f"{uid}:10", f"{uid}:11"]
    upd, evs = flatten_one(item)
    order = [e["event_id"] for e in evs]
    assert order == [f"{uid}:{n}" for n in range(12)]
    assert order.index(f"{uid}:10") == order.index(f"{uid}:9") + 1
    assert [e["event_index"] for e in evs] == list(range(12))
    parent = {int(e["event_id"].rsplit(":", 1)[1]): e["parent_event_id"] for e in evs}
    assert parent == {0: None, 1: f"{uid}:0", 2: f"{uid}:1", 3: f"{uid}:1", 4: f"{uid}:1", 5: f"{uid}:0",
                      6: f"{uid}:5", 7: f"{uid}:5", 8: f"{uid}:5", 9: f"{uid}:0", 10: f"{uid}:9", 11: f"{uid}:9"}
    assert upd["event_count"] == 12


def test_several_roots_keep_their_order() -> None:
    uid = "1220" + "cd" * 32
    item = tree(uid, {0: [1, 2], 3: [4], 10: [11, 12]}, [0, 3, 5, 6, 7, 8, 9, 10])
    _, evs = flatten_one(item)
    assert [e["event_id"] for e in evs] == [f"{uid}:{n}" for n in range(13)]
    assert [e["parent_event_id"] for e in evs] == reference_preorder_parents(item)


def reference_preorder_parents(item: dict[str, Any]) -> list[str | None]:
    return [p for _, p in reference_preorder(item)]


def test_unreachable_events_are_emitted_after_the_tree_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    uid = "1220" + "ef" * 32
    item = tree(uid, {0: [1]}, [0])
    item["events_by_id"][f"{uid}:7"] = created(f"{uid}:7")
    item["events_by_id"] = dict(sorted(item["events_by_id"].items()))
    with caplog.at_level(logging.WARNING, logger="scan_ingest.flatten"):
        upd, evs = flatten_one(item)
    assert [e["event_id"] for e in evs] == [f"{uid}:0", f"{uid}:1", f"{uid}:7"]
    assert evs[2]["parent_event_id"] is None and evs[2]["event_index"] == 2
    assert upd["event_count"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(uid in w and f"{uid}:7" in w for w in warnings), warnings


# -- timestamps --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-03T10:15:43Z", utc_us(2025, 3, 3, 10, 15, 43)),
        ("2025-03-03T10:15:43.120Z", utc_us(2025, 3, 3, 10, 15, 43, 120_000)),
        ("2025-03-03T10:15:43.120007Z", utc_us(2025, 3, 3, 10, 15, 43, 120_007)),
        ("2025-03-03T10:15:43.120007000Z", utc_us(2025, 3, 3, 10, 15, 43, 120_007)),
        ("2025-03-03T10:15:43.000001000Z", utc_us(2025, 3, 3, 10, 15, 43, 1)),
    ],
)
def test_effective_at_with_0_3_6_9_digits_is_exact(text: str, expected: int) -> None:
    uid = "1220" + "01" * 32
    item = tree(uid, {0: [1]}, [0])
    item["effective_at"] = text
    updates, events = flatten([item])
    assert us_column(updates, "effective_at") == [expected]
    assert us_column(events, "effective_at") == [expected, expected]


def test_effective_at_with_nonzero_nanoseconds_fails_naming_update_and_field() -> None:
    uid = "1220" + "02" * 32
    item = tree(uid, {0: [1]}, [0])
    item["effective_at"] = "2025-03-03T10:15:43.120007001Z"
    with pytest.raises(DecodeError) as exc:
        flatten([item])
    assert uid in str(exc.value) and "effective_at" in str(exc.value)


def test_created_at_with_nonzero_nanoseconds_fails_naming_the_event() -> None:
    uid = "1220" + "03" * 32
    item = tree(uid, {0: [1]}, [0])
    item["events_by_id"][f"{uid}:1"]["created_at"] = "2025-03-03T10:15:43.000000500Z"
    with pytest.raises(DecodeError) as exc:
        flatten([item])
    assert uid in str(exc.value) and f"events_by_id[{uid}:1].created_at" in str(exc.value)


def test_created_at_far_in_the_past_round_trips() -> None:
    # Contracts imported at a migration can carry very old times (year 1); they must stay exact.
    uid = "1220" + "04" * 32
    item = tree(uid, {0: [1]}, [0])
    item["events_by_id"][f"{uid}:1"]["created_at"] = "0001-01-01T00:00:00.000001Z"
    _, events = flatten([item])
    assert us_column(events, "created_at") == [None, utc_us(1, 1, 1, 0, 0, 0, 1)]


# -- reassignments -----------------------------------------------------------------------------------
def test_reassignments_produce_update_and_event_rows() -> None:
    unassign_item, assign_item = page("v2-updates.response.reassignments.json")
    updates, events = flatten([unassign_item, assign_item])
    un, asg = updates.to_pylist()
    eu, ea = events.to_pylist()
    src, tgt = unassign_item["event"]["source_synchronizer"], unassign_item["event"]["target_synchronizer"]
    common = {"update_type": "reassignment", "migration_id": 4, "source_synchronizer": src, "target_synchronizer": tgt,
              "unassign_id": unassign_item["event"]["unassign_id"], "submitter": unassign_item["event"]["submitter"],
              "reassignment_counter": 1}
    for row in (un, asg, eu, ea):
        assert {k: row[k] for k in common} == common
    assert un["reassignment_kind"] == eu["reassignment_kind"] == "unassign"
    assert asg["reassignment_kind"] == ea["reassignment_kind"] == "assign"
    assert un["synchronizer_id"] == eu["synchronizer_id"] == src  # leaves the source
    assert asg["synchronizer_id"] == ea["synchronizer_id"] == tgt  # arrives on the target
    for row in (un, asg):
        assert row["event_count"] == 1
        assert row["effective_at"] is None and row["root_event_ids"] is None and row["workflow_id"] is None
    assert us_column(updates, "record_time") == [utc_us(2025, 3, 3, 10, 20, 1, 310), utc_us(2025, 3, 3, 10, 20, 2, 511846)]

    assert eu["event_id"] is None and eu["event_type"] == "unassigned_event"
    assert eu["contract_id"] == unassign_item["event"]["contract_id"]
    assert eu["template_id"] is None and eu["create_arguments"] is None and eu["parent_event_id"] is None

    ce = assign_item["event"]["created_event"]
    assert ea["event_id"] == ce["event_id"] and ea["event_type"] == "created_event" and ea["event_index"] == 0
    assert ea["contract_id"] == ce["contract_id"] == eu["contract_id"]
    assert ea["template_id"] == ce["template_id"] and ea["package_name"] == "splice-amulet"
    assert json.loads(ea["create_arguments"]) == ce["create_arguments"]
    assert ea["signatories"] == ce["signatories"] and ea["observers"] == []
    assert us_column(events, "created_at") == [None, utc_us(2025, 3, 2, 22, 41, 19, 771204)]
    assert us_column(events, "effective_at") == [None, None]
    assert ea["choice"] is None and ea["child_event_ids"] is None


# -- kept as served ----------------------------------------------------------------------------------
def test_unknown_fields_survive_in_update_data() -> None:
    uid = "1220" + "05" * 32
    item = tree(uid, {0: [1]}, [0])
    # 2**70 + 1 is beyond orjson's 64 bits: the writer's stdlib fallback must keep it exact
    item["future_field"] = {"note": "Zürich ✓ 東京", "big": 2**70 + 1, "flags": [True, None, -1.5], "empty": {}}
    item["events_by_id"][f"{uid}:1"]["future_event_field"] = ["x"]
    item["events_by_id"][f"{uid}:1"]["create_arguments"]["huge"] = str(10**30)
    upd, evs = flatten_one(item)
    data = upd["update_data"]
    assert json.loads(data) == item
    assert json.dumps(json.loads(data)) == json.dumps(item)
    assert json.loads(data)["future_field"]["big"] == 2**70 + 1
    assert json.loads(evs[1]["create_arguments"])["huge"] == str(10**30)


def test_reassignment_unknown_fields_survive() -> None:
    item = copy.deepcopy(page("v2-updates.response.reassignments.json")[1])
    item["new_top"] = [1, 2]
    item["event"]["new_inner"] = {"a": None}
    upd, _ = flatten_one(item)
    assert orjson.loads(upd["update_data"]) == item


@pytest.mark.parametrize(("workflow_id", "expected"), [("", None), (None, None), ("wallet-batch-1", "wallet-batch-1")])
def test_workflow_id_empty_becomes_null(workflow_id: str | None, expected: str | None) -> None:
    item = tree("1220" + "06" * 32, {0: [1]}, [0])
    item["workflow_id"] = workflow_id
    upd, _ = flatten_one(item)
    assert upd["workflow_id"] == expected


def test_external_transaction_hash_is_kept() -> None:
    item = tree("1220" + "07" * 32, {0: [1]}, [0])
    item["external_transaction_hash"] = "deadbeef"
    upd, _ = flatten_one(item)
    assert upd["external_transaction_hash"] == "deadbeef"


# -- malformed items ---------------------------------------------------------------------------------
BAD = "1220" + "0b" * 32


def _tx() -> dict[str, Any]:
    return tree(BAD, {0: [1, 2]}, [0])


def _unassign() -> dict[str, Any]:
    item = copy.deepcopy(page("v2-updates.response.reassignments.json")[0])
    item["update_id"] = BAD
    return item


def _without(item: dict[str, Any], *path: str) -> dict[str, Any]:
    target = item
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return item


def _set(item: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    target = item
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return item


MALFORMED = {
    "unknown_shape": (lambda: {"update_id": BAD, "migration_id": 2, "record_time": "2025-03-03T10:15:43.120007Z",
                               "topology_change": {"serial": 1}}, ["events_by_id", "event"]),
    "missing_synchronizer_id": (lambda: _without(_tx(), "synchronizer_id"), ["synchronizer_id"]),
    "null_synchronizer_id": (lambda: _set(_tx(), None, "synchronizer_id"), ["synchronizer_id"]),
    "missing_contract_id": (lambda: _without(_tx(), "events_by_id", f"{BAD}:1", "contract_id"),
                            [f"events_by_id[{BAD}:1].contract_id"]),
    "missing_template_id": (lambda: _without(_tx(), "events_by_id", f"{BAD}:0", "template_id"), ["template_id"]),
    "missing_choice": (lambda: _without(_tx(), "events_by_id", f"{BAD}:0", "choice"), ["choice"]),
    "missing_root_event_ids": (lambda: _without(_tx(), "root_event_ids"), ["root_event_ids"]),
    "missing_effective_at": (lambda: _without(_tx(), "effective_at"), ["effective_at"]),
    "bad_effective_at": (lambda: _set(_tx(), "not-a-time", "effective_at"), ["effective_at", "not-a-time"]),
    "effective_at_without_zone": (lambda: _set(_tx(), "2025-03-03T10:15:43.120007", "effective_at"), ["effective_at"]),
    "bad_created_at": (lambda: _set(_tx(), "yesterday", "events_by_id", f"{BAD}:1", "created_at"), ["created_at"]),
    "root_missing_from_events_by_id": (lambda: _set(_tx(), [f"{BAD}:0", f"{BAD}:9"], "root_event_ids"),
                                       [f"{BAD}:9", "root_event_ids", "events_by_id"]),
    "child_missing_from_events_by_id": (lambda: _set(_tx(), [f"{BAD}:1", f"{BAD}:5"], "events_by_id", f"{BAD}:0", "child_event_ids"),
                                        [f"{BAD}:5", "events_by_id"]),
    "event_reached_twice": (lambda: _set(_tx(), [f"{BAD}:0", f"{BAD}:1"], "root_event_ids"), [f"{BAD}:1", "twice"]),
    "unknown_event_type": (lambda: _set(_tx(), "archived_event", "events_by_id", f"{BAD}:2", "event_type"),
                           ["event_type", "archived_event"]),
    "events_by_id_not_object": (lambda: _set(_tx(), [], "events_by_id"), ["events_by_id"]),
    "root_event_ids_not_list": (lambda: _set(_tx(), f"{BAD}:0", "root_event_ids"), ["root_event_ids"]),
    "unassign_missing_contract_id": (lambda: _without(_unassign(), "event", "contract_id"), ["contract_id", "created_event"]),
    "unassign_missing_source": (lambda: _without(_unassign(), "event", "source_synchronizer"), ["event.source_synchronizer"]),
    "unassign_missing_unassign_id": (lambda: _without(_unassign(), "event", "unassign_id"), ["event.unassign_id"]),
    "bad_reassignment_counter": (lambda: _set(_unassign(), "1", "event", "reassignment_counter"), ["reassignment_counter"]),
    "assign_missing_contract_id": (lambda: _set(_set(_unassign(), created(f"{BAD}:0"), "event", "created_event"), None,
                                                "event", "created_event", "contract_id"),
                                   ["event.created_event.contract_id"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_item_raises_decode_error_naming_update_and_field(case: str) -> None:
    build, needles = MALFORMED[case]
    item = build()
    with pytest.raises(DecodeError) as exc:
        flatten([item])
    msg = str(exc.value)
    assert BAD in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("case", sorted(c for c in MALFORMED if not c.startswith(("unassign", "assign", "bad_reassign"))))
def test_rejected_transaction_leaves_no_rows_behind(case: str) -> None:
    """A transaction that fails adds nothing, so the buffers keep exactly the rows before it."""
    updates, events = ColumnBuffer(UPDATE_COLUMNS), ColumnBuffer(EVENT_COLUMNS)
    flattener = Flattener(updates, events, INGESTED_AT)
    good = tree("1220" + "0c" * 32, {0: [1, 2]}, [0])
    flattener.add(good, 2, parse_us(good["record_time"]))
    item = MALFORMED[case][0]()
    with pytest.raises(DecodeError):
        flattener.add(item, 2, parse_us(item["record_time"]))
    assert {name: len(col) for name, col in updates.columns.items()} == dict.fromkeys(UPDATE_COLUMNS, 1)
    assert {name: len(col) for name, col in events.columns.items()} == dict.fromkeys(EVENT_COLUMNS, 3)


@pytest.mark.parametrize(
    ("record_time", "needle"),
    [(None, "record_time"), ("not-a-time", "not-a-time"), ("2025-03-03T10:15:43.120007001Z", "sub-microsecond")],
)
def test_bad_record_time_raises_decode_error_naming_update(record_time: str | None, needle: str) -> None:
    item = _tx()
    if record_time is None:
        del item["record_time"]
    else:
        item["record_time"] = record_time
    with pytest.raises(DecodeError) as exc:
        item_record_time_us(item)
    assert BAD in str(exc.value) and "record_time" in str(exc.value) and needle in str(exc.value)


def test_item_without_update_id_or_not_an_object_raises() -> None:
    flattener = Flattener(ColumnBuffer(UPDATE_COLUMNS), ColumnBuffer(EVENT_COLUMNS), INGESTED_AT)
    with pytest.raises(DecodeError, match="no update_id"):
        flattener.add({"record_time": "2025-03-03T10:15:43.120007Z", "events_by_id": {}}, 0, 0)
    with pytest.raises(DecodeError, match="not a JSON object"):
        flattener.add(["x"], 0, 0)  # type: ignore[arg-type]
