"""The pipelined hot-path Redis connection (shared/pipe.py, shared/scripts.py) against a
real redis-server of the test's own, which it restarts and whose script cache it flushes."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor import RunStatus, Settings
from conveyor.shared.pipe import RedisPipe
from conveyor.shared.scripts import Scripts
from conveyor.shared.store import NewRun, RunStore
from tests.servers import OwnRedis, free_port


async def test_auth_select_pipelining_and_error_replies(own_redis: OwnRedis) -> None:
    pipe = RedisPipe(f"redis://:s3cret@127.0.0.1:{own_redis.port}/3")
    try:
        # Many commands in one loop turn go out together and come back in order.
        replies = await asyncio.gather(*(pipe.execute("INCR", "n") for _ in range(200)))
        assert replies == list(range(1, 201))
        # An error reply fails only its own caller.
        bad, good = await asyncio.gather(
            pipe.execute("HSET", "n", "f", "v"), pipe.execute("GET", "n"), return_exceptions=True
        )
        assert isinstance(bad, redis.exceptions.ResponseError) and "WRONGTYPE" in str(bad)
        assert good == b"200"
        # SELECT from the URL took effect: the key is in database 3.
        assert redis.Redis(port=own_redis.port, password="s3cret", db=3).get("n") == b"200"
    finally:
        await pipe.close()


async def test_commands_issued_while_a_batch_is_in_flight_go_out_when_it_is_answered(
    own_redis: OwnRedis,
) -> None:
    pipe = RedisPipe(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0")
    try:
        await pipe.execute("PING")  # connected
        first = pipe.call("INCR", "n")
        await asyncio.sleep(0)  # the loop turn ends: the first batch is written
        later = [pipe.call("INCR", "n") for _ in range(5)]
        await asyncio.sleep(0)
        more = [pipe.call("INCR", "n") for _ in range(5)]
        assert await first == 1
        assert await asyncio.gather(*later, *more) == list(range(2, 12))
    finally:
        await pipe.close()


async def test_reconnects_after_a_restart_and_reloads_flushed_scripts(
    own_redis: OwnRedis,
) -> None:
    pipe = RedisPipe(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0")
    scripts = Scripts(pipe, ["heartbeat"])
    try:
        assert await scripts.call("heartbeat", ["run"], ["w", 1, 1000]) == b"MISSING"
        own_redis.stop()
        with pytest.raises(RedisConnectionError):
            await pipe.execute("PING")
        own_redis.start()
        # The next command reconnects; the new server has no scripts: loaded on NOSCRIPT.
        assert await pipe.execute("PING") == b"PONG"
        assert await scripts.call("heartbeat", ["run"], ["w", 1, 1000]) == b"MISSING"
        await pipe.execute("SCRIPT", "FLUSH")
        assert await scripts.call("heartbeat", ["run"], ["w", 1, 1000]) == b"MISSING"
    finally:
        await pipe.close()


async def test_unreachable_redis_fails_the_call_with_a_connection_error() -> None:
    pipe = RedisPipe(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(RedisConnectionError, match="cannot connect to Redis"):
            await pipe.execute("PING")
    finally:
        await pipe.close()


async def test_claim_and_finish_reload_flushed_scripts(own_redis: OwnRedis) -> None:
    # The hot path packs these two calls itself; NOSCRIPT must still load and retry.
    url = f"redis://:s3cret@127.0.0.1:{own_redis.port}/0"
    r = aioredis.Redis.from_url(url)
    store = RunStore(r, Settings(redis_url=url, namespace="pipe"))
    try:
        await store.create([NewRun("run_a", "t", "t", b"{}", [], None, 0)])
        await r.script_flush()
        claim = await store.claim("run_a", "w1", "1")
        assert (claim.kind, claim.attempt) == ("run", 1)
        await r.script_flush()
        finish = await store.finish(
            "run_a", "w1", 1, run_status=RunStatus.COMPLETED, attempt_status="COMPLETED"
        )
        assert finish.kind == "ok"
    finally:
        await store.close()
        await r.aclose()


def test_a_runs_packed_keys_are_its_keys() -> None:
    from conveyor.shared.keys import Keys
    from conveyor.shared.pipe import bulk

    keys = Keys("ns-é")  # a namespace whose bytes outnumber its characters
    run = "run_01a2b3"
    expected = [keys.run(run), keys.steps(run), keys.waits(run), keys.children(run)]
    assert keys.packed(run) == b"".join(bulk(k) for k in expected)
