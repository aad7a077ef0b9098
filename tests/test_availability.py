"""Telling an unavailable service from a bad message, and the gate that waits for it
(shared/availability.py). The outages themselves are in test_redis_outage.py."""

from __future__ import annotations

import asyncio

import aiormq.exceptions
import pytest
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor.shared.availability import Gate, is_broker_unavailable, is_redis_unavailable
from conveyor.shared.errors import PublishFailed, ServiceUnavailable


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (RedisConnectionError("refused"), True),
        (TimeoutError(), True),
        (ResponseError("LOADING Redis is loading the dataset in memory"), True),
        (ResponseError("READONLY You can't write against a read only replica."), True),
        (ResponseError("BUSY Redis is busy running a script."), True),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (ClusterDownError("CLUSTERDOWN The cluster is down"), True),
        (ClusterError("TTL exhausted."), True),
        (SlotNotCoveredError("Slot 42 is not covered by the cluster."), True),
        (RedisClusterException("Redis Cluster cannot be connected. Please provide..."), True),
        (RedisClusterException("No way to dispatch this command to Redis Cluster."), False),
        (ResponseError("CROSSSLOT Keys in request don't hash to the same slot"), False),
        (ResponseError("WRONGPASS invalid username-password pair"), False),
        (ValueError("a bug"), False),
    ],
)
def test_redis_errors(exc: BaseException, unavailable: bool) -> None:
    assert is_redis_unavailable(exc) is unavailable


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (aiormq.exceptions.AMQPConnectionError("refused"), True),
        (ConnectionResetError(), True),
        (PublishFailed("no confirm in time", unknown=True), True),
        (PublishFailed("unroutable"), False),
        (aiormq.exceptions.ChannelPreconditionFailed("x-delivery-limit differs"), False),
        (aiormq.exceptions.AuthenticationError("wrong password"), False),
        (RecursionError(), False),
    ],
)
def test_broker_errors(exc: BaseException, unavailable: bool) -> None:
    assert is_broker_unavailable(exc) is unavailable


def _gate(stopping: asyncio.Event, hold_for: float = 5.0) -> Gate:
    return Gate("Redis", unavailable=is_redis_unavailable, stopping=stopping, hold_for=hold_for)


async def test_a_call_waits_while_the_service_is_away_and_is_made_again() -> None:
    failures = iter([RedisConnectionError("down")] * 3)

    async def op() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "answered"

    gate = _gate(asyncio.Event())
    assert await gate.call(op) == "answered"
    assert gate.is_open
    await gate.aclose()


async def test_an_error_that_is_not_an_outage_is_raised_at_once() -> None:
    async def op() -> None:
        raise ResponseError("WRONGTYPE no")

    gate = _gate(asyncio.Event())
    with pytest.raises(ResponseError):
        await gate.call(op)
    assert gate.is_open


async def test_a_wait_ends_when_stopping_or_after_hold_for() -> None:
    async def op() -> None:
        raise RedisConnectionError("down for good")

    stopping = asyncio.Event()
    gate = _gate(stopping, hold_for=0.5)
    with pytest.raises(ServiceUnavailable, match="unavailable for"):
        await asyncio.wait_for(gate.call(op), timeout=10)
    asyncio.get_running_loop().call_later(0.2, stopping.set)
    gate_long = _gate(stopping, hold_for=60)
    with pytest.raises(ServiceUnavailable, match="stopping"):
        await asyncio.wait_for(gate_long.call(op), timeout=10)
    await gate.aclose()
    await gate_long.aclose()
