"""Airflow tasks of the ingestion DAGs. DAG files only wire these together.

Heavy imports (pyarrow, the Google provider) happen inside the tasks, not at DAG parse time.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Asset, BaseHook, BaseOperator, Variable, task

from scan_ingest.config import IngestSettings, ScanConnectionConfig
from scan_ingest.exceptions import ConfigError
from scan_ingest.retry import io_task_defaults

log = logging.getLogger(__name__)

UPDATES_ASSET = Asset(name="canton_scan_updates")
EVENTS_ASSET = Asset(name="canton_scan_events")

# Priorities with weight_rule="absolute": finishing delivery of written files beats starting new
# writes (the default "downstream" rule would favour upstream tasks, i.e. more writing).
PRIORITY = {"plan": 1, "fetch_write": 2, "upload": 10, "verify": 20, "commit": 30}


def load_settings() -> IngestSettings:
    return IngestSettings.from_variables(lambda name, default: Variable.get(name, default=default))


def scan_config(conn_id: str) -> ScanConnectionConfig:
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - Airflow raises several types for a missing connection
        raise ConfigError(
            f"Airflow connection {conn_id!r} is not defined: create it (conn_type http, host = the Scan base URL "
            f"including /api/scan), e.g. AIRFLOW_CONN_{conn_id.upper()}='{{\"conn_type\": \"http\", \"host\": "
            f"\"https://scan.example.org/api/scan\"}}' ({exc})"
        ) from None
    return ScanConnectionConfig.from_connection(conn)


def resolve_interval(context: Any, range_us: int) -> tuple[int, int, int | None]:
    """``(start_us, end_us, migration_filter)`` from the Params of a manual run or the data interval."""
    from scan_ingest.ranges import check_interval
    from scan_ingest.timestamps import TimestampError, from_datetime, parse_us

    params = context.get("params") or {}
    start, end, mig = params.get("start"), params.get("end"), params.get("migration_id")
    if start or end:
        if not (start and end):
            raise ConfigError("Params start and end must be given together (ISO-8601 record times, e.g. 2025-03-01T00:00:00Z)")
        try:
            start_us, end_us = parse_us(str(start)), parse_us(str(end))
        except TimestampError as exc:
            raise ConfigError(f"invalid Param: {exc}") from None
    else:
        dis, die = context.get("data_interval_start"), context.get("data_interval_end")
        if dis is None or die is None or dis == die:
            raise ConfigError(
                "this run has no data interval: trigger it with Params start and end, or use a backfill/scheduled run"
            )
        start_us, end_us = from_datetime(dis), from_datetime(die)
    check_interval(start_us, end_us, range_us)
    if mig is not None and mig != "":
        try:
            mig = int(mig)
        except (TypeError, ValueError):
            raise ConfigError(f"Param migration_id must be an integer, got {mig!r}") from None
    else:
        mig = None
    return start_us, end_us, mig


# -- live edge ----------------------------------------------------------------------------------
def scan_has_passed(context: Any) -> bool:
    """Sensor condition: the Scan already holds records at or after the interval end."""
    from scan_ingest.scan_client import ScanClient
    from scan_ingest.timestamps import format_us

    settings = load_settings()
    start_us, end_us, _ = resolve_interval(context, settings.range_us)
    with ScanClient(scan_config(settings.scan_conn_id)) as client:
        migrations = client.discover_migrations()
    if not migrations:
        log.info("the Scan reports no migrations yet; waiting")
        return False
    latest = migrations[-1].max_us
    if latest is not None and latest >= end_us:
        log.info("Scan holds records up to %s >= interval end %s: the interval is closed", format_us(latest), format_us(end_us))
        return True
    log.info("Scan's latest record time %s is before the interval end %s: waiting (slot released)",
             format_us(latest) if latest is not None else "none", format_us(end_us))
    return False


# -- planning -----------------------------------------------------------------------------------
PLAN_XCOM_KEY = "interval"


def plan_interval(context: Any) -> list[dict[str, Any]]:
    """Cells to map over (the return value); the interval itself goes to XCom key ``interval``."""
    from scan_ingest.ranges import plan_cells
    from scan_ingest.scan_client import ScanClient
    from scan_ingest.timestamps import format_us

    settings = load_settings()
    start_us, end_us, mig_filter = resolve_interval(context, settings.range_us)
    with ScanClient(scan_config(settings.scan_conn_id)) as client:
        migrations = client.discover_migrations()
    known = [m.migration_id for m in migrations]
    if mig_filter is not None and mig_filter not in known:
        raise ConfigError(f"Param migration_id={mig_filter} is not a migration of this Scan (known: {known})")
    selected = [(m.migration_id, m.min_us, m.max_us) for m in migrations if mig_filter in (None, m.migration_id)]
    cells = plan_cells(start_us, end_us, settings.range_us, selected)
    from airflow.configuration import conf

    max_map = conf.getint("core", "max_map_length", fallback=1024)
    if len(cells) > max_map:
        raise ConfigError(
            f"the interval needs {len(cells)} cells, more than [core] max_map_length={max_map}: split it into "
            "shorter manual runs (or raise scan_ingest_range_minutes)"
        )
    log.info("interval (%s, %s]: %d cell(s) over migrations %s",
             format_us(start_us), format_us(end_us), len(cells), sorted({c.migration_id for c in cells}))
    context["ti"].xcom_push(
        key=PLAN_XCOM_KEY,
        value={"start": format_us(start_us), "end": format_us(end_us), "migration_filter": mig_filter, "migrations": known},
    )
    return [c.to_dict() for c in cells]


# -- fetch + write --------------------------------------------------------------------------------
class _TaskStateCheckpoint:
    """Checkpoint in Airflow's task state store: kept across retries, dropped when the task is cleared."""

    KEY = "scan_ingest_checkpoint"

    def __init__(self, context: Any) -> None:
        self._store = context.get("task_state_store")

    def load(self) -> dict[str, Any] | None:
        if self._store is None:
            return None
        try:
            value = self._store.get(self.KEY)
        except Exception:  # a missing store only costs a full refetch
            log.warning("task state store unavailable; the cell starts afresh", exc_info=True)
            return None
        return value if isinstance(value, dict) else None

    def save(self, value: dict[str, Any]) -> None:
        if self._store is not None:
            try:
                self._store.set(self.KEY, value)
            except Exception:  # progress still lands in staging; only resumption is lost
                log.warning("could not save the checkpoint", exc_info=True)


class FetchWriteOperator(BaseOperator):
    """Fetch one cell from the Scan and stage it as Parquet (pool ``parquet_writer``).

    Killable at any instant: ``on_kill`` (SIGTERM, UI "mark failed", timeout) cancels the fetch,
    which removes the temp files of the part in progress before the task ends; after SIGKILL the
    next attempt removes them. Completed parts are checkpointed, so a retry resumes after them.
    Before starting, the task waits (rescheduled, no slot held) while the staging directory holds
    more unverified bytes than ``scan_ingest_staging_budget_bytes``.
    """

    template_fields = ("cell",)
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        cell: dict[str, Any],
        page_size: int | None = None,
        backpressure_wait: timedelta = timedelta(seconds=20),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if page_size is not None and not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be within 1..1000, got {page_size}")
        self.cell = cell
        self.page_size = page_size
        self.backpressure_wait = backpressure_wait
        self._cancelled = threading.Event()
        self._client: Any = None
        self._executing = False

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowRescheduleException

        from scan_ingest.ingest import ingest_cell
        from scan_ingest.ranges import Cell
        from scan_ingest.scan_client import ScanClient
        from scan_ingest.staging import staging_usage
        from scan_ingest.timestamps import from_datetime

        settings = load_settings()
        usage = staging_usage(settings.staging_dir)
        if usage.bytes > settings.staging_budget_bytes:
            log.info(
                "staging holds %d unverified bytes in %d files, over the budget of %d: waiting %ss for uploads "
                "to catch up (rescheduled, no worker slot held)",
                usage.bytes, usage.files, settings.staging_budget_bytes, self.backpressure_wait.total_seconds(),
            )
            raise AirflowRescheduleException(reschedule_date=datetime.now(UTC) + self.backpressure_wait)
        cell = Cell.from_dict(self.cell)
        started = datetime.now(UTC)
        self._cancelled = threading.Event()  # a fresh one per try: the operator object may be reused
        self._client = ScanClient(scan_config(settings.scan_conn_id), daml_value_encoding=settings.daml_value_encoding)
        self._executing = True
        try:
            result = ingest_cell(
                self._client,
                cell,
                settings,
                ingested_at_us=from_datetime(started),
                checkpoint=_TaskStateCheckpoint(context),
                cancelled=self._cancelled,
                page_size=self.page_size,
            )
        finally:
            self._executing = False
            self._client.close()
        _emit_metrics("fetch_write", {"updates": result.updates, "events": result.events,
                                      "files": len(result.files), "pages": result.pages,
                                      "retries": result.retries, "seconds": result.seconds})
        return result.to_xcom()

    def on_kill(self) -> None:
        from scan_ingest.scan_client import IngestCancelledError

        self._cancelled.set()
        if self._client is not None:
            self._client.cancel()
        # Under SIGTERM Airflow only calls on_kill and lets the task run on; raising here (in the
        # main thread, from the signal handler) unwinds execute() now, removing temp files on the way.
        if self._executing and threading.current_thread() is threading.main_thread():
            raise IngestCancelledError(f"{self.task_id}: killed; temp files removed, completed parts kept")


def _emit_metrics(stage: str, figures: dict[str, float]) -> None:
    try:
        from airflow.sdk.observability.stats import Stats

        for name, value in figures.items():
            if name == "seconds":
                Stats.timing(f"scan_ingest.{stage}.duration", timedelta(seconds=value))
            else:
                Stats.incr(f"scan_ingest.{stage}.{name}", count=int(value))
    except Exception:  # metrics must never fail the data path
        log.debug("metrics not emitted", exc_info=True)


# -- upload / verify / commit -----------------------------------------------------------------
def upload_files(result: dict[str, Any]) -> dict[str, Any]:
    from scan_ingest.delivery import upload_cell
    from scan_ingest.gcs import get_hook

    settings = load_settings()
    return upload_cell(get_hook(settings.gcp_conn_id), result, num_max_attempts=settings.upload_attempts)


def verify_files(result: dict[str, Any]) -> dict[str, Any]:
    from scan_ingest.delivery import verify_cell
    from scan_ingest.gcs import get_hook

    settings = load_settings()
    return verify_cell(get_hook(settings.gcp_conn_id), result)


def commit_files(verified: Any, context: Any) -> dict[str, Any]:
    from scan_ingest.commit import commit_interval
    from scan_ingest.gcs import get_hook, require_bucket
    from scan_ingest.timestamps import parse_us

    settings = load_settings()
    plan = context["ti"].xcom_pull(task_ids="plan", key=PLAN_XCOM_KEY)
    if not plan:
        raise ConfigError("the plan task's interval is missing from XCom: clear the whole run, starting at plan")
    hook = get_hook(settings.gcp_conn_id)
    require_bucket(hook, settings.bucket)
    # A mapped task group with a single instance hands over that instance's result, not a list.
    results = [verified] if isinstance(verified, dict) else list(verified or [])
    manifest = commit_interval(
        hook,
        bucket=settings.bucket,
        prefix=settings.prefix,
        start_us=parse_us(plan["start"]),
        end_us=parse_us(plan["end"]),
        migration_filter=plan["migration_filter"],
        migrations=plan["migrations"],
        results=results,
        run_id=str(context.get("run_id")),
    )
    totals = manifest["totals"]
    extra = {"interval_start": plan["start"], "interval_end": plan["end"], "updates": totals["updates"],
             "events": totals["events"], "files": totals["files"], "bucket": settings.bucket, "prefix": settings.prefix}
    outlet_events = context.get("outlet_events")
    if outlet_events is not None:
        outlet_events[UPDATES_ASSET].extra = extra
        outlet_events[EVENTS_ASSET].extra = extra
    _emit_metrics("interval", {k: totals[k] for k in ("updates", "events", "files", "bytes", "in_call_retries")})
    return {"manifest": manifest["interval"], "totals": totals}


# -- repair ---------------------------------------------------------------------------------------
def repair_list(context: Any) -> list[str]:
    from scan_ingest.repair import find_unverified

    settings = load_settings()
    params = context.get("params") or {}
    found = find_unverified(
        settings.staging_dir,
        min_age_s=float(params.get("min_age_minutes", 30)) * 60,
        limit=int(params.get("limit", 500)),
    )
    log.info("%d staged file(s) to repair in %s", len(found), settings.staging_dir)
    return found


def repair_staged_file(sidecar: str) -> dict[str, Any]:
    from scan_ingest.gcs import get_hook
    from scan_ingest.repair import repair_one

    settings = load_settings()
    return repair_one(get_hook(settings.gcp_conn_id), sidecar, num_max_attempts=settings.upload_attempts)


def repair_report(listed: list[str], repaired: Any) -> dict[str, Any]:
    from scan_ingest.exceptions import VerificationError
    from scan_ingest.repair import summarise

    summary = summarise(list(listed or []), [r for r in (repaired or []) if r])
    log.info("repaired %d of %d staged file(s) (%d bytes)", len(summary["repaired"]), summary["listed"], summary["bytes"])
    for uri in summary["repaired"]:
        log.info("  repaired: %s", uri)
    for path in summary["still_failing"]:
        log.error("  still failing (kept on disk): %s", path)
    if summary["still_failing"]:
        raise VerificationError(f"{len(summary['still_failing'])} staged file(s) could not be repaired; see the repair task logs")
    return summary


def task_kwargs(stage: str, pool: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Common task arguments: retries with exponential backoff, priority, pool.

    ``SCAN_INGEST_RETRIES`` and ``SCAN_INGEST_RETRY_DELAY_SECONDS`` (environment, read at parse time)
    tune the retry schedule: delay x2 per try, capped at 30 minutes.
    """
    import os

    retries = int(os.environ.get("SCAN_INGEST_RETRIES", "6"))
    delay = timedelta(seconds=float(os.environ.get("SCAN_INGEST_RETRY_DELAY_SECONDS", "30")))
    kwargs: dict[str, Any] = {
        **io_task_defaults(retries=retries, retry_delay=delay),
        "priority_weight": PRIORITY[stage],
        "weight_rule": "absolute",
    }
    if pool:
        kwargs["pool"] = pool
    kwargs.update(overrides)
    return kwargs


__all__ = [
    "EVENTS_ASSET",
    "UPDATES_ASSET",
    "FetchWriteOperator",
    "commit_files",
    "plan_interval",
    "repair_list",
    "repair_report",
    "repair_staged_file",
    "scan_has_passed",
    "task",
    "task_kwargs",
    "upload_files",
    "verify_files",
]
