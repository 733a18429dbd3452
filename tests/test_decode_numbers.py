"""decode_json keeps integers beyond 64 bits exact (orjson would turn them into floats), fast path aside."""

from __future__ import annotations

import json

import orjson
import pytest
from scan_ingest.scan_client import _CHUNK, _may_hold_big_int, decode_json


@pytest.mark.parametrize(
    "number",
    [2**64, 2**70 + 1, 10**25, -(2**63) - 1, -(10**19), -(10**30)],
    ids=["u64+1", "2^70+1", "1e25", "i64min-1", "-1e19", "-1e30"],
)
@pytest.mark.parametrize("where", ["value", "array", "spaced", "top"])
def test_big_integers_stay_exact(number: int, where: str) -> None:
    text = {"value": '{"a":%d}', "array": '[1,%d,2]', "spaced": '{"a": %d}', "top": "%d"}[where] % number
    assert repr(orjson.loads(text)) != repr(json.loads(text))  # orjson alone makes it a float
    assert repr(decode_json(text.encode())) == repr(json.loads(text))


@pytest.mark.parametrize("body", [
    b'{"cid":"00a12345678901234567890123456789b"}',  # digits inside a contract id
    b'{"n":"123456789012345678901234567890"}',  # a numeric string (Daml Int64/Numeric in compact_json)
    b'{"x":1.12345678901234567890123}',  # a fraction is a float either way
    b'{"a":1234567890123456789}',
])
def test_numbers_orjson_reads_exactly_take_the_fast_path(body: bytes) -> None:
    assert not _may_hold_big_int(body)
    assert repr(decode_json(body)) == repr(json.loads(body))


def test_the_64_bit_limits_decode_exactly() -> None:
    body = b'{"m":18446744073709551615,"k":-9223372036854775808,"i":9223372036854775807}'
    assert repr(decode_json(body)) == repr(json.loads(body))


@pytest.mark.parametrize("shift", range(-30, 30, 7))
def test_a_number_across_the_scan_chunk_boundary_is_found(shift: int) -> None:
    filler = b'"' + b"x" * (_CHUNK + shift - 3) + b'",'
    assert _may_hold_big_int(b"[" + filler + b"12345678901234567890]")
    assert _may_hold_big_int(b"[" + filler + b"-1234567890123456789]")
    assert not _may_hold_big_int(b"[" + filler + b'"12345678901234567890"]')
