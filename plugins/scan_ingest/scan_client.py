"""HTTP client for the Canton Network Scan API (``/v2/updates`` paging, migration discovery).

What it guarantees, because the original pipeline lost data on each point:
- the cursor ``(after_migration_id, after_record_time)`` is sent as the exact strings the API
  returned, never re-formatted (a re-formatted µs cursor once dropped 0.1-0.3 % of updates);
- TLS is verified unless ``INSECURE_TLS=true`` (see ``tls.py``);
- transient failures are retried a few times in-call with real, jittered sleeps and fail over to
  the next *configured* URL that answers its health check, each time on a fresh HTTP session
  (stuck keep-alive sockets once hung the original); anything longer is Airflow's task retry;
- permanent failures raise at once with the URL, status and the start of the body.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import requests
import urllib3.exceptions

from scan_ingest.config import ScanConnectionConfig
from scan_ingest.exceptions import (
    DecodeError,
    ScanPermanentError,
    ScanRangeNotAvailableError,
    ScanTransientError,
)
from scan_ingest.timestamps import TimestampError, format_us, parse_us
from scan_ingest.tls import requests_verify

log = logging.getLogger(__name__)

RETRY_AFTER_CAP_S = 30.0
BASE_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
BODY_SNIPPET = 300


class IngestCancelledError(Exception):
    """Raised inside a running fetch when the task is being killed (``on_kill``)."""


_NUMBER_START = frozenset(b":[, \n\r\t")
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_RUN = b"0" * 19
_CHUNK = 1 << 20


def _may_hold_big_int(content: bytes) -> bool:
    """A JSON number of 20+ digits, or a negative one of 19+, may be in the body (not a digit run
    inside a string such as a contract id): beyond 64 bits orjson would make it a float.

    Why this shape: a regex over a 19 MB page cost more than decoding it. Digits are mapped to
    ``0`` (``bytes.translate``, 1 MiB at a time to keep no second copy of the page) and 19-digit
    runs found by C substring search; only those runs, rare in practice, are looked at in Python.
    """
    n = len(content)
    pos = 0
    while pos < n:
        lo = max(0, pos - 40)  # overlap: a run crossing the chunk boundary is seen whole
        zeros = content[lo : pos + _CHUNK].translate(_DIGITS_AS_ZERO)
        found = zeros.find(_RUN)
        while found >= 0:
            i = lo + found
            # A hit inside a longer run has a digit before it, which is neither case below.
            before = content[i - 1] if i else None
            if before is None or before in _NUMBER_START:
                if content[i + 19 : i + 20].isdigit():  # a 20th digit
                    return True
            elif before == 0x2D and (i < 2 or content[i - 2] in _NUMBER_START):  # "-" starting a number
                return True
            found = zeros.find(_RUN, found + 19)
        pos += _CHUNK
    return False


def decode_json(content: bytes) -> Any:
    """orjson for speed; the stdlib where a number may exceed 64 bits (orjson would make it a float)."""
    if _may_hold_big_int(content):
        return json.loads(content)
    return orjson.loads(content)


def read_body(resp: requests.Response) -> bytes:
    """The whole body of a ``stream=True`` response in one read, then the connection is released.

    Why: ``Response.content`` reads in 10 KiB chunks through several Python layers, which cost
    several times the CPU of the read itself for a 20 MB page. Errors are mapped exactly as
    ``Response.iter_content`` maps them, so callers see the same exception types as before.
    """
    try:
        return resp.raw.read(decode_content=True)
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    finally:
        resp.close()  # returns a fully read connection to the pool, drops a broken one


def item_migration_id(item: dict[str, Any]) -> int:
    """Migration of an update item; reassignments carry it in ``event.migration_id`` only."""
    mig = item.get("migration_id")
    if mig is None:
        event = item.get("event")
        if isinstance(event, dict):
            mig = event.get("migration_id")
    if not isinstance(mig, int) or isinstance(mig, bool):
        raise DecodeError(
            f"update {item.get('update_id')!r}: field migration_id (or event.migration_id for a "
            f"reassignment) is missing or not an integer: {mig!r}"
        )
    return mig


def item_record_time_us(item: dict[str, Any]) -> int:
    try:
        return parse_us(item["record_time"])
    except KeyError:
        raise DecodeError(f"update {item.get('update_id')!r}: field record_time is missing") from None
    except TimestampError as exc:
        raise DecodeError(f"update {item.get('update_id')!r}: field record_time: {exc}") from None


@dataclass(frozen=True)
class MigrationInfo:
    migration_id: int
    previous_migration_id: int | None
    ranges: tuple[tuple[str, int, int], ...]  # (synchronizer_id, min_us, max_us)
    complete: bool

    @property
    def min_us(self) -> int | None:
        return min((r[1] for r in self.ranges), default=None)

    @property
    def max_us(self) -> int | None:
        return max((r[2] for r in self.ranges), default=None)


@dataclass
class FetchStats:
    pages: int = 0
    requests: int = 0
    retries: int = 0
    failovers: int = 0
    bytes: int = 0


class ScanClient:
    """A client bound to the configured list of Scan base URLs.

    Not thread-safe: one client per task. ``cancel()`` may be called from a signal handler or
    another thread; waits end at once and the next request raises ``IngestCancelledError``.
    """

    def __init__(self, config: ScanConnectionConfig, *, daml_value_encoding: str | None = None) -> None:
        self.config = config
        self.daml_value_encoding = daml_value_encoding
        self._verify = requests_verify(config.ca_bundle)
        self._last_page_size = config.page_size
        self._url_index = 0
        self._session: requests.Session | None = None
        self._cancelled = threading.Event()
        self.stats = FetchStats()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.config.base_urls[self._url_index]

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def cancel(self) -> None:
        self._cancelled.set()
        self.close()

    def __enter__(self) -> ScanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_session(self) -> requests.Session:
        self.close()
        session = requests.Session()
        session.verify = self._verify
        session.headers.update({"Content-Type": "application/json", "Accept": "application/json"})
        # Proxies and CA bundles come from the connection only, not from the worker's environment.
        session.trust_env = False
        self._session = session
        return session

    def _sleep(self, seconds: float) -> None:
        # A real, interruptible sleep: Event.wait blocks in the kernel, it never spins.
        if self._cancelled.wait(max(0.0, seconds)):
            raise IngestCancelledError("cancelled while waiting to retry")

    # -- failover ----------------------------------------------------------------------------
    def is_healthy(self, base_url: str) -> bool:
        """``GET /readyz`` (or ``/v0/dso`` where readyz is not exposed) within a short timeout."""
        with requests.Session() as probe:
            probe.verify = self._verify
            probe.trust_env = False
            for path in ("/readyz", "/v0/dso"):
                try:
                    resp = probe.get(base_url + path, timeout=self.config.health_timeout)
                except requests.RequestException as exc:
                    log.info("health probe %s%s failed: %s", base_url, path, exc)
                    return False
                if resp.status_code == 404 and path == "/readyz":
                    continue
                return resp.status_code == 200
        return False

    def _fail_over(self, reason: str) -> None:
        """Move to the next configured URL that answers healthy; stay if none does."""
        urls = self.config.base_urls
        self.close()  # always a fresh session after a transient failure
        if len(urls) == 1:
            return
        for step in range(1, len(urls) + 1):
            candidate = (self._url_index + step) % len(urls)
            if candidate == self._url_index:
                break
            if self.is_healthy(urls[candidate]):
                log.warning("failing over from %s to %s after: %s", self.base_url, urls[candidate], reason)
                self._url_index = candidate
                self.stats.failovers += 1
                return
        log.warning("no other configured Scan URL is healthy; staying on %s after: %s", self.base_url, reason)

    # -- requests ----------------------------------------------------------------------------
    def request_json(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        not_found_ok: bool = False,
        on_timeout: Any = None,
    ) -> Any:
        """One API call with in-call retries and failover. Returns decoded JSON (None on an allowed 404)."""
        attempts = self.config.in_call_retries + 1
        last_error = ""
        for attempt in range(attempts):
            if self._cancelled.is_set():
                raise IngestCancelledError("cancelled")
            if body is not None and on_timeout is not None:
                body = on_timeout(body, None)
            url = self.base_url + path
            session = self._session or self._new_session()
            delay: float | None = None
            self.stats.requests += 1
            try:
                resp = session.request(
                    method,
                    url,
                    data=orjson.dumps(body) if body is not None else None,
                    timeout=self.config.timeout,
                    stream=True,
                )
                content = read_body(resp)
            except requests.Timeout as exc:
                last_error = f"timeout after {self.config.timeout}s at {url}: {exc}"
                if body is not None and on_timeout is not None:
                    body = on_timeout(body, exc)
            except requests.RequestException as exc:
                if self._cancelled.is_set():
                    raise IngestCancelledError("cancelled") from None
                last_error = f"{type(exc).__name__} at {url}: {exc}"
                if isinstance(exc, requests.exceptions.SSLError):
                    # A certificate problem does not fix itself; never retry it into success.
                    raise ScanPermanentError(
                        f"TLS verification failed for {url}: {exc}. Add the server's CA to the connection "
                        f"extra 'ca_bundle' (INSECURE_TLS=true disables verification; not recommended)."
                    ) from None
            else:
                status = resp.status_code
                snippet = content[:BODY_SNIPPET].decode("utf-8", "replace")
                if status == 200:
                    try:
                        data = decode_json(content)
                    except ValueError:
                        last_error = f"undecodable JSON body from {url} (HTTP 200, {len(content)} bytes): {snippet!r}"
                    else:
                        self.stats.bytes += len(content)
                        return data
                elif status == 404 and not_found_ok:
                    return None
                elif status == 429 or status >= 500:
                    last_error = f"HTTP {status} from {url}: {snippet!r}"
                    retry_after = resp.headers.get("Retry-After")
                    if status == 429 and retry_after:
                        try:
                            delay = float(retry_after)
                        except ValueError:
                            delay = None
                        if delay is not None and delay > RETRY_AFTER_CAP_S:
                            raise ScanTransientError(
                                f"{last_error}; Retry-After {delay:.0f}s is longer than an in-call wait, "
                                "leaving it to the task retry"
                            )
                else:
                    raise ScanPermanentError(
                        f"HTTP {status} from {method} {url} (body {body!r:.200}): {snippet!r}"
                    )
            # transient: back off (real sleep) and fail over before the next attempt
            self.stats.retries += 1
            if attempt + 1 >= attempts:
                break
            if delay is None:
                delay = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2**attempt) * (0.5 + random.random() / 2)
            log.warning("transient Scan error (attempt %d/%d): %s; retrying in %.1fs", attempt + 1, attempts, last_error, delay)
            self._fail_over(last_error)
            self._sleep(delay)
        if last_error.startswith("undecodable JSON"):
            raise ScanPermanentError(f"{last_error} (persisted over {attempts} attempts)")
        raise ScanTransientError(f"Scan API still failing after {attempts} attempts: {last_error}")

    # -- endpoints ---------------------------------------------------------------------------
    def migration_info(self, migration_id: int) -> MigrationInfo | None:
        """``POST /v0/backfilling/migration-info``; None when the Scan has no such migration (404)."""
        data = self.request_json(
            "POST", "/v0/backfilling/migration-info", {"migration_id": migration_id}, not_found_ok=True
        )
        if data is None:
            return None
        try:
            ranges = tuple(
                (r["synchronizer_id"], parse_us(r["min"]), parse_us(r["max"])) for r in data["record_time_range"]
            )
            return MigrationInfo(
                migration_id=migration_id,
                previous_migration_id=data.get("previous_migration_id"),
                ranges=ranges,
                complete=bool(data.get("complete")),
            )
        except (KeyError, TypeError, TimestampError) as exc:
            raise ScanPermanentError(f"unexpected migration-info answer for {migration_id} from {self.base_url}: {exc}: {data!r:.300}") from None

    def discover_migrations(self, max_migrations: int = 1000) -> list[MigrationInfo]:
        """All migrations from 0 upwards until the first 404 (the documented discovery rule)."""
        found: list[MigrationInfo] = []
        for mig in range(max_migrations):
            info = self.migration_info(mig)
            if info is None:
                break
            found.append(info)
        return found

    def updates_page(self, after: tuple[int, str] | None, page_size: int) -> list[dict[str, Any]]:
        """One ``POST /v2/updates`` page after the cursor ``(migration_id, record_time string)``."""
        state = {"size": page_size}

        def adapt(body: dict[str, Any], outcome: Any) -> dict[str, Any]:
            # Halve the page on each timeout at this cursor (a huge page once looped forever);
            # the caller's next page starts again from the configured size.
            if outcome is not None and outcome != "success":
                state["size"] = max(1, state["size"] // 2)
                log.warning("page request timed out; page_size %d -> %d", body["page_size"], state["size"])
            return {**body, "page_size": state["size"]}

        body: dict[str, Any] = {"page_size": page_size}
        if self.daml_value_encoding:
            body["daml_value_encoding"] = self.daml_value_encoding
        if after is not None:
            body["after"] = {"after_migration_id": after[0], "after_record_time": after[1]}
        data = self.request_json("POST", "/v2/updates", body, on_timeout=adapt)
        try:
            items = data["transactions"]
        except (KeyError, TypeError):
            raise ScanPermanentError(
                f"unexpected /v2/updates answer from {self.base_url}: no 'transactions' list: {str(data)[:300]!r}"
            ) from None
        if not isinstance(items, list):
            raise ScanPermanentError(f"/v2/updates from {self.base_url}: 'transactions' is not a list")
        self.stats.pages += 1
        self._last_page_size = state["size"]
        return items

    def range_available(self, migration_id: int, end_us: int) -> bool:
        """Whether this Scan holds every update of ``migration_id`` up to ``end_us``."""
        info = self.migration_info(migration_id)
        if info is None:
            return False
        if info.max_us is not None and info.max_us >= end_us:
            return True
        # A later migration exists: this one is closed, nothing more will be added to it.
        return self.migration_info(migration_id + 1) is not None

    def iter_range(
        self,
        migration_id: int,
        start_us: int,
        end_us: int,
        *,
        after_record_time: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield pages of the items of one migration with ``start_us < record_time <= end_us``.

        ``after_record_time`` resumes inside the range from a record time string the API returned.
        Ends on the first item past the range; a short page without such an item is accepted as
        the end only if this Scan confirms it holds the range (else ``ScanRangeNotAvailableError``).
        """
        size = page_size or self.config.page_size
        cursor: tuple[int, str] = (migration_id, after_record_time or format_us(start_us))
        while True:
            items = self.updates_page(cursor, size)
            in_range: list[dict[str, Any]] = []
            finished = False
            for item in items:
                if not isinstance(item, dict):
                    raise DecodeError(f"/v2/updates returned a non-object item after cursor {cursor}: {item!r:.200}")
                mig = item_migration_id(item)
                if mig != migration_id:
                    if mig < migration_id:
                        raise ScanPermanentError(
                            f"Scan at {self.base_url} returned update {item.get('update_id')!r} of migration {mig} "
                            f"after cursor {cursor}: ordering contract violated"
                        )
                    finished = True
                    break
                rt = item_record_time_us(item)
                if rt > end_us:
                    finished = True
                    break
                if rt <= start_us:
                    raise ScanPermanentError(
                        f"Scan at {self.base_url} returned update {item.get('update_id')!r} at {item['record_time']} "
                        f"which is not after the cursor {cursor}"
                    )
                in_range.append(item)
            if in_range:
                yield in_range
                last = in_range[-1]
                cursor = (migration_id, last["record_time"])  # verbatim string, never re-formatted
            if finished:
                return
            short_page = len(items) < self._last_page_size
            # Drop this page before fetching the next: two decoded pages would double peak memory.
            del items, in_range
            if short_page:
                if self.range_available(migration_id, end_us):
                    return
                raise ScanRangeNotAvailableError(
                    f"Scan at {self.base_url} does not yet hold migration {migration_id} up to "
                    f"{format_us(end_us)} (last cursor {cursor[1]}); will retry"
                )
