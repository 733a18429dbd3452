"""Explicit Arrow schemas of the two output tables (never inferred).

Schema version policy: ``SCHEMA_VERSION`` is written into every file's key-value metadata.
Adding a nullable column is a minor bump (readers of the old version still work); renaming,
removing or retyping a column is a major bump and gets a new table prefix. See docs/schema.md.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.0"
TS = pa.timestamp("us", tz="UTC")
STR_LIST = pa.list_(pa.string())

UPDATES_SCHEMA = pa.schema(
    [
        pa.field("update_id", pa.string(), nullable=False),
        pa.field("update_type", pa.string(), nullable=False),  # transaction | reassignment
        pa.field("migration_id", pa.int64(), nullable=False),
        pa.field("record_time", TS, nullable=False),
        pa.field("synchronizer_id", pa.string()),
        pa.field("workflow_id", pa.string()),  # "" from the API becomes null
        pa.field("effective_at", TS),
        pa.field("root_event_ids", STR_LIST),
        pa.field("event_count", pa.int32(), nullable=False),
        pa.field("external_transaction_hash", pa.string()),
        pa.field("reassignment_kind", pa.string()),  # assign | unassign
        pa.field("source_synchronizer", pa.string()),
        pa.field("target_synchronizer", pa.string()),
        pa.field("unassign_id", pa.string()),
        pa.field("submitter", pa.string()),
        pa.field("reassignment_counter", pa.int64()),
        pa.field("update_data", pa.string(), nullable=False),  # the whole item as served, JSON
        pa.field("ingested_at", TS, nullable=False),
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("update_id", pa.string(), nullable=False),
        pa.field("event_id", pa.string()),  # null only for an unassignment (it has no event id)
        pa.field("event_index", pa.int32(), nullable=False),  # position in the tree's pre-order walk
        pa.field("parent_event_id", pa.string()),
        pa.field("event_type", pa.string(), nullable=False),  # created_event | exercised_event | unassigned_event
        pa.field("update_type", pa.string(), nullable=False),
        pa.field("migration_id", pa.int64(), nullable=False),
        pa.field("record_time", TS, nullable=False),
        pa.field("effective_at", TS),
        pa.field("synchronizer_id", pa.string()),
        pa.field("contract_id", pa.string()),
        pa.field("template_id", pa.string()),
        pa.field("package_name", pa.string()),
        pa.field("choice", pa.string()),
        pa.field("interface_id", pa.string()),
        pa.field("consuming", pa.bool_()),
        pa.field("acting_parties", STR_LIST),
        pa.field("child_event_ids", STR_LIST),
        pa.field("signatories", STR_LIST),
        pa.field("observers", STR_LIST),
        pa.field("create_arguments", pa.string()),  # Daml values as JSON text
        pa.field("choice_argument", pa.string()),
        pa.field("exercise_result", pa.string()),
        pa.field("created_at", TS),
        pa.field("reassignment_kind", pa.string()),
        pa.field("reassignment_counter", pa.int64()),
        pa.field("source_synchronizer", pa.string()),
        pa.field("target_synchronizer", pa.string()),
        pa.field("unassign_id", pa.string()),
        pa.field("submitter", pa.string()),
        pa.field("ingested_at", TS, nullable=False),
    ]
)

TABLES: dict[str, pa.Schema] = {"updates": UPDATES_SCHEMA, "events": EVENTS_SCHEMA}
METADATA_KEY_VERSION = b"scan_ingest.schema_version"


def with_metadata(schema: pa.Schema, extra: dict[str, str]) -> pa.Schema:
    meta = {METADATA_KEY_VERSION: SCHEMA_VERSION.encode()}
    meta.update({f"scan_ingest.{k}".encode(): v.encode() for k, v in extra.items()})
    return schema.with_metadata(meta)
