"""Flatten ``/v2/updates`` items into column buffers of the ``updates`` and ``events`` tables.

Pure functions over decoded JSON. Rules (each fixes a defect of the original pipeline):
- transactions and reassignments are told apart by keys (``events_by_id`` vs ``event``); any other
  shape raises ``DecodeError`` naming the update, never skipped;
- events are emitted in tree pre-order from ``root_event_ids`` following ``child_event_ids``
  (``events_by_id`` is sorted as strings, so ``:10`` precedes ``:2``), each exactly once;
  events no root reaches are still emitted after the tree, with a warning;
- every event carries its transaction's ``effective_at`` (not the contract's ``created_at``);
- timestamps are exact microseconds; the complete item is kept as JSON in ``update_data``.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from itertools import repeat
from typing import Any

import orjson

from scan_ingest.exceptions import DecodeError
from scan_ingest.schema import EVENTS_SCHEMA, UPDATES_SCHEMA
from scan_ingest.timestamps import TimestampError, parse_us

log = logging.getLogger(__name__)

UPDATE_COLUMNS: tuple[str, ...] = tuple(UPDATES_SCHEMA.names)
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENTS_SCHEMA.names)
# String columns whose values are the UTF-8 bytes of ``to_json`` (or None), never str.
JSON_COLUMNS: frozenset[str] = frozenset({"update_data", "create_arguments", "choice_argument", "exercise_result"})


def to_json(value: Any) -> bytes:
    """Compact JSON, key order preserved; the stdlib handles integers beyond 64 bits."""
    try:
        out = orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    # orjson returns its whole output buffer (4 KiB at least, more for larger documents) and never
    # shrinks it: buffered for a row group, that slack was most of the writer's memory. Keep an
    # exact-size copy instead (the buffer is freed at once and reused by the next call).
    return memoryview(out).tobytes()


class ColumnBuffer:
    """Column-major rows of one table: a list per column, appended in lock-step.

    The lists are cleared and cut in place, never replaced, so a ``Flattener`` may keep their
    bound methods.
    """

    __slots__ = ("columns", "names", "nbytes")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.columns: dict[str, list[Any]] = {n: [] for n in names}
        self.nbytes = 0  # approximate payload bytes, to bound row-group memory

    def __len__(self) -> int:
        return len(self.columns[self.names[0]])

    def clear(self) -> None:
        for col in self.columns.values():
            col.clear()
        self.nbytes = 0

    def take(self, n: int) -> dict[str, list[Any]]:
        """Remove and return the first ``n`` rows."""
        out = {}
        for name, col in self.columns.items():
            out[name] = col[:n]
            del col[:n]
        return out


# Contract timestamps repeat a lot (the events of a transaction usually share one created_at);
# parse_us is a pure function of the string, so a cache returns exactly what parsing would.
_parse_us_cached = lru_cache(maxsize=8192)(parse_us)


def _ts(value: Any, update_id: str, field: str, *, required: bool) -> int | None:
    if value is None:
        if required:
            raise DecodeError(f"update {update_id!r}: required field {field} is missing or null")
        return None
    try:
        return _parse_us_cached(value) if type(value) is str else parse_us(value)
    except TimestampError as exc:
        raise DecodeError(f"update {update_id!r}: field {field}: {exc}") from None


def _req(obj: dict[str, Any], key: str, update_id: str, where: str) -> Any:
    value = obj.get(key)
    if value is None:
        raise DecodeError(f"update {update_id!r}: required field {where}{key} is missing or null")
    return value


def _str_list(value: Any, update_id: str, field: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DecodeError(f"update {update_id!r}: field {field} must be a list, got {type(value).__name__}")
    return value


def event_preorder(update_id: str, root_ids: list[str], events_by_id: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``(event_id, parent_id)`` in pre-order from the roots; unreachable events appended after."""
    order: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    stack: list[tuple[str, str | None]] = [(rid, None) for rid in reversed(root_ids)]
    get = events_by_id.get
    while stack:
        eid, parent = stack.pop()
        if eid in seen:
            raise DecodeError(f"update {update_id!r}: event {eid!r} is reached twice in the event tree")
        event = get(eid)
        if event is None:
            where = f"child of {parent!r}" if parent else "root_event_ids"
            raise DecodeError(f"update {update_id!r}: event {eid!r} ({where}) is not in events_by_id")
        seen.add(eid)
        order.append((eid, parent))
        children = event.get("child_event_ids") if isinstance(event, dict) else None
        if children:
            stack.extend(zip(reversed(children), repeat(eid)))
    if len(seen) != len(events_by_id):
        orphans = [k for k in events_by_id if k not in seen]
        log.warning("update %s: %d event(s) not reachable from root_event_ids, appended after the tree: %s",
                    update_id, len(orphans), orphans[:5])
        order.extend((k, None) for k in orphans)
    return order


# Event columns that differ between the events of one transaction, in the order of the row tuples
# built in ``Flattener._transaction``; every other event column holds one value per transaction.
_TX_EVENT_COLUMNS = (
    "event_id", "parent_event_id", "event_type", "contract_id", "template_id", "package_name", "choice",
    "interface_id", "consuming", "acting_parties", "child_event_ids", "signatories", "observers",
    "create_arguments", "choice_argument", "exercise_result", "created_at",
)
_REASSIGNMENT_EVENT_COLUMNS = ("reassignment_kind", "reassignment_counter", "source_synchronizer",
                               "target_synchronizer", "unassign_id", "submitter")


class Flattener:
    """Appends flattened rows of items to an updates buffer and an events buffer."""

    def __init__(self, updates: ColumnBuffer, events: ColumnBuffer, ingested_at_us: int) -> None:
        self.updates = updates
        self.events = events
        self.ingested_at_us = ingested_at_us
        # Bound ``extend`` of each event column, looked up once (the hot loop runs per event).
        ext = {name: col.extend for name, col in events.columns.items()}
        self._tx_event_extends = tuple(ext[name] for name in _TX_EVENT_COLUMNS)
        self._extend_event = ext

    def add(self, item: Any, migration_id: int, record_time_us: int) -> int:
        """Flatten one item (already checked for its migration and record time); returns its event count."""
        if not isinstance(item, dict):
            raise DecodeError(f"an update item is not a JSON object: {item!r:.200}")
        update_id = item.get("update_id")
        if not isinstance(update_id, str) or not update_id:
            raise DecodeError(f"an update item has no update_id (record_time {item.get('record_time')!r}): {item!r:.200}")
        if "events_by_id" in item:
            n_events = self._transaction(item, update_id, migration_id, record_time_us)
        elif "event" in item:
            n_events = self._reassignment(item, update_id, migration_id, record_time_us)
        else:
            raise DecodeError(
                f"update {update_id!r}: unknown item shape (neither events_by_id nor event); keys: {sorted(item)}"
            )
        return n_events

    # -- transactions ------------------------------------------------------------------------
    def _transaction(self, item: dict[str, Any], update_id: str, migration_id: int, rt: int) -> int:
        events_by_id = item["events_by_id"]
        if not isinstance(events_by_id, dict):
            raise DecodeError(f"update {update_id!r}: field events_by_id must be an object")
        roots = _str_list(_req(item, "root_event_ids", update_id, ""), update_id, "root_event_ids") or []
        sync = _req(item, "synchronizer_id", update_id, "")
        eff = _ts(item.get("effective_at"), update_id, "effective_at", required=True)
        order = event_preorder(update_id, roots, events_by_id)
        data = to_json(item)

        # Every event is checked and turned into a row tuple before anything is appended, so a
        # DecodeError leaves the buffers in lock-step; the checks run in the documented order.
        rows: list[tuple[Any, ...]] = []
        add_row = rows.append
        nbytes = 0
        for eid, parent in order:
            ev = events_by_id[eid]
            if not isinstance(ev, dict):
                raise DecodeError(f"update {update_id!r}: event {eid!r} is not an object")
            etype = ev.get("event_type")
            cid = _req(ev, "contract_id", update_id, f"events_by_id[{eid}].")
            tid = _req(ev, "template_id", update_id, f"events_by_id[{eid}].")
            if etype == "created_event":
                args = to_json(ev.get("create_arguments"))
                nbytes += len(args)
                created = _ts(ev.get("created_at"), update_id, f"events_by_id[{eid}].created_at", required=False)
                sigs = _str_list(ev.get("signatories"), update_id, "signatories")
                obs = _str_list(ev.get("observers"), update_id, "observers")
                add_row((eid, parent, etype, cid, tid, ev.get("package_name"), None, None, None, None, None,
                         sigs, obs, args, None, None, created))
            elif etype == "exercised_event":
                arg = to_json(ev.get("choice_argument"))
                res = to_json(ev.get("exercise_result"))
                nbytes += len(arg) + len(res)
                choice = _req(ev, "choice", update_id, f"events_by_id[{eid}].")
                acting = _str_list(ev.get("acting_parties"), update_id, "acting_parties")
                children = _str_list(ev.get("child_event_ids"), update_id, "child_event_ids") or []
                add_row((eid, parent, etype, cid, tid, ev.get("package_name"), choice, ev.get("interface_id"),
                         ev.get("consuming"), acting, children, None, None, None, arg, res, None))
            else:
                raise DecodeError(f"update {update_id!r}: event {eid!r} has unknown event_type {etype!r}")

        u = self.updates.columns
        u["update_id"].append(update_id)
        u["update_type"].append("transaction")
        u["migration_id"].append(migration_id)
        u["record_time"].append(rt)
        u["synchronizer_id"].append(sync)
        u["workflow_id"].append(item.get("workflow_id") or None)
        u["effective_at"].append(eff)
        u["root_event_ids"].append(roots)
        u["event_count"].append(len(order))
        u["external_transaction_hash"].append(item.get("external_transaction_hash"))
        for name in ("reassignment_kind", "source_synchronizer", "target_synchronizer", "unassign_id",
                     "submitter", "reassignment_counter"):
            u[name].append(None)
        u["update_data"].append(data)
        u["ingested_at"].append(self.ingested_at_us)
        self.updates.nbytes += len(data)

        n = len(order)
        if n:
            # Column-wise: one C-level extend per column instead of an append per event and column.
            for extend, values in zip(self._tx_event_extends, zip(*rows, strict=True), strict=True):
                extend(values)
            ext = self._extend_event
            ext["event_index"](range(n))
            ext["update_id"](repeat(update_id, n))
            ext["update_type"](repeat("transaction", n))
            ext["migration_id"](repeat(migration_id, n))
            ext["record_time"](repeat(rt, n))
            ext["effective_at"](repeat(eff, n))
            ext["synchronizer_id"](repeat(sync, n))
            for name in _REASSIGNMENT_EVENT_COLUMNS:
                ext[name](repeat(None, n))
            ext["ingested_at"](repeat(self.ingested_at_us, n))
        self.events.nbytes += nbytes
        return len(order)

    # -- reassignments -----------------------------------------------------------------------
    def _reassignment(self, item: dict[str, Any], update_id: str, migration_id: int, rt: int) -> int:
        ev = item["event"]
        if not isinstance(ev, dict):
            raise DecodeError(f"update {update_id!r}: field event must be an object")
        created = ev.get("created_event")
        if created is not None:
            kind = "assign"
        elif ev.get("contract_id") is not None:
            kind = "unassign"
        else:
            raise DecodeError(
                f"update {update_id!r}: reassignment event has neither created_event (assign) nor contract_id (unassign)"
            )
        src = _req(ev, "source_synchronizer", update_id, "event.")
        tgt = _req(ev, "target_synchronizer", update_id, "event.")
        unassign_id = _req(ev, "unassign_id", update_id, "event.")
        submitter = ev.get("submitter")
        counter = ev.get("reassignment_counter")
        if counter is not None and (not isinstance(counter, int) or isinstance(counter, bool)):
            raise DecodeError(f"update {update_id!r}: event.reassignment_counter must be an integer, got {counter!r}")
        sync = tgt if kind == "assign" else src
        data = to_json(item)

        u = self.updates.columns
        u["update_id"].append(update_id)
        u["update_type"].append("reassignment")
        u["migration_id"].append(migration_id)
        u["record_time"].append(rt)
        u["synchronizer_id"].append(sync)
        u["workflow_id"].append(None)
        u["effective_at"].append(None)
        u["root_event_ids"].append(None)
        u["event_count"].append(1)
        u["external_transaction_hash"].append(None)
        u["reassignment_kind"].append(kind)
        u["source_synchronizer"].append(src)
        u["target_synchronizer"].append(tgt)
        u["unassign_id"].append(unassign_id)
        u["submitter"].append(submitter)
        u["reassignment_counter"].append(counter)
        u["update_data"].append(data)
        u["ingested_at"].append(self.ingested_at_us)
        self.updates.nbytes += len(data)

        e = self.events.columns
        e["update_id"].append(update_id)
        e["event_index"].append(0)
        e["parent_event_id"].append(None)
        e["update_type"].append("reassignment")
        e["migration_id"].append(migration_id)
        e["record_time"].append(rt)
        e["effective_at"].append(None)
        e["synchronizer_id"].append(sync)
        for name in ("choice", "interface_id", "consuming", "acting_parties", "child_event_ids",
                     "choice_argument", "exercise_result"):
            e[name].append(None)
        if kind == "assign":
            if not isinstance(created, dict):
                raise DecodeError(f"update {update_id!r}: event.created_event must be an object")
            args = to_json(created.get("create_arguments"))
            e["event_id"].append(created.get("event_id"))
            e["event_type"].append("created_event")
            e["contract_id"].append(_req(created, "contract_id", update_id, "event.created_event."))
            e["template_id"].append(_req(created, "template_id", update_id, "event.created_event."))
            e["package_name"].append(created.get("package_name"))
            e["create_arguments"].append(args)
            e["created_at"].append(_ts(created.get("created_at"), update_id, "event.created_event.created_at", required=False))
            e["signatories"].append(_str_list(created.get("signatories"), update_id, "signatories"))
            e["observers"].append(_str_list(created.get("observers"), update_id, "observers"))
            self.events.nbytes += len(args)
        else:
            e["event_id"].append(None)
            e["event_type"].append("unassigned_event")
            e["contract_id"].append(ev["contract_id"])
            e["template_id"].append(None)
            e["package_name"].append(None)
            e["create_arguments"].append(None)
            e["created_at"].append(None)
            e["signatories"].append(None)
            e["observers"].append(None)
        e["reassignment_kind"].append(kind)
        e["reassignment_counter"].append(counter)
        e["source_synchronizer"].append(src)
        e["target_synchronizer"].append(tgt)
        e["unassign_id"].append(unassign_id)
        e["submitter"].append(submitter)
        e["ingested_at"].append(self.ingested_at_us)
        return 1
