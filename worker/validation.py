"""What the worker checks in a delivered message before it touches Redis: a pure function
that returns the message and its payload, or the reason it is dead-lettered with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from conveyor.shared.bounds import not_before_problem, options_problem, wire_ttl_problem
from conveyor.shared.errors import ConfigurationError
from conveyor.shared.models import RunMessage
from conveyor.shared.names import check_name

_decoder = msgspec.json.Decoder(RunMessage)

# Bodies larger than the payload limit by more than this cannot hold a payload within it.
ENVELOPE_BYTES = 64 * 1024


class Valid(msgspec.Struct, gc=False):
    msg: RunMessage
    payload: bytes


class Invalid(msgspec.Struct, frozen=True, gc=False):
    reason: str


def validate(
    body: bytes, message_id: str | None, max_payload_bytes: int, now_ms: int
) -> Valid | Invalid:
    """Decode and check a work-queue message. A run id from `message_id` is used when the
    body has none; the id stays None when neither has one. Never raises on any input."""
    if len(body) > max_payload_bytes + ENVELOPE_BYTES:
        return Invalid(f"message of {len(body)} bytes is over the limit")
    try:
        msg = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        return Invalid(f"invalid message body: {exc}")
    except RecursionError:
        # msgspec walks nested JSON recursively, within Python's recursion limit.
        return Invalid("invalid message body: JSON is nested too deeply")
    payload = bytes(msg.payload)
    if not payload.lstrip().startswith(b"{"):
        return Invalid("invalid message body: payload must be a JSON object")
    if len(payload) > max_payload_bytes:
        return Invalid(f"payload of {len(payload)} bytes is over the limit of {max_payload_bytes}")
    if msg.id is None:
        msg.id = message_id
    try:
        if msg.id is not None:
            check_name("run id", msg.id)  # it becomes part of Redis keys
        check_name("task id", msg.task)
    except ConfigurationError as exc:
        return Invalid(f"invalid message body: {exc}")
    problem = options_problem(msg.idempotency_key, msg.tags, msg.concurrency_key)
    if problem is not None:
        return Invalid(f"invalid message body: {problem[0]}: {problem[1]}")
    if msg.not_before is not None:
        late = not_before_problem(msg.not_before, now_ms)
        if late is not None:
            return Invalid(f"invalid message body: {late}")
    if msg.ttl is not None:
        bad = wire_ttl_problem(msg.ttl)
        if bad is not None:
            return Invalid(f"invalid message body: {bad}")
    return Valid(msg, payload)


def delivery_count(headers: Mapping[str, Any]) -> int:
    """RabbitMQ's count of earlier deliveries; 0 when the header is absent or not a count
    (any producer can set headers)."""
    count = headers.get("x-delivery-count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return 0
    return count
