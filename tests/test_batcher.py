"""The hot path's command batcher (shared/batcher.py, shared/scripts.py) against a real
redis-server of the test's own, which it restarts, pauses and whose script cache it flushes."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor import RunStatus, Settings
from conveyor.shared.batcher import CommandBatcher
from conveyor.shared.redis_client import hot_path_client
from conveyor.shared.scripts import Scripts
from conveyor.shared.store import NewRun, RunStore
from tests.servers import OwnRedis, free_port


def batcher(url: str, timeout: float = 10.0) -> CommandBatcher:
    settings = Settings(redis_url=url, connect_timeout=2.0)
    return CommandBatcher(hot_path_client(settings), timeout=timeout)


async def test_auth_select_batching_and_error_replies(own_redis: OwnRedis) -> None:
    b = batcher(f"redis://:s3cret@127.0.0.1:{own_redis.port}/3")
    try:
        # Many commands in one loop turn go out together and come back in order.
        replies = await asyncio.gather(*(b.execute("INCR", "n") for _ in range(200)))
        assert replies == list(range(1, 201))
        # An error reply fails only its own caller.
        bad, good = await asyncio.gather(
            b.execute("HSET", "n", "f", "v"), b.execute("GET", "n"), return_exceptions=True
        )
        assert isinstance(bad, redis.exceptions.ResponseError) and "WRONGTYPE" in str(bad)
        assert good == b"200"
        # The database of the URL took effect: the key is in database 3.
        assert redis.Redis(port=own_redis.port, password="s3cret", db=3).get("n") == b"200"
    finally:
        await b.close()


async def test_commands_issued_while_a_batch_is_in_flight_go_out_when_it_is_answered(
    own_redis: OwnRedis,
) -> None:
    b = batcher(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0")
    sent: list[int] = []
    round_trip = b._round_trip

    async def counted(commands: list[tuple[object, ...]]) -> list[object]:
        sent.append(len(commands))
        return await round_trip(commands)

    b._round_trip = counted  # type: ignore[method-assign]
    try:
        await b.execute("PING")  # connected
        first = b.call("INCR", "n")
        await asyncio.sleep(0)  # the loop turn ends: the first batch leaves
        later = [b.call("INCR", "n") for _ in range(5)]
        await asyncio.sleep(0)
        more = [b.call("INCR", "n") for _ in range(5)]
        assert await first == 1
        assert await asyncio.gather(*later, *more) == list(range(2, 12))
        # The ten issued while the first was in flight left together.
        assert sent == [1, 1, 10]
    finally:
        await b.close()


async def test_reconnects_after_a_restart_and_reloads_flushed_scripts(
    own_redis: OwnRedis,
) -> None:
    b = batcher(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0")
    scripts = Scripts(b, ["heartbeat"])
    try:
        assert await scripts.call("heartbeat", ["run"], ["w", 1, 1000]) == b"MISSING"
        own_redis.stop()
        with pytest.raises(RedisConnectionError):
            await b.execute("PING")
        own_redis.start()
        # The next command reconnects; the new server has no scripts: loaded on NOSCRIPT.
        assert await b.execute("PING") == b"PONG"
        assert await scripts.call("heartbeat", ["run"], ["w", 1, 1000]) == b"MISSING"
        await b.execute("SCRIPT", "FLUSH")
        assert await scripts.call("heartbeat", ["run"], ["w", 1, 1000]) == b"MISSING"
    finally:
        await b.close()


async def test_a_hung_server_fails_the_batch_within_the_timeout_then_recovers(
    own_redis: OwnRedis,
) -> None:
    b = batcher(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0", timeout=1.0)
    try:
        await b.execute("PING")
        own_redis.pause()  # SIGSTOP: the socket stays open, nothing answers
        began = time.monotonic()
        try:
            with pytest.raises(RedisTimeoutError, match=r"within 1\.0s"):
                await b.execute("INCR", "n")
        finally:
            own_redis.resume()
        assert time.monotonic() - began >= 1.0
        # The timed-out connection was dropped: its late reply cannot answer the next call.
        assert await b.execute("GET", "n") == b"1"
        assert await b.execute("INCR", "n") == 2
    finally:
        await b.close()


async def test_unreachable_redis_fails_the_call_with_a_connection_error() -> None:
    b = batcher(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(RedisConnectionError):
            await b.execute("PING")
    finally:
        await b.close()


async def test_claim_and_finish_reload_flushed_scripts(own_redis: OwnRedis) -> None:
    # The hot path awaits the batcher itself; NOSCRIPT must still load and retry.
    url = f"redis://:s3cret@127.0.0.1:{own_redis.port}/0"
    r = aioredis.Redis.from_url(url)
    store = RunStore(r, Settings(redis_url=url, namespace="batcher"))
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


def test_a_runs_four_keys_are_its_keys() -> None:
    from conveyor.shared.keys import Keys

    keys = Keys("ns-é")
    run = "run_01a2b3"
    expected = (keys.run(run), keys.steps(run), keys.waits(run), keys.children(run))
    assert keys.four(run) == expected
