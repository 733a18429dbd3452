"""Canton Scan API simulator: a deterministic ledger served over real HTTP(S) for tests and benchmarks."""

from tools.scan_sim.ledger import (
    Ledger,
    LedgerConfig,
    format_date_time,
    format_instant,
    format_record_time,
    parse_time_us,
)
from tools.scan_sim.server import FaultConfig, ScanSimulator

__all__ = [
    "FaultConfig",
    "Ledger",
    "LedgerConfig",
    "ScanSimulator",
    "format_date_time",
    "format_instant",
    "format_record_time",
    "parse_time_us",
]
