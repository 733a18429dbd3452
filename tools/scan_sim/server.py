"""HTTP(S) server that answers like a Canton Scan (``/api/scan/...``) from a simulated ``Ledger``.

Built on the stdlib ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive. Responses are written as
pre-joined bytes (status line and headers in one small write, body in one ``sendall``) with
TCP_NODELAY, so a page never waits on Nagle/delayed-ACK and is never re-serialised.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from tools.scan_sim.ledger import Ledger, _mix64

MAX_PAGE_SIZE = 1000
BACKFILLING_ERROR = (
    "This scan instance has not yet replicated all data. This process can take an extended period of "
    "time to complete. Wait until replication is complete, or connect to a different scan instance."
)
RATE_LIMIT_BODY = b"Too Many Requests: Server is busy, please try again later."
UNEXPECTED_ERROR = "An unexpected error occurred."
NON_JSON_BODY = b"<html>oops</html>"
FAULT_KINDS = ("429", "500", "503", "slow", "reset", "truncated")
CORRUPTION_KINDS = ("unknown_shape", "bad_timestamp", "missing_field", "non_json")
JSON = "application/json"

# Route keys double as the names used in ``FaultConfig.endpoints`` and in ``stats``.
UPDATES = "/v2/updates"
UPDATE_BY_ID = "/v2/updates/{update_id}"
MIGRATION_INFO = "/v0/backfilling/migration-info"
_STATIC_ROUTES: dict[str, str] = {
    "/v2/updates": "POST",
    "/v0/backfilling/migration-info": "POST",
    "/v0/backfilling/status": "GET",
    "/v0/migrations/last": "GET",
    "/v0/dso-party-id": "GET",
    "/v0/dso": "GET",
    "/v0/scans": "GET",
    "/readyz": "GET",
    "/livez": "GET",
    "/version": "GET",
    "/status": "GET",
}


@dataclass
class FaultConfig:
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    slow_seconds: float = 2.0
    retry_after_seconds: int = 1
    seed: int = 0
    endpoints: tuple[str, ...] = (UPDATES,)  # route keys, e.g. "/v2/updates/{update_id}"; "*" = all

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("fault rate must be within 0..1")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str) -> _Response:
    return _Response(status, orjson.dumps({"error": message}))


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    block_on_close = False

    def __init__(self, address: tuple[str, int], sim: ScanSimulator, ssl_ctx: ssl.SSLContext | None) -> None:
        self.sim = sim
        self.ssl_ctx = ssl_ctx
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn (a name lookup); we never need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        if self.ssl_ctx is not None:
            # Handshake later, in the connection's own thread, so one slow client cannot stall accept().
            sock = self.ssl_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Aborted connections and failed TLS handshakes are expected (faults, untrusted clients).
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "scan-sim"
    sys_version = ""
    timeout = 120  # idle keep-alive connections end on their own
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()
        self.server.sim._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.sim._track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: thousands of pages per benchmark

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        sim = self.server.sim
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self._send(_error(400, "The request content was malformed"))
            return
        url = urlsplit(self.path)
        route, param = sim._route(method, url.path)
        sim._count("requests", route)
        fault = sim._pick_fault(route)
        if fault is not None:
            sim._count("faults", fault.kind)
            if fault.kind == "429":
                self._send(
                    _Response(
                        429,
                        RATE_LIMIT_BODY,
                        "text/plain; charset=UTF-8",
                        (("Retry-After", str(fault.config.retry_after_seconds)),),
                    )
                )
                return
            if fault.kind == "500":
                self._send(_error(500, UNEXPECTED_ERROR))
                return
            if fault.kind == "503":
                self._send(_error(503, BACKFILLING_ERROR))
                return
            if fault.kind == "slow":
                time.sleep(fault.config.slow_seconds)
        try:
            response = sim._handle(method, route, param, url.query, body)
        except Exception:  # noqa: BLE001 - a simulator bug must look like a Scan 500, not a hang
            response = _error(500, UNEXPECTED_ERROR)
        if fault is not None and fault.kind == "reset":
            self._send_then_reset(response)
            return
        if fault is not None and fault.kind == "truncated":
            cut = max(1, (len(response.body) * 2) // 3) if response.body else 0
            response = _Response(200, response.body[:cut], response.content_type, response.headers)
        self._send(response)

    def _head(self, response: _Response, length: int) -> bytes:
        lines = [
            f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: scan-sim",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {length}",
        ]
        lines.extend(f"{k}: {v}" for k, v in response.headers)
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, response: _Response) -> None:
        head = self._head(response, len(response.body))
        if len(response.body) < 65536:
            self.wfile.write(head + response.body)  # one segment for small answers
        else:
            self.wfile.write(head)
            self.wfile.write(response.body)  # no copy of a multi-MB page just to prepend headers

    def _send_then_reset(self, response: _Response) -> None:
        """Announce the full Content-Length, send part of the body, then abort with a TCP RST."""
        head = self._head(response, len(response.body))
        with contextlib.suppress(OSError):
            self.wfile.write(head + response.body[: len(response.body) // 2])
        self.close_connection = True
        conn = self.connection
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The rfile holds a reference to the socket; release it so close() really closes (→ RST).
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            conn.close()


@dataclass
class _Fault:
    kind: str
    config: FaultConfig


class ScanSimulator:
    """A Scan served from a ``Ledger``; start/stop it directly or use it as a context manager."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        prefix: str = "/api/scan",
        tls: tuple[str, str] | None = None,
        faults: FaultConfig | None = None,
        prefetch: bool = True,
    ) -> None:
        self.ledger = ledger
        # Sequential paging: build the next page into the ledger's cache while the client decodes
        # this one, so cold generation overlaps the client's work instead of adding to it.
        self.prefetch = prefetch
        self._prefetch_jobs: deque[tuple[tuple[int, str], int, int | None]] = deque(maxlen=8)
        self._prefetch_cv = threading.Condition()
        self._prefetch_thread: threading.Thread | None = None
        self._stopping = False
        self.host = host
        self._requested_port = port
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.tls = tls
        self._lock = threading.Lock()
        self._faults = faults
        self._fault_counter = 0
        self._visible_until: int | None = None
        self._ready = True
        self._corruptions: dict[str, str] = {}
        self._stats: dict[str, Any] = self._empty_stats()
        self._conns: set[Any] = set()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        if self._server is not None:
            return self.base_url
        ctx: ssl.SSLContext | None = None
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls[0], self.tls[1])
        self._server = _HTTPServer((self.host, self._requested_port), self, ctx)
        self._started_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="scan-sim", daemon=True
        )
        self._thread.start()
        self._stopping = False
        if self.prefetch and self.ledger.cache_bytes > 0:
            self._prefetch_thread = threading.Thread(
                target=self._prefetch_loop, name="scan-sim-prefetch", daemon=True
            )
            self._prefetch_thread.start()
        return self.base_url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with self._prefetch_cv:
            self._stopping = True
            self._prefetch_jobs.clear()
            self._prefetch_cv.notify_all()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:  # wake handler threads parked on idle keep-alive reads
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in (self._thread, self._prefetch_thread):
            if thread is not None:
                thread.join(timeout=5)
        self._thread = self._prefetch_thread = None

    def __enter__(self) -> ScanSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator is not running")
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + self.prefix

    # ------------------------------------------------------------------------ runtime controls

    def set_faults(self, faults: FaultConfig | None) -> None:
        with self._lock:
            self._faults = faults
            self._fault_counter = 0

    def set_visible_until(self, us: int | None) -> None:
        """Live edge / lagging Scan: hide items with later record times (see Ledger.visible_count)."""
        with self._lock:
            self._visible_until = us

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._ready = ready

    def corrupt(self, update_id: str, kind: str) -> None:
        if kind not in CORRUPTION_KINDS:
            raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTION_KINDS}")
        with self._lock:
            self._corruptions[update_id] = kind

    def clear_corruptions(self) -> None:
        with self._lock:
            self._corruptions.clear()

    @property
    def stats(self) -> dict[str, Any]:
        """Snapshot: requests per route, faults per kind, pages/items/bytes of /v2/updates served."""
        with self._lock:
            return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self._stats.items()}

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = self._empty_stats()

    # ------------------------------------------------------------------------------- internals

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {
            "requests": Counter(),
            "faults": Counter(),
            "corruptions": Counter(),
            "pages": 0,
            "items": 0,
            "bytes": 0,
            "prefetched_items": 0,
        }

    def _track(self, conn: Any, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _count(self, group: str, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[group][key] += n

    def _route(self, method: str, path: str) -> tuple[str, str | None]:
        """Map a request path to a route key (and path parameter); unknown → "unknown"."""
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return "unknown", None
            path = path[len(self.prefix) :]
        path = path.rstrip("/") or "/"
        if path in _STATIC_ROUTES:
            return path, None
        if path.startswith("/v2/updates/") and path.count("/") == 3:
            return UPDATE_BY_ID, path.rsplit("/", 1)[1]
        return "unknown", None

    def _pick_fault(self, route: str) -> _Fault | None:
        with self._lock:
            cfg = self._faults
            if cfg is None or cfg.rate <= 0 or not cfg.kinds:
                return None
            if route not in cfg.endpoints and "*" not in cfg.endpoints:
                return None
            n = self._fault_counter
            self._fault_counter += 1
        h = _mix64((cfg.seed * 0x9E3779B97F4A7C15) ^ (n * 0xD1B54A32D192ED03) ^ 0xFA)
        if (h >> 11) / float(1 << 53) >= cfg.rate:
            return None
        return _Fault(cfg.kinds[(h & 0x7FF) % len(cfg.kinds)], cfg)

    def _handle(self, method: str, route: str, param: str | None, query: str, body: bytes) -> _Response:
        if route == "unknown":
            return _error(404, "The requested resource could not be found.")
        if route == UPDATE_BY_ID:
            if method != "GET":
                return _error(405, "HTTP method not allowed, supported methods: GET")
            return self._update_by_id(param or "", query)
        expected = _STATIC_ROUTES[route]
        if method != expected:
            return _error(405, f"HTTP method not allowed, supported methods: {expected}")
        try:
            if route == UPDATES:
                return self._updates(body)
            if route == MIGRATION_INFO:
                return self._migration_info(body)
        except _BadRequest as exc:
            return _error(400, exc.message)
        return self._simple_get(route)

    @staticmethod
    def _json_body(body: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _BadRequest(f"The request content was malformed:\n{exc}") from None
        if not isinstance(data, dict):
            raise _BadRequest("The request content was malformed:\nExpected a JSON object")
        return data

    def _updates(self, body: bytes) -> _Response:
        req = self._json_body(body)
        with self._lock:
            ready, visible, corruptions = self._ready, self._visible_until, dict(self._corruptions)
        if not ready:
            return _error(503, BACKFILLING_ERROR)
        page_size = req.get("page_size")
        if page_size is None:
            raise _BadRequest("The request content was malformed:\nMissing required field: page_size")
        if not isinstance(page_size, int) or isinstance(page_size, bool):
            raise _BadRequest("The request content was malformed:\nExpected an integer for page_size")
        if page_size > MAX_PAGE_SIZE:
            raise _BadRequest(f"Exceeded limit maximum ({page_size} > {MAX_PAGE_SIZE}).")
        if page_size < 1:
            raise _BadRequest("Limit must be at least 1.")
        encoding = req.get("daml_value_encoding")
        if encoding not in (None, "compact_json", "protobuf_json"):
            raise _BadRequest(f"The request content was malformed:\nUnknown daml_value_encoding: {encoding}")
        after_raw = req.get("after")
        after: tuple[int, str] | None = None
        if after_raw is not None:
            if not isinstance(after_raw, dict):
                raise _BadRequest("The request content was malformed:\nExpected an object for after")
            mig, rec = after_raw.get("after_migration_id"), after_raw.get("after_record_time")
            if not isinstance(mig, int) or isinstance(mig, bool) or not isinstance(rec, str):
                raise _BadRequest(
                    "The request content was malformed:\nafter needs after_migration_id and after_record_time"
                )
            after = (mig, rec)
        try:
            positions = self.ledger.page_positions(after, page_size, visible)
        except ValueError as exc:
            raise _BadRequest(f"Invalid timestamp: {exc}") from None
        if corruptions:
            parts: list[bytes] = []
            for m, i in positions:
                raw = self.ledger.item_json(m, i)
                kind = corruptions.get(self.ledger.update_id(m, i))
                if kind == "non_json":
                    self._count("corruptions", kind)
                    return _Response(200, NON_JSON_BODY, "text/html; charset=UTF-8")
                if kind is not None:
                    self._count("corruptions", kind)
                    raw = _corrupt_item(raw, kind)
                parts.append(raw)
            page = b'{"transactions":[' + b",".join(parts) + b"]}"
        else:
            page = self.ledger.page_json(positions)
        with self._lock:
            self._stats["pages"] += 1
            self._stats["items"] += len(positions)
            self._stats["bytes"] += len(page)
        if self._prefetch_thread is not None and len(positions) == page_size:
            last_m, last_i = positions[-1]
            self._schedule_prefetch((last_m, self.ledger.record_time(last_m, last_i)), page_size, visible)
        return _Response(200, page)

    def _schedule_prefetch(self, after: tuple[int, str], page_size: int, visible: int | None) -> None:
        with self._prefetch_cv:
            if not self._stopping:
                self._prefetch_jobs.append((after, page_size, visible))
                self._prefetch_cv.notify()

    def _prefetch_loop(self) -> None:
        while True:
            with self._prefetch_cv:
                while not self._prefetch_jobs and not self._stopping:
                    self._prefetch_cv.wait()
                if self._stopping:
                    return
                after, page_size, visible = self._prefetch_jobs.popleft()
            warmed = 0
            for m, i in self.ledger.page_positions(after, page_size, visible):
                if self._stopping:
                    return
                self.ledger.item_json(m, i)  # fills the ledger's LRU
                warmed += 1
            with self._lock:
                self._stats["prefetched_items"] += warmed

    def _update_by_id(self, update_id: str, query: str) -> _Response:
        encoding = parse_qs(query).get("daml_value_encoding", [None])[0]
        if encoding not in (None, "compact_json", "protobuf_json"):
            return _error(400, f"Invalid value for: query parameter daml_value_encoding ({encoding})")
        with self._lock:
            visible, kind = self._visible_until, self._corruptions.get(update_id)
        pos = self.ledger.locate(update_id)
        if pos is not None and pos[1] >= self.ledger.visible_count(pos[0], visible):
            pos = None
        if pos is None:
            return _error(404, f"Transaction with id {update_id} not found")
        raw = self.ledger.item_json(*pos)
        if kind == "non_json":
            self._count("corruptions", kind)
            return _Response(200, NON_JSON_BODY, "text/html; charset=UTF-8")
        if kind is not None:
            self._count("corruptions", kind)
            raw = _corrupt_item(raw, kind)
        return _Response(200, raw)

    def _migration_info(self, body: bytes) -> _Response:
        req = self._json_body(body)
        mig = req.get("migration_id")
        if not isinstance(mig, int) or isinstance(mig, bool):
            raise _BadRequest("The request content was malformed:\nMissing required field: migration_id")
        with self._lock:
            visible = self._visible_until
        info = self.ledger.migration_info(mig, visible)
        if info is None:
            return _error(404, f"No data for migration {mig}")
        return _Response(200, orjson.dumps(info))

    def _last_visible_migration(self) -> int | None:
        with self._lock:
            visible = self._visible_until
        last = None
        for m in self.ledger.migration_ids():
            if self.ledger.visible_count(m, visible):
                last = m
        return last

    def _simple_get(self, route: str) -> _Response:
        with self._lock:
            ready = self._ready
        ledger = self.ledger
        if route == "/readyz":
            return _Response(200 if ready else 503, b"", "text/plain; charset=UTF-8")
        if route == "/livez":
            return _Response(200, b"", "text/plain; charset=UTF-8")
        if route == "/version":
            return _Response(200, orjson.dumps({"version": "0.7.5", "commit_ts": "2026-08-20T20:04:27Z"}))
        if route == "/status":
            if not ready:
                return _Response(200, orjson.dumps({"not_initialized": {"active": False}}))
            uptime = int(time.monotonic() - self._started_at)
            status = {"id": "scan", "uptime": f"{uptime}s", "ports": {"admin": self.port}, "active": True}
            return _Response(200, orjson.dumps({"success": status}))
        if route == "/v0/backfilling/status":
            return _Response(200, orjson.dumps({"complete": ready}))
        if route == "/v0/migrations/last":
            last = self._last_visible_migration()
            if last is None:
                return _error(404, "No migration found")
            return _Response(200, orjson.dumps({"migration_id": last}))
        if route == "/v0/dso-party-id":
            return _Response(200, orjson.dumps({"dso_party_id": ledger.dso_party}))
        if route == "/v0/scans":
            scans = [{"publicUrl": self.origin, "svName": "Simulated-SV-1"}]
            return _Response(
                200, orjson.dumps({"scans": [{"domainId": ledger.synchronizer_id, "scans": scans}]})
            )
        if route == "/v0/dso":
            return _Response(200, orjson.dumps(self._dso_info()))
        return _error(404, "The requested resource could not be found.")

    def _dso_info(self) -> dict[str, Any]:
        ledger = self.ledger
        sv_party = ledger.parties[3]
        return {
            "sv_user": "sv-sim",
            "sv_party_id": sv_party,
            "dso_party_id": ledger.dso_party,
            "voting_threshold": 1,
            "latest_mining_round": None,
            "amulet_rules": None,
            "dso_rules": {
                "contract": {"template_id": "Splice.DsoRules:DsoRules", "payload": {"dso": ledger.dso_party}},
                "domain_id": ledger.synchronizer_id,
            },
            "sv_node_states": [],
        }


def _corrupt_item(raw: bytes, kind: str) -> bytes:
    item: dict[str, Any] = orjson.loads(raw)
    if kind == "unknown_shape":
        mig = item.get("migration_id", item.get("event", {}).get("migration_id"))
        return orjson.dumps(
            {
                "update_id": item["update_id"],
                "migration_id": mig,
                "record_time": item["record_time"],
                "topology_change": {"kind": "unknown", "serial": 1},
            }
        )
    if kind == "bad_timestamp":
        if "effective_at" in item:
            item["effective_at"] = "not-a-time"
        else:  # reassignments carry no effective_at
            item["record_time"] = "not-a-time"
    elif kind == "missing_field":
        if "synchronizer_id" in item:
            del item["synchronizer_id"]
        else:
            item["event"].pop("source_synchronizer", None)
    return orjson.dumps(item)
