"""Benchmark stages, each run in its own child process: ``python bench/stages.py STAGE CONFIG OUT``.

A fresh process per stage keeps the figures apart: its CPU time and peak RSS (``getrusage`` of the
process itself) belong to that stage alone, and nothing warmed up by one stage helps the next.
CONFIG and OUT are JSON files; the parent (``run_bench.py``) writes the first and reads the second.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The repo root first: an installed package also ships a top-level ``tools`` package.
for _p in (str(REPO / "plugins"), str(REPO)):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Clock:
    """Wall and CPU (all threads of this process) between start() and stop()."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def _updates_session() -> Any:
    import requests

    session = requests.Session()  # as ScanClient builds it: one session, reused for every page
    session.headers.update({"Content-Type": "application/json", "Accept": "application/json"})
    session.trust_env = False
    return session


# -- (0) the simulator alone --------------------------------------------------------------------
def stage_sim_only(cfg: dict[str, Any]) -> dict[str, Any]:
    """Pages/s the simulator serves when the client does nothing but read the bytes.

    The cursor for the next page is cut out of the body's last ``record_time`` (no JSON decoding),
    so this is the rate of the simulator plus HTTP, the ceiling over the decode limit.
    """
    import orjson
    from scan_ingest.timestamps import format_us

    url = cfg["base_url"] + "/v2/updates"
    page_size = int(cfg["page_size"])
    mig = int(cfg["migration_id"])
    end = format_us(int(cfg["end_us"])).encode()
    session = _updates_session()
    cursor = format_us(int(cfg["start_us"]))
    pages = nbytes = 0
    marker = b'"record_time":"'
    with _Clock() as clock:
        while True:
            body = {"page_size": page_size, "after": {"after_migration_id": mig, "after_record_time": cursor}}
            content = session.post(url, data=orjson.dumps(body), timeout=60).content
            pages += 1
            nbytes += len(content)
            at = content.rfind(marker)
            if at < 0:
                break
            last = content[at + len(marker): content.index(b'"', at + len(marker))]
            # A reassignment's record_time precedes its event object, so the last marker in the
            # body belongs to the last item; a short page or one past the end is the last page.
            if last > end or content.count(b'"update_id":"') < page_size:
                break
            cursor = last.decode()
    session.close()
    return {"pages": pages, "json_bytes": nbytes, "wall_s": clock.wall, "cpu_s": clock.cpu,
            "peak_rss_mib": _peak_rss_mib()}


# -- (1) decode limit ---------------------------------------------------------------------------
def stage_decode(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fetch every page of the range and ``orjson.loads`` it: the floor any ingestion stands on.

    Same request body, page size, headers and one reused session as ``ScanClient``; the only
    per-item work is finding the range end on the last page and counting events. ``read``:
    ``content`` is plain ``requests`` (``Response.content``, the definition of the limit);
    ``single`` reads each body in one call as ``ScanClient`` does (``scan_client.read_body``).
    """
    import orjson
    from scan_ingest.scan_client import read_body
    from scan_ingest.timestamps import format_us

    single = cfg.get("read", "content") == "single"

    url = cfg["base_url"] + "/v2/updates"
    page_size = int(cfg["page_size"])
    mig = int(cfg["migration_id"])
    end = format_us(int(cfg["end_us"]))  # fixed-width strings: compare as text, no parsing
    session = _updates_session()
    cursor = format_us(int(cfg["start_us"]))
    updates = events = pages = nbytes = 0
    baseline = _current_rss_mib()
    with _Clock() as clock:
        while True:
            body = {"page_size": page_size, "after": {"after_migration_id": mig, "after_record_time": cursor}}
            resp = session.post(url, data=orjson.dumps(body), timeout=60, stream=single)
            content = read_body(resp) if single else resp.content
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {content[:200]!r}")
            items = orjson.loads(content)["transactions"]
            pages += 1
            nbytes += len(content)
            done = len(items) < page_size
            if items and (items[-1]["record_time"] > end or items[-1].get("migration_id", mig) != mig):
                items = [i for i in items if i["record_time"] <= end and i.get("migration_id", mig) == mig]
                done = True
            updates += len(items)
            events += sum(len(i["events_by_id"]) if "events_by_id" in i else 1 for i in items)
            if done or not items:
                break
            cursor = items[-1]["record_time"]
    session.close()
    return {
        "updates": updates, "events": events, "pages": pages, "json_bytes": nbytes,
        "wall_s": clock.wall, "cpu_s": clock.cpu, "peak_rss_mib": _peak_rss_mib(), "baseline_rss_mib": baseline,
    }


# -- (2) ingest core ----------------------------------------------------------------------------
def stage_core(cfg: dict[str, Any]) -> dict[str, Any]:
    """``scan_ingest.ingest.ingest_cell`` over the planned cells of the range, one after another."""
    from scan_ingest.config import IngestSettings, ScanConnectionConfig
    from scan_ingest.ingest import ingest_cell
    from scan_ingest.ranges import plan_cells
    from scan_ingest.scan_client import ScanClient

    settings = IngestSettings(
        bucket="bench",
        prefix=cfg["prefix"],
        staging_dir=cfg["staging_dir"],
        range_minutes=int(cfg["range_minutes"]),
        rows_per_part=int(cfg["rows_per_part"]),
        row_group_rows=int(cfg["row_group_rows"]),
    )
    start_us, end_us = int(cfg["start_us"]), int(cfg["end_us"])
    baseline = _current_rss_mib()
    results = []
    with ScanClient(ScanConnectionConfig(base_urls=(cfg["base_url"],))) as client:
        migrations = [(m.migration_id, m.min_us, m.max_us) for m in client.discover_migrations()]
        cells = plan_cells(start_us, end_us, settings.range_us, [m for m in migrations if m[0] == cfg["migration_id"]])
        with _Clock() as clock:
            for cell in cells:
                results.append(ingest_cell(client, cell, settings, ingested_at_us=int(cfg["ingested_at_us"])))
    files = [{"path": f.local_path, "table": f.table, "rows": f.rows, "size": f.size} for r in results for f in r.files]
    return {
        "cells": len(cells),
        "updates": sum(r.updates for r in results),
        "events": sum(r.events for r in results),
        "pages": sum(r.pages for r in results),
        "json_bytes": sum(r.bytes_fetched for r in results),
        "output_bytes": sum(f["size"] for f in files),
        "files": files,
        "wall_s": clock.wall, "cpu_s": clock.cpu, "peak_rss_mib": _peak_rss_mib(), "baseline_rss_mib": baseline,
    }


# -- Parquet size against plain pyarrow ---------------------------------------------------------
def stage_compare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Rewrite each staged file's rows with ``pq.write_table(..., compression="zstd")`` defaults."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ours = plain = 0
    per_table: dict[str, dict[str, int]] = {}
    for f in cfg["files"]:
        table = pq.read_table(f["path"])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        size = sink.getvalue().size
        del table, sink
        ours += f["size"]
        plain += size
        t = per_table.setdefault(f["table"], {"ours": 0, "pyarrow_zstd_defaults": 0})
        t["ours"] += f["size"]
        t["pyarrow_zstd_defaults"] += size
    return {"ours_bytes": ours, "pyarrow_zstd_defaults_bytes": plain, "per_table": per_table}


# -- (3) end to end under dag.test() ------------------------------------------------------------
def stage_dag_test(cfg: dict[str, Any]) -> dict[str, Any]:
    """The whole ``scan_updates`` DAG through ``dag.test()`` (tasks run in this process).

    The parent has set AIRFLOW_HOME, the connections and Variables in this process's environment.
    """
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.db import initdb

    with _Clock() as setup:
        initdb()
        bag = DagBag(dag_folder=str(REPO / "dags"))
        if bag.import_errors:
            raise RuntimeError(f"DAG import errors: {bag.import_errors}")
        dag = bag.dags["scan_updates"]
    baseline = _current_rss_mib()
    with _Clock() as clock:
        dr = dag.test(run_conf={"start": cfg["start"], "end": cfg["end"]})
    if dr.state != "success":
        raise RuntimeError(f"dag.test() ended in state {dr.state}")
    return {
        "state": str(dr.state), "setup_s": setup.wall, "tasks_s": _task_seconds(dr),
        "wall_s": clock.wall, "cpu_s": clock.cpu, "peak_rss_mib": _peak_rss_mib(), "baseline_rss_mib": baseline,
    }


def _task_seconds(dr: Any) -> dict[str, float]:
    """Seconds each task (summed over map indexes) of the run spent running, from the metadata DB."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    out: dict[str, float] = {}
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dr.dag_id, TaskInstance.run_id == dr.run_id)
        for ti in tis:
            if ti.start_date and ti.end_date:
                out[ti.task_id] = out.get(ti.task_id, 0.0) + (ti.end_date - ti.start_date).total_seconds()
    return out


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sim_only": stage_sim_only,
    "decode": stage_decode,
    "core": stage_core,
    "compare": stage_compare,
    "dag_test": stage_dag_test,
}


def main(argv: list[str]) -> int:
    stage, cfg_path, out_path = argv
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    result = STAGES[stage](cfg)
    with open(out_path, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
