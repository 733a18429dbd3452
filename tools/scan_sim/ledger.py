"""A deterministic, lazily generated Scan ledger (``/v2/updates`` item shapes, migration info).

Nothing here is proportional to the ledger size: record times, update ids and item bodies are pure
functions of ``(seed, migration_id, index)``. Transaction bodies are stamped from a small pool of
pre-serialised templates (tree shape + payloads) with ``bytes % mapping``, which fills ids, times and
amounts in one C-level pass; that keeps a cold 1000-item page much cheaper to produce than it is for
a client to ``orjson.loads``.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Any

import orjson

US_PER_SECOND = 1_000_000
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
CONSTANT_OFFSET = "000000000000000001"  # v1/v2 reassignments always carry this offset (contract §2)
TEMPLATE_POOL = 256
LARGE_PAYLOAD_BYTES = 3 * 1024 * 1024
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024

_EPOCH_DATE = date(1970, 1, 1)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_TIME_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z$")


# --------------------------------------------------------------------------------------------------
# Time helpers (integers of microseconds since the epoch; never floats)


@lru_cache(maxsize=4096)
def _day_prefix(days: int) -> str:
    d = _EPOCH_DATE + timedelta(days=days)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T"


def _civil(us: int) -> tuple[str, int]:
    """("YYYY-MM-DDTHH:MM:SS", microseconds); integer maths plus a per-day cache (hot path)."""
    secs, frac = divmod(us, US_PER_SECOND)
    days, rem = divmod(secs, 86_400)
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    return f"{_day_prefix(days)}{hour:02d}:{minute:02d}:{second:02d}", frac


def format_record_time(us: int) -> str:
    """Update ``record_time``: always exactly 6 fractional digits and ``Z`` (contract §2)."""
    head, frac = _civil(us)
    return f"{head}.{frac:06d}Z"


def format_date_time(us: int) -> str:
    """``format: date-time`` fields (created_at, migration-info min/max): trailing zeros dropped."""
    head, frac = _civil(us)
    if frac == 0:
        return f"{head}Z"
    return f"{head}.{frac:06d}".rstrip("0") + "Z"


def format_instant(us: int, nanos: bool = False) -> str:
    """Java ``Instant.toString``: 0, 3 or 6 digits as needed; ``nanos`` forces 9 (last three 0)."""
    head, frac = _civil(us)
    if nanos:
        return f"{head}.{frac:06d}000Z"
    if frac == 0:
        return f"{head}Z"
    if frac % 1000 == 0:
        return f"{head}.{frac // 1000:03d}Z"
    return f"{head}.{frac:06d}Z"


def parse_time_us(text: str) -> int:
    """Parse ``YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`` to µs; sub-µs digits must be zero (Daml is µs)."""
    if not isinstance(text, str):
        raise ValueError(f"not a timestamp string: {text!r}")
    m = _TIME_RE.match(text)
    if m is None:
        raise ValueError(f"Text '{text}' could not be parsed")
    year, month, day, hour, minute, second, frac = m.groups()
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError as exc:
        raise ValueError(f"Text '{text}' could not be parsed: {exc}") from None
    micros = 0
    if frac:
        if len(frac) > 6 and frac[6:].strip("0"):
            raise ValueError(f"Text '{text}' has sub-microsecond precision")
        micros = int(frac[:6].ljust(6, "0"))
    return (dt - _NAIVE_EPOCH) // timedelta(microseconds=1) + micros


# --------------------------------------------------------------------------------------------------
# Deterministic hashing


def _mix64(x: int) -> int:
    """splitmix64 finaliser: cheap, well-spread integer hash for O(1) jitter and slot choices."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _hex(seed: int, *parts: object, n: int = 64) -> str:
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return hashlib.shake_128(text).hexdigest(n // 2)


# --------------------------------------------------------------------------------------------------
# Configuration and small data holders


@dataclass(frozen=True)
class LedgerConfig:
    seed: int = 7
    start: str = "2025-03-01T00:00:00Z"  # record time of the first update of migration 0
    updates_per_migration: tuple[int, ...] = (3000, 3000)  # one entry per migration id 0..n-1
    mean_gap_us: int = 2_000_000  # average spacing of record times within a migration
    overlap_us: int = 600_000_000  # migration m+1 starts this much BEFORE migration m ends (§3)
    reassignment_ratio: float = 0.05  # share of items that are reassignments (unassign/assign pairs)
    mean_events: float = 15.0  # mean events per transaction tree
    payload_bytes: int = 300  # approx size of create_arguments
    large_payload_every: int = 0  # every Nth update (0 = never) gets a ~3 MB create_arguments


@dataclass(slots=True)
class _Node:
    label: int  # pre-order position = the n of "<update_id>:<n>"
    exercised: bool
    children: list[_Node] = field(default_factory=list)


@dataclass(slots=True)
class _Template:
    body: bytes  # serialised item with %(KEY)s placeholders ('%' in content escaped as '%%')
    roots: list[_Node]
    n_events: int


class _ByteLRU:
    """Bounded (by total bytes) LRU of serialised items; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        if self.max_bytes <= 0:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple[int, int], value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._data[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _, dropped = self._data.popitem(last=False)
                self._size -= len(dropped)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._data)


# Content vocabulary (compact_json style: Numeric/Int64 as strings, explicit nulls, unicode text).
_TEXTS = ("Zürich ✓ 東京", "naïve café", "Ωmega — ünïcödé", "transfer", "batch", "rewards", "CC", "ok")
_CREATE_KINDS = (
    # (module:entity, package, weight)
    ("Splice.Amulet:Amulet", "splice-amulet", 40),
    ("Splice.Amulet:LockedAmulet", "splice-amulet", 8),
    ("Splice.Amulet:ValidatorRewardCoupon", "splice-amulet", 15),
    ("Splice.Amulet:AppRewardCoupon", "splice-amulet", 12),
    ("Splice.Round:OpenMiningRound", "splice-amulet", 5),
    ("Splice.DsoRules:VoteRequest", "splice-dso-governance", 3),
    ("Splice.ValidatorLicense:ValidatorLicense", "splice-amulet", 7),
)
_INNER_CHOICES = (
    # (module:entity, package, choice, consuming, result kind)
    ("Splice.AmuletRules:AmuletRules", "splice-amulet", "AmuletRules_Transfer", False, "object"),
    ("Splice.AmuletRules:AmuletRules", "splice-amulet", "AmuletRules_BuyMemberTraffic", False, "object"),
    ("Splice.DsoRules:DsoRules", "splice-dso-governance", "DsoRules_ReceiveSvRewardCoupon", False, "list"),
    ("Splice.Amulet:LockedAmulet", "splice-amulet", "LockedAmulet_Unlock", True, "string"),
)
_LEAF_CHOICES = (
    ("Splice.Amulet:Amulet", "splice-amulet", "Archive", True, "unit"),
    ("Splice.Amulet:Amulet", "splice-amulet", "Archive", True, "unit"),
    ("Splice.Round:OpenMiningRound", "splice-amulet", "OpenMiningRound_Fetch", False, "null"),
    (
        "Splice.ValidatorLicense:ValidatorLicense",
        "splice-amulet",
        "ValidatorLicense_RecordValidatorLivenessActivity",
        True,
        "string",
    ),
)
_INTERFACE = "Splice.Api.Token.HoldingV1:Holding"


class Ledger:
    """Deterministic ledger; every accessor is O(1) or O(log n) and memory is O(#migrations)."""

    def __init__(self, config: LedgerConfig | None = None, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.config = cfg = config or LedgerConfig()
        if not cfg.updates_per_migration:
            raise ValueError("updates_per_migration must name at least one migration")
        if any(n < 0 or n >= 1 << 40 for n in cfg.updates_per_migration):
            raise ValueError("update counts must be in 0..2**40-1")
        if cfg.mean_gap_us < 1:
            raise ValueError("mean_gap_us must be >= 1")
        self._seed = cfg.seed
        self._counts = list(cfg.updates_per_migration)
        k = len(self._counts)
        # Record times of migration m are all ≡ (start + m) mod k, so times never collide even
        # across overlapping migrations; the gap is rounded to a multiple of k for that.
        self._gap = max(k, cfg.mean_gap_us - cfg.mean_gap_us % k)
        self._k = k
        self._start_us = parse_time_us(cfg.start)
        self._feistel_keys = [_mix64(self._seed * 0x9E3779B97F4A7C15 + r) & MASK32 for r in range(4)]
        self._seed_mix = _mix64(self._seed ^ 0x5EED)
        self._base: list[int] = []
        self._resid: list[int] = []
        self._first_us: list[int] = []
        self._last_us: list[int] = []
        base = self._start_us
        for m, n in enumerate(self._counts):
            self._base.append(base)
            self._resid.append((self._start_us + m - base) % k)
            first = self.record_time_us(m, 0) if n else base
            last = self.record_time_us(m, n - 1) if n else base
            self._first_us.append(first)
            self._last_us.append(last)
            base = last - cfg.overlap_us
        self._block = 0 if cfg.reassignment_ratio <= 0 else max(2, round(2 / cfg.reassignment_ratio))
        # Ledger-wide identities, all derived from the seed.
        self.dso_party = f"DSO::1220{_hex(self._seed, 'party', 'DSO')}"
        hints = ("alice-validator-1", "bob-exchange-1", "carol-wallet-2", "sv-3-operator", "dave-app-7")
        self.parties = [f"{h}::1220{_hex(self._seed, 'party', h)}" for h in hints]
        self.synchronizer_id = f"global-domain::1220{_hex(self._seed, 'sync', 'global')}"
        self.app_synchronizer_id = f"app-synchronizer::1220{_hex(self._seed, 'sync', 'app')}"
        self._pkg = {p: _hex(self._seed, "pkg", p) for p in ("splice-amulet", "splice-dso-governance")}
        self._iface_pkg = _hex(self._seed, "pkg", "splice-api-token-holding-v1")
        self._rules_cid = f"00{_hex(self._seed, 'rules')}ca101220{_hex(self._seed, 'rules2')}"
        self._templates: dict[int, _Template] = {}
        self._template_lock = threading.Lock()
        self._template_sizes = self._plan_tree_sizes()
        self._cache = _ByteLRU(cache_bytes)

    # ---------------------------------------------------------------------------------- layout

    def migration_ids(self) -> list[int]:
        return list(range(len(self._counts)))

    def count(self, migration_id: int) -> int:
        if not 0 <= migration_id < len(self._counts):
            return 0
        return self._counts[migration_id]

    def total_count(self) -> int:
        return sum(self._counts)

    def record_time_us(self, migration_id: int, index: int) -> int:
        """O(1): base + index*gap + jitter, jitter < gap, so strictly increasing within a migration."""
        if index == 0:
            jitter = self._resid[migration_id]
        else:
            h = _mix64(self._seed_mix ^ (migration_id << 44) ^ index)
            jitter = self._resid[migration_id] + self._k * (h % (self._gap // self._k))
        return self._base[migration_id] + index * self._gap + jitter

    def record_time(self, migration_id: int, index: int) -> str:
        return format_record_time(self.record_time_us(migration_id, index))

    def first_record_time_us(self, migration_id: int) -> int:
        return self._first_us[migration_id]

    def last_record_time_us(self, migration_id: int) -> int:
        return self._last_us[migration_id]

    def _check(self, migration_id: int, index: int) -> None:
        if not (0 <= migration_id < len(self._counts) and 0 <= index < self._counts[migration_id]):
            raise IndexError(f"no update ({migration_id}, {index})")

    # ------------------------------------------------------------------------------ update ids

    def _feistel(self, x: int, inverse: bool = False) -> int:
        """4-round Feistel permutation of 64 bits: ids look random yet decode back to (m, i)."""
        left, right = x >> 32, x & MASK32
        keys = self._feistel_keys[::-1] if inverse else self._feistel_keys
        if inverse:
            left, right = right, left
        for key in keys:
            # Round function: a 32-bit multiply-xorshift; any function works for a Feistel network.
            f = ((right ^ key) * 0x85EBCA6B) & MASK32
            left, right = right, left ^ f ^ (f >> 15)
        if inverse:
            left, right = right, left
        return (left << 32) | right

    def _digest(self, migration_id: int, index: int) -> bytes:
        return hashlib.shake_128(f"{self._seed}:{migration_id}:{index}".encode()).digest(176)

    def update_id(self, migration_id: int, index: int) -> str:
        self._check(migration_id, index)
        return self._update_id(migration_id, index, self._digest(migration_id, index))

    def _update_id(self, migration_id: int, index: int, digest: bytes) -> str:
        return f"1220{self._feistel((migration_id << 40) | index):016x}{digest[:24].hex()}"

    def locate(self, update_id: str) -> tuple[int, int] | None:
        """(migration_id, index) of an update id, or None; O(1) via the Feistel inverse."""
        if not (isinstance(update_id, str) and len(update_id) == 68 and update_id.startswith("1220")):
            return None
        try:
            packed = self._feistel(int(update_id[4:20], 16), inverse=True)
        except ValueError:
            return None
        m, i = packed >> 40, packed & ((1 << 40) - 1)
        if not (m < len(self._counts) and i < self._counts[m]):
            return None
        return (m, i) if self.update_id(m, i) == update_id else None

    # ---------------------------------------------------------------------------- item kinds

    def _block_slots(self, migration_id: int, block: int) -> tuple[int, int]:
        b = self._block
        h = _mix64(self._seed_mix ^ 0xB10C ^ (migration_id << 40) ^ block)
        p1 = h % (b - 1)
        p2 = p1 + 1 + ((h >> 24) % (b - 1 - p1))
        return p1, p2

    def kind(self, migration_id: int, index: int) -> str:
        """ "transaction", "unassignment" or "assignment" (pairs share a block of indices)."""
        if self._block:
            block, pos = divmod(index, self._block)
            p1, p2 = self._block_slots(migration_id, block)
            if pos == p1:
                return "unassignment"
            if pos == p2:
                return "assignment"
        return "transaction"

    def is_large(self, migration_id: int, index: int) -> bool:
        """Every Nth update gets a multi-MB payload, unless that slot is a reassignment."""
        n = self.config.large_payload_every
        return n > 0 and index % n == n - 1 and self.kind(migration_id, index) == "transaction"

    # ------------------------------------------------------------------------------- items

    @property
    def cache_bytes(self) -> int:
        return self._cache.max_bytes

    def item_json(self, migration_id: int, index: int) -> bytes:
        """The item serialised as the server sends it (compact orjson); cached in a bounded LRU."""
        key = (migration_id, index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        self._check(migration_id, index)
        kind = self.kind(migration_id, index)
        digest = self._digest(migration_id, index)
        if kind == "transaction":
            body = self._transaction_json(migration_id, index, digest)
        else:
            body = orjson.dumps(self._reassignment(migration_id, index, digest, kind))
        self._cache.put(key, body)
        return body

    def item(self, migration_id: int, index: int) -> dict[str, Any]:
        return orjson.loads(self.item_json(migration_id, index))

    def iter_items(self) -> Iterator[dict[str, Any]]:
        for m, n in enumerate(self._counts):
            for i in range(n):
                yield self.item(m, i)

    def page_json(self, positions: list[tuple[int, int]]) -> bytes:
        """``{"transactions":[...]}`` joined from per-item bytes, never re-serialised."""
        return b'{"transactions":[' + b",".join(self.item_json(m, i) for m, i in positions) + b"]}"

    # ------------------------------------------------------------------------------ paging

    def visible_count(self, migration_id: int, visible_until_us: int | None = None) -> int:
        """How many leading items of a migration are visible at the live edge ``visible_until_us``.

        Visibility is a prefix of the global (migration, record_time) order: a later migration is
        only visible once every earlier one is complete, as on a real Scan, where migration m+1
        only starts after m has ended. Otherwise a client could page past migration m's hidden tail
        into m+1 and never see that tail, which no real Scan would do.
        """
        n = self.count(migration_id)
        if visible_until_us is None or n == 0:
            return n
        for earlier in range(migration_id):
            if self._counts[earlier] and self._last_us[earlier] > visible_until_us:
                return 0
        return bisect.bisect_right(
            range(n), visible_until_us, key=lambda i: self.record_time_us(migration_id, i)
        )

    def first_index_after(self, migration_id: int, after_us: int) -> int:
        """Smallest index whose record time is > after_us (binary search, O(log n))."""
        return bisect.bisect_right(
            range(self.count(migration_id)), after_us, key=lambda i: self.record_time_us(migration_id, i)
        )

    def page_positions(
        self, after: tuple[int, str] | None, limit: int, visible_until_us: int | None = None
    ) -> list[tuple[int, int]]:
        """Positions the server returns for a cursor (the Scan's ``afterFilters`` rule, §4.1).

        ``(migration == after_migration and record_time > after_record_time)`` or
        ``migration > after_migration``, ordered by (migration, record_time), at most ``limit``.
        Raises ValueError for an unparsable ``after_record_time``.
        """
        out: list[tuple[int, int]] = []
        if limit <= 0:
            return out
        if after is None:
            start_m, start_i = 0, 0
        else:
            after_m, after_time = after
            after_us = parse_time_us(after_time)
            if after_m < 0:
                start_m, start_i = 0, 0
            elif after_m >= len(self._counts):
                return out
            else:
                start_m, start_i = after_m, self.first_index_after(after_m, after_us)
        for m in range(start_m, len(self._counts)):
            first = start_i if m == start_m else 0
            visible = self.visible_count(m, visible_until_us)
            stop = min(visible, first + limit - len(out))
            out.extend((m, i) for i in range(first, stop))
            if len(out) >= limit or visible < self._counts[m]:
                break  # full page, or the live edge is inside this migration
        return out

    def items_after(
        self, after: tuple[int, str] | None, limit: int, visible_until_us: int | None = None
    ) -> list[dict[str, Any]]:
        return [self.item(m, i) for m, i in self.page_positions(after, limit, visible_until_us)]

    def migration_info(self, migration_id: int, visible_until_us: int | None = None) -> dict[str, Any] | None:
        """Body of ``/v0/backfilling/migration-info``; None when there is no data (→ 404)."""
        if not 0 <= migration_id < len(self._counts):
            return None
        visible = self.visible_count(migration_id, visible_until_us)
        if visible == 0:
            return None
        last_import = None if migration_id == 0 else f"1220{_hex(self._seed, 'import', migration_id)}"
        return {
            "previous_migration_id": migration_id - 1 if migration_id > 0 else None,
            "record_time_range": [
                {
                    "synchronizer_id": self.synchronizer_id,
                    "min": format_date_time(self.record_time_us(migration_id, 0)),
                    "max": format_date_time(self.record_time_us(migration_id, visible - 1)),
                }
            ],
            "last_import_update_id": last_import,
            "complete": True,
            "import_updates_complete": True,
        }

    # --------------------------------------------------------------------------- ground truth

    def expected_event_ids(self, item: dict[str, Any]) -> list[str]:
        """Pre-order event ids from the generator's own tree (not from walking the item JSON)."""
        uid = item["update_id"]
        pos = self.locate(uid)
        if pos is None:
            raise KeyError(f"unknown update id {uid}")
        m, i = pos
        kind = self.kind(m, i)
        if kind == "assignment":
            return [f"{uid}:0"]
        if kind == "unassignment":
            return []
        tpl = self._template_for(m, i, self._digest(m, i))
        out: list[str] = []
        stack = list(reversed(tpl.roots))
        while stack:
            node = stack.pop()
            out.append(f"{uid}:{node.label}")
            stack.extend(reversed(node.children))
        return out

    # ------------------------------------------------------------------------------ internals

    def _scalars(self, digest: bytes) -> int:
        return int.from_bytes(digest[148:176], "little")

    def _template_for(self, migration_id: int, index: int, digest: bytes) -> _Template:
        if self.is_large(migration_id, index):
            return self._template(-1)
        return self._template(self._scalars(digest) % TEMPLATE_POOL)

    def _template(self, idx: int) -> _Template:
        tpl = self._templates.get(idx)
        if tpl is None:
            with self._template_lock:
                tpl = self._templates.get(idx)
                if tpl is None:
                    tpl = self._build_template(idx)
                    self._templates[idx] = tpl
        return tpl

    def _transaction_json(self, m: int, i: int, digest: bytes) -> bytes:
        tpl = self._template_for(m, i, digest)
        s = self._scalars(digest)
        rt = self.record_time_us(m, i)
        # effective_at is a little before record_time, printed like Instant.toString with a
        # deliberately varied number of digits so clients must parse leniently.
        eff = rt - 1000 - (s >> 16) % 900_000
        fmt = (s >> 40) % 20
        if fmt == 0:
            eff -= eff % US_PER_SECOND
        elif fmt <= 3:
            eff -= eff % 1000
        uid = self._update_id(m, i, digest)
        amounts = [(s >> (60 + 34 * k)) & ((1 << 34) - 1) for k in range(4)]
        mapping = {
            b"U": uid.encode(),
            b"M": b"%d" % m,
            b"RT": format_record_time(rt).encode(),
            b"EF": format_instant(eff, nanos=fmt == 4).encode(),
            b"CA": format_date_time(eff).encode(),
            b"C": (digest[24:56].hex() + "ca101220" + digest[56:86].hex()).encode(),
            b"D": (digest[86:118].hex() + "ca101220" + digest[118:148].hex()).encode(),
            b"RN": b"%d" % (10_000 + (rt - self._start_us) // 600_000_000),
            b"N0": b"%d.%010d" % (amounts[0] % 100_000, amounts[0] % 10**10),
            b"N1": b"%d.%010d" % (amounts[1] % 1_000, amounts[1] % 10**10),
            b"N2": b"%d.%010d" % (amounts[2] % 10_000_000, amounts[2] % 10**10),
            b"N3": b"0.%010d" % (amounts[3] % 10**10),
        }
        return tpl.body % mapping

    def _reassignment(self, m: int, i: int, digest: bytes, kind: str) -> dict[str, Any]:
        block = i // self._block
        pair = f"{m}:{block}"
        unassign_id = f"1220{_hex(self._seed, 'unassign', pair)}"
        cid = f"00{_hex(self._seed, 'rcid', pair)}ca101220{_hex(self._seed, 'rcid2', pair)}"
        h = _mix64(self._seed_mix ^ 0x2EA5 ^ (m << 40) ^ block)
        counter = 1 + h % 3
        owner = self.parties[(h >> 8) % len(self.parties)]
        uid = self._update_id(m, i, digest)
        common_head = {
            "submitter": owner,
            "source_synchronizer": self.synchronizer_id,
        }
        if kind == "unassignment":
            event: dict[str, Any] = {
                **common_head,
                "migration_id": m,
                "target_synchronizer": self.app_synchronizer_id,
                "unassign_id": unassign_id,
                "reassignment_counter": counter,
                "contract_id": cid,
            }
        else:
            created_us = self.record_time_us(m, i) - 3_600_000_000 - (h >> 16) % 86_400_000_000
            signatories = sorted([self.dso_party, owner])
            event = {
                **common_head,
                "target_synchronizer": self.app_synchronizer_id,
                "migration_id": m,
                "unassign_id": unassign_id,
                "created_event": {
                    "event_type": "created_event",
                    "event_id": f"{uid}:0",
                    "contract_id": cid,
                    "template_id": f"{self._pkg['splice-amulet']}:Splice.Amulet:Amulet",
                    "package_name": "splice-amulet",
                    "create_arguments": {
                        "dso": self.dso_party,
                        "owner": owner,
                        "amount": {
                            "initialAmount": f"{(h >> 20) % 10_000}.{(h >> 34) % 10**10:010d}",
                            "createdAt": {
                                "number": str(10_000 + (created_us - self._start_us) // 600_000_000)
                            },
                            "ratePerRound": {"rate": "0.0000190259"},
                        },
                    },
                    "created_at": format_date_time(created_us),
                    "signatories": signatories,
                    "observers": [],
                },
                "reassignment_counter": counter,
            }
        return {
            "update_id": uid,
            "offset": CONSTANT_OFFSET,
            "record_time": self.record_time(m, i),
            "event": event,
        }

    # ------------------------------------------------------------------------ template builder

    def _plan_tree_sizes(self) -> list[int]:
        """Tree sizes for the template pool: 1-event trees, mid-size ones and some 40+ trees,
        nudged so the pool mean equals ``mean_events``."""
        rng = random.Random(self._seed * 7919 + 17)
        mean = max(1.0, self.config.mean_events)
        big_share = 0.05 if mean >= 8 else 0.0
        one_share = 0.15 if mean >= 2 else 1.0
        mid_mean = max(2.0, (mean - one_share - big_share * 50) / max(1e-9, 1 - one_share - big_share))
        sizes: list[int] = []
        for _ in range(TEMPLATE_POOL):
            r = rng.random()
            if r < one_share:
                sizes.append(1)
            elif r < one_share + big_share:
                sizes.append(rng.randint(40, 60))
            else:
                sizes.append(rng.randint(2, max(2, round(2 * mid_mean) - 2)))
        target = round(mean * TEMPLATE_POOL)
        adjustable = [k for k, s in enumerate(sizes) if 1 < s < 40]
        while adjustable and sum(sizes) != target:
            k = adjustable[rng.randrange(len(adjustable))]
            if sum(sizes) < target:
                sizes[k] += 1
            elif sizes[k] > 2:
                sizes[k] -= 1
            elif all(sizes[j] <= 2 for j in adjustable):
                break
        return sizes

    def _build_template(self, idx: int) -> _Template:
        large = idx < 0
        rng = random.Random((self._seed << 20) ^ (0xABCDE if large else idx))
        size = 3 if large else self._template_sizes[idx]
        counter = [0]

        def build(budget: int) -> _Node:
            # A large template keeps its leaves as creates so one of them can carry the big payload.
            node = _Node(label=counter[0], exercised=budget > 1 or (not large and rng.random() < 0.25))
            counter[0] += 1
            if budget > 1:
                n_children = rng.randint(1, min(budget - 1, 6))
                for part in _compose(rng, budget - 1, n_children):
                    node.children.append(build(part))
            return node

        n_roots = 1 if size < 3 or rng.random() < 0.75 else rng.randint(2, min(3, size))
        if large:
            n_roots = 1
        roots = [build(part) for part in _compose(rng, size, n_roots)]
        nodes: dict[int, _Node] = {}
        stack = list(roots)
        while stack:
            node = stack.pop()
            nodes[node.label] = node
            stack.extend(node.children)
        events: dict[str, Any] = {}
        big_label = max(n.label for n in nodes.values() if not n.exercised) if large else -1
        for label in sorted(nodes, key=str):  # v2 sorts events_by_id keys as strings
            node = nodes[label]
            if node.exercised:
                events[f"@@U@@:{label}"] = self._exercised_event(rng, node)
            else:
                events[f"@@U@@:{label}"] = self._created_event(rng, node, big=label == big_label)
        item: dict[str, Any] = {
            "update_id": "@@U@@",
            "migration_id": "@@M@@",
            "workflow_id": f"wallet-batch-{rng.getrandbits(32):08x}" if rng.random() < 0.08 else "",
            "record_time": "@@RT@@",
            "synchronizer_id": self.synchronizer_id,
            "effective_at": "@@EF@@",
            "root_event_ids": [f"@@U@@:{r.label}" for r in roots],
            "events_by_id": events,
        }
        if rng.random() < 0.04:
            # Fields a newer Scan might add; clients must keep, not drop, them.
            item["future_field"] = {"note": "added in a later release", "level": 2, "flags": [True, None]}
        body = orjson.dumps(item).replace(b"%", b"%%").replace(b'"@@M@@"', b"%(M)s")
        body = re.sub(rb"@@([A-Z0-9]+)@@", rb"%(\1)s", body)
        return _Template(body=body, roots=roots, n_events=size)

    def _tid(self, entity: str, package: str) -> str:
        return f"{self._pkg[package]}:{entity}"

    def _pad(self, rng: random.Random, args: dict[str, Any], target: int) -> None:
        """Grow create_arguments to about ``target`` bytes with a token-standard style meta map."""
        size = len(orjson.dumps(args))
        if size + 40 >= target:
            return
        values: dict[str, str] = {"splice.lfdecentralizedtrust.org/reason": rng.choice(_TEXTS)}
        size += 60
        k = 0
        while size < target:
            chunk = " ".join(rng.choice(_TEXTS) for _ in range(rng.randint(2, 6)))
            values[f"app.example/k{k}"] = chunk
            size += len(chunk.encode()) + 20
            k += 1
        args["meta"] = {"values": values}

    def _created_event(self, rng: random.Random, node: _Node, big: bool = False) -> dict[str, Any]:
        entity, package, _w = rng.choices(_CREATE_KINDS, weights=[w for *_, w in _CREATE_KINDS])[0]
        owner = rng.choice(self.parties)
        amount = f"@@N{node.label % 3}@@"
        signatories = [self.dso_party]
        observers: list[str] = []
        args: dict[str, Any]
        if entity == "Splice.Amulet:Amulet":
            signatories.append(owner)
            args = {
                "dso": self.dso_party,
                "owner": owner,
                "amount": {
                    "initialAmount": amount,
                    "createdAt": {"number": "@@RN@@"},
                    "ratePerRound": {"rate": "0.0000190259"},
                },
            }
        elif entity == "Splice.Amulet:LockedAmulet":
            signatories.append(owner)
            holder = rng.choice(self.parties)
            args = {
                "amulet": {
                    "dso": self.dso_party,
                    "owner": owner,
                    "amount": {
                        "initialAmount": amount,
                        "createdAt": {"number": "@@RN@@"},
                        "ratePerRound": {"rate": "0.0000190259"},
                    },
                },
                "lock": {"holders": [holder], "expiresAt": "@@CA@@", "optContext": None},
            }
            observers.append(holder)
        elif entity in ("Splice.Amulet:ValidatorRewardCoupon", "Splice.Amulet:AppRewardCoupon"):
            observers.append(owner)
            args = {"dso": self.dso_party, "user" if "Validator" in entity else "provider": owner}
            if "App" in entity:
                args["featured"] = rng.random() < 0.3
                args["beneficiary"] = None if rng.random() < 0.7 else rng.choice(self.parties)
            args["amount"] = "@@N3@@"
            args["round"] = {"number": "@@RN@@"}
        elif entity == "Splice.Round:OpenMiningRound":
            args = {
                "dso": self.dso_party,
                "round": {"number": "@@RN@@"},
                "amuletPrice": "0.0050000000",
                "opensAt": "@@CA@@",
                "targetClosesAt": "@@CA@@",
                "issuingFor": {"microseconds": "1200000000"},
                "transferConfigUsd": {
                    "createFee": {"fee": "0.0300000000"},
                    "holdingFee": {"rate": "0.0000190259"},
                },
                "issuanceConfig": {
                    "amuletToIssuePerYear": "40000000000.0",
                    "optDevelopmentFundPercentage": None,
                },
                "tickDuration": {"microseconds": "600000000"},
            }
        elif entity == "Splice.DsoRules:VoteRequest":
            args = {
                "dso": self.dso_party,
                "requester": "sv-3",
                "action": {
                    "tag": "ARC_DsoRules",
                    "value": {
                        "tag": "SRARC_SetConfig",
                        "value": {"newConfig": {"numUnclaimedRewardsThreshold": "10"}},
                    },
                },
                "reason": {"url": "", "body": "Zürich ✓ 東京: raise the threshold"},
                "voteBefore": "@@CA@@",
                "votes": [["sv-3", {"sv": owner, "accept": True, "reason": {"url": "", "body": ""}}]],
                "trackingCid": None,
            }
        else:  # ValidatorLicense
            observers.append(owner)
            args = {
                "validator": owner,
                "sponsor": rng.choice(self.parties),
                "dso": self.dso_party,
                "faucetState": {"firstReceivedFor": {"number": "@@RN@@"}, "numCouponsMissed": "0"},
                "metadata": {"version": "0.7.5", "contactPoint": "ops@example.com"},
                "lastActiveAt": "@@CA@@",
            }
        if rng.random() < 0.05:
            args["futureArg"] = {"addedIn": "0.9.0", "values": [None, "x"]}  # unknown to old codegen
        if big:
            self._pad(rng, args, LARGE_PAYLOAD_BYTES)
        else:
            self._pad(rng, args, self.config.payload_bytes)
        return {
            "event_type": "created_event",
            "event_id": f"@@U@@:{node.label}",
            "contract_id": f"00@@C@@{node.label:04x}",
            "template_id": self._tid(entity, package),
            "package_name": package,
            "create_arguments": args,
            "created_at": "@@CA@@",
            "signatories": sorted(set(signatories)),
            "observers": sorted(set(observers)),
        }

    def _exercised_event(self, rng: random.Random, node: _Node) -> dict[str, Any]:
        choices = _INNER_CHOICES if node.children else _LEAF_CHOICES
        entity, package, choice, consuming, result_kind = rng.choice(choices)
        actor = rng.choice(self.parties)
        child_ids = [f"@@U@@:{c.label}" for c in node.children]
        target = self._rules_cid if entity == "Splice.AmuletRules:AmuletRules" else f"00@@D@@{node.label:04x}"
        arg: dict[str, Any]
        result: Any
        if choice == "AmuletRules_Transfer":
            receiver = rng.choice(self.parties)
            arg = {
                "transfer": {
                    "sender": actor,
                    "provider": actor,
                    "inputs": [{"tag": "InputAmulet", "value": f"00@@D@@{node.label + 1:04x}"}],
                    "outputs": [
                        {
                            "receiver": receiver,
                            "receiverFeeRatio": "0.0000000000",
                            "amount": "@@N0@@",
                            "lock": None,
                        }
                    ],
                },
                "context": {
                    "openMiningRound": self._rules_cid,
                    "issuingMiningRounds": [],
                    "validatorRights": [],
                    "featuredAppRight": None,
                },
            }
        elif choice == "AmuletRules_BuyMemberTraffic":
            arg = {
                "inputs": [],
                "memberId": "PAR::sv-3::1220ab",
                "trafficAmount": "@@N1@@",
                "migrationId": "@@RN@@",
            }
        elif choice == "DsoRules_ReceiveSvRewardCoupon":
            arg = {"sv": actor, "beneficiaries": [[actor, "10000"]], "round": {"number": "@@RN@@"}}
        elif choice == "LockedAmulet_Unlock":
            arg = {"openRoundCid": f"00@@D@@{node.label + 2:04x}"}
        elif choice == "OpenMiningRound_Fetch":
            arg = {"p": actor}
        elif choice == "ValidatorLicense_RecordValidatorLivenessActivity":
            arg = {"closedRoundCid": f"00@@D@@{node.label + 3:04x}", "note": "naïve café"}
        else:
            arg = {}
        if result_kind == "object":
            result = {
                "round": {"number": "@@RN@@"},
                "summary": {
                    "inputAmuletAmount": "@@N2@@",
                    "holdingFees": "0.0000000000",
                    "senderChangeFee": "@@N3@@",
                },
                "createdAmulets": [
                    {"tag": "TransferResultAmulet", "value": f"00@@C@@{c.label:04x}"}
                    for c in node.children[:2]
                ],
                "senderChangeAmulet": None,
            }
        elif result_kind == "list":
            result = [f"00@@C@@{c.label:04x}" for c in node.children]
        elif result_kind == "string":
            result = f"00@@C@@{(node.children[0].label if node.children else node.label):04x}"
        elif result_kind == "null":
            result = None
        else:
            result = {}
        interface_id = f"{self._iface_pkg}:{_INTERFACE}" if rng.random() < 0.08 else None
        return {
            "event_type": "exercised_event",
            "event_id": f"@@U@@:{node.label}",
            "contract_id": target,
            "template_id": self._tid(entity, package),
            "package_name": package,
            "choice": choice,
            "choice_argument": arg,
            "child_event_ids": child_ids,
            "exercise_result": result,
            "consuming": consuming,
            "acting_parties": sorted({actor, self.dso_party}) if consuming else [actor],
            "interface_id": interface_id,
        }


def _compose(rng: random.Random, total: int, parts: int) -> list[int]:
    """Random composition of ``total`` into ``parts`` positive integers."""
    if parts <= 1:
        return [total]
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    bounds = [0, *cuts, total]
    return [bounds[k + 1] - bounds[k] for k in range(parts)]
