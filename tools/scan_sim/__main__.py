"""CLI: ``python -m tools.scan_sim serve ...`` runs a simulated Scan; ``dump`` prints its items.

serve prints the base URL on stdout (and writes it to --url-file) once it accepts connections, then
runs until SIGTERM/SIGINT and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from tools.scan_sim.ledger import DEFAULT_CACHE_BYTES, Ledger, LedgerConfig, parse_time_us
from tools.scan_sim.server import FAULT_KINDS, FaultConfig, ScanSimulator

_DEFAULTS = LedgerConfig()


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not counts:
        raise argparse.ArgumentTypeError("at least one migration is needed")
    return counts


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown fault kinds {sorted(unknown)}; known: {','.join(FAULT_KINDS)}"
        )
    return kinds


def _add_ledger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument(
        "--updates",
        type=_counts,
        default=_DEFAULTS.updates_per_migration,
        help="updates per migration, comma-separated (one entry per migration id)",
    )
    p.add_argument("--start", default=_DEFAULTS.start, help="record time of the first update")
    p.add_argument("--mean-gap-us", type=int, default=_DEFAULTS.mean_gap_us)
    p.add_argument("--overlap-us", type=int, default=_DEFAULTS.overlap_us)
    p.add_argument("--reassignment-ratio", type=float, default=_DEFAULTS.reassignment_ratio)
    p.add_argument("--mean-events", type=float, default=_DEFAULTS.mean_events)
    p.add_argument("--payload-bytes", type=int, default=_DEFAULTS.payload_bytes)
    p.add_argument("--large-payload-every", type=int, default=_DEFAULTS.large_payload_every)


def _ledger(args: argparse.Namespace, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Ledger:
    return Ledger(
        LedgerConfig(
            seed=args.seed,
            start=args.start,
            updates_per_migration=args.updates,
            mean_gap_us=args.mean_gap_us,
            overlap_us=args.overlap_us,
            reassignment_ratio=args.reassignment_ratio,
            mean_events=args.mean_events,
            payload_bytes=args.payload_bytes,
            large_payload_every=args.large_payload_every,
        ),
        cache_bytes=cache_bytes,
    )


def _write_atomically(path: str, text: str) -> None:
    # Readers poll for the file; they must never see it half-written.
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=".url-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, target)


def _serve(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    faults = None
    if args.fault_rate > 0:
        faults = FaultConfig(
            rate=args.fault_rate,
            kinds=args.fault_kinds,
            slow_seconds=args.slow_seconds,
            retry_after_seconds=args.retry_after_seconds,
            seed=args.fault_seed,
        )
    sim = ScanSimulator(
        _ledger(args, args.cache_mib * 1024 * 1024),
        host=args.host,
        port=args.port,
        prefix=args.prefix,
        tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
        faults=faults,
    )
    if args.visible_until:
        sim.set_visible_until(parse_time_us(args.visible_until))
    if args.not_ready:
        sim.set_ready(False)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    url = sim.start()
    try:
        if args.url_file:  # before stdout, so whoever reads the URL can rely on the file too
            _write_atomically(args.url_file, url + "\n")
        print(url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


def _dump(args: argparse.Namespace) -> int:
    ledger = _ledger(args, cache_bytes=0)  # one pass: caching would only cost memory
    out = sys.stdout.buffer
    try:
        for m in ledger.migration_ids():
            for i in range(ledger.count(m)):
                out.write(ledger.item_json(m, i) + b"\n")
        out.flush()
    except BrokenPipeError:  # `| head` is a normal way to use this
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scan_sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a simulated Scan until SIGTERM/SIGINT")
    _add_ledger_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--prefix", default="/api/scan")
    serve.add_argument("--fault-rate", type=float, default=0.0)
    serve.add_argument("--fault-kinds", type=_kinds, default=FAULT_KINDS)
    serve.add_argument("--fault-seed", type=int, default=0)
    serve.add_argument("--slow-seconds", type=float, default=2.0)
    serve.add_argument("--retry-after-seconds", type=int, default=1)
    serve.add_argument("--tls-cert", default=None)
    serve.add_argument("--tls-key", default=None)
    serve.add_argument("--url-file", default=None, help="also write the base URL here")
    serve.add_argument("--cache-mib", type=int, default=DEFAULT_CACHE_BYTES // (1024 * 1024))
    serve.add_argument("--visible-until", default=None, help="hide updates recorded after this time")
    serve.add_argument("--not-ready", action="store_true", help="answer 503 as if still backfilling")
    serve.set_defaults(func=_serve)
    dump = sub.add_parser("dump", help="print every item as one JSON line, in (migration, record_time) order")
    _add_ledger_args(dump)
    dump.set_defaults(func=_dump)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
