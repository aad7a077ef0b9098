"""Fuzzing the worker's message handling with malformed bodies and headers (issue item 8).

What the worker does with a delivery before it touches Redis is pure: `validate` (the
body), `delivery_count` (RabbitMQ's header, which any producer can also set) and
`dead_letter_headers` (what a dead letter carries). Whatever a producer sends, they return
one of their documented outcomes and never raise. Bounded so that it runs in seconds.
"""

from __future__ import annotations

import string
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp.decode import field_table as decode_table
from pamqp.encode import field_table

from conveyor.broker.publisher import (
    DROPPED_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    RUN_ID_HEADER,
    dead_letter_headers,
)
from conveyor.shared.bounds import MAX_DELAY_MS
from conveyor.shared.names import check_name
from conveyor.worker.validation import Invalid, Valid, delivery_count, validate

NOW_MS = 1_800_000_000_000
LIMIT = 4096
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
names = st.text(alphabet=string.ascii_letters + string.digits + "_.:-", min_size=1, max_size=12)
messages = st.fixed_dictionaries(
    {"task": names | json_values},
    optional={
        "payload": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
        "id": names | json_values,
        "idempotency_key": st.text(max_size=300) | json_values,
        "tags": st.lists(st.text(max_size=300), max_size=70) | json_values,
        "not_before": st.integers(min_value=-(2**65), max_value=2**65) | json_values,
    },
)


def _nested(depth: int, inner: bytes) -> bytes:
    return b"[" * depth + inner + b"]" * depth


encoded = messages.map(msgspec.json.encode)
deep = st.builds(
    lambda depth, where: (
        b'{"task":"echo","payload":{"v":' + _nested(depth, b"1") + b"}}"
        if where
        else b'{"task":"echo","tags":' + _nested(depth, b'"t"') + b"}"
    ),
    st.integers(min_value=1, max_value=20_000),
    st.booleans(),
)
mangled = st.builds(
    lambda body, cut, junk: body[:cut] + junk + body[cut:],
    encoded,
    st.integers(min_value=0, max_value=200),
    st.binary(max_size=8),
)
bodies = st.one_of(st.binary(max_size=200), encoded, mangled, deep)


@FUZZ
@given(body=bodies, message_id=st.none() | st.text(max_size=30))
def test_validate_returns_a_message_or_a_reason(body: bytes, message_id: str | None) -> None:
    checked = validate(body, message_id, LIMIT, NOW_MS)
    if isinstance(checked, Invalid):
        assert checked.reason and isinstance(checked.reason, str)
        return
    assert isinstance(checked, Valid)
    msg = checked.msg
    assert checked.payload.lstrip().startswith(b"{") and len(checked.payload) <= LIMIT
    check_name("task id", msg.task)
    if msg.id is not None:
        check_name("run id", msg.id)
    assert all(isinstance(t, str) for t in msg.tags)
    if msg.not_before is not None:
        assert 0 <= msg.not_before <= NOW_MS + MAX_DELAY_MS


header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=50)
    | st.binary(max_size=20)
    | st.builds(bytearray, st.binary(max_size=20))
    | st.decimals(allow_nan=True, places=2)
    | st.datetimes(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
headers = st.dictionaries(
    st.text(max_size=20) | st.sampled_from(["x-delivery-count", "x-death", REASON_HEADER]),
    header_values | st.integers(min_value=1000, max_value=40_000).map(lambda n: "h" * n),
    max_size=8,
)


@FUZZ
@given(value=header_values)
def test_delivery_count_is_a_count_whatever_the_header(value: Any) -> None:
    count = delivery_count({"x-delivery-count": value})
    assert isinstance(count, int) and count >= 0


@FUZZ
@given(
    headers=headers,
    reason=st.text(max_size=2000),
    run_id=st.none() | names,
    limit=st.integers(min_value=8192, max_value=131_064),
)
def test_dead_letter_headers_always_encode_within_the_frame(
    headers: dict[str, Any], reason: str, run_id: str | None, limit: int
) -> None:
    table = dead_letter_headers(headers, reason, "echo", run_id, limit)
    encoded = field_table(table)
    assert len(encoded) <= limit
    _, decoded = decode_table(encoded)
    assert decoded[REASON_HEADER] == reason[:1000] and decoded[QUEUE_HEADER] == "echo"
    assert decoded.get(RUN_ID_HEADER) == (run_id or None)
    assert not any(str(k).startswith("x-death") for k in decoded)
    if DROPPED_HEADER not in decoded:
        assert set(decoded) >= {k for k in headers if not k.startswith("x-death")}
