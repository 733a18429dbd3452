"""A Scan simulator that also remembers what clients sent and can fault only the next N requests.

It is the real simulator over real HTTP: the hooks only record ``/v2/updates`` request bodies, gate
the simulator's own fault injection by a budget (the fault schedule itself has no "first N only"
switch) and optionally print record times in another valid ISO form, so a client that re-formats
its cursor instead of echoing the string it received becomes visible in the request log.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from tools.scan_sim import FaultConfig, Ledger, ScanSimulator


class ObservedSimulator(ScanSimulator):
    def __init__(self, ledger: Ledger, **kwargs: Any) -> None:
        super().__init__(ledger, **kwargs)
        self._obs_lock = threading.Lock()
        self._update_bodies: list[dict[str, Any]] = []
        self._fault_budget: int | None = None
        # None: as the Scan prints them (6 digits). "nanos": the same instant with 9 digits, which
        # Instant.parse accepts and which no canonical re-formatting would reproduce.
        self.record_time_style: str | None = None

    # -- controls --------------------------------------------------------------------------
    def inject(self, faults: FaultConfig, count: int) -> None:
        """Fault the next ``count`` matching requests (the simulator's own faults), then none."""
        with self._obs_lock:
            self._fault_budget = count
        self.set_faults(faults)

    def restore(self) -> None:
        self.set_faults(None)
        self.set_visible_until(None)
        self.set_ready(True)
        self.clear_corruptions()
        self.record_time_style = None
        with self._obs_lock:
            self._fault_budget = None
            self._update_bodies.clear()
        self.reset_stats()

    @property
    def update_bodies(self) -> list[dict[str, Any]]:
        """Decoded bodies of the ``/v2/updates`` requests that reached the handler, in handling order."""
        with self._obs_lock:
            return list(self._update_bodies)

    # -- hooks -----------------------------------------------------------------------------
    def _pick_fault(self, route: str) -> Any:
        with self._obs_lock:
            if self._fault_budget is not None and self._fault_budget <= 0:
                return None
            fault = super()._pick_fault(route)
            if fault is not None and self._fault_budget is not None:
                self._fault_budget -= 1
            return fault

    def _updates(self, body: bytes) -> Any:
        with self._obs_lock:
            try:
                self._update_bodies.append(orjson.loads(body))
            except orjson.JSONDecodeError:
                self._update_bodies.append({"undecodable": body[:200].decode("utf-8", "replace")})
        response = super()._updates(body)
        if self.record_time_style == "nanos" and response.status == 200:
            data = orjson.loads(response.body)
            for item in data["transactions"]:
                item["record_time"] = item["record_time"][:-1] + "000Z"
            response = dataclasses.replace(response, body=orjson.dumps(data))
        return response


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
