"""The hot path's Redis commands (claim, checkpoint, finish, create), batched per loop turn.

Commands issued in one turn of the event loop leave together, on one connection of the
redis-py client, in one write; the replies are read back in order. One batch is in flight
at a time: commands issued meanwhile gather and leave as soon as it is answered (as Nagle's
algorithm does for TCP). Under load this makes the batches several times larger, and an
idle batcher still sends at once.

redis-py's pipeline would do the same per batch, at about twice the CPU per command: its
asyncio connection packs commands in Python and puts a timer around every reply. Here
hiredis packs the whole batch and one timeout bounds it, on the connections of the same
client (plain, TLS or Sentinel-managed), so every option of the URL applies. A batch that
times out or fails drops its connection: the replies still owed would answer the next one.

On a Redis Cluster a batch goes through redis-py's cluster pipeline instead, which sends
each node its commands and follows MOVED and failovers; the batching per loop turn is the
same. Replies then pass redis-py's parsers (a PEXPIRE answers True, not 1): the hot path
sends scripts, whose replies no parser touches.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = bytes | str | int | float
Command = tuple[Arg, ...]


class CommandBatcher:
    def __init__(self, client: aioredis.Redis | RedisCluster, *, timeout: float) -> None:
        """`client` should have no socket_timeout of its own: `timeout` bounds each batch
        (connecting included) instead of a timer per reply."""
        self.client = client
        self.timeout = timeout
        self._commands: list[Command] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._in_flight: asyncio.Task[None] | None = None

    def call(self, *args: Arg) -> asyncio.Future[Any]:
        """Send a command with this loop turn's batch; the future gets the reply (an error
        reply is returned as a ResponseError instance, not raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._commands.append(args)
        self._futures.append(future)
        if len(self._futures) == 1 and self._in_flight is None:
            loop.call_soon(self._flush)
        return future

    async def execute(self, *args: Arg) -> Any:
        """One command; an error reply is raised."""
        reply = await self.call(*args)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def load_script(self, source: str) -> None:
        """SCRIPT LOAD, on every primary of a cluster."""
        if isinstance(self.client, RedisCluster):
            async with asyncio.timeout(self.timeout):
                await self.client.script_load(source)
        else:
            await self.execute("SCRIPT", "LOAD", source)

    async def close(self) -> None:
        if self._in_flight is not None:
            await asyncio.wait([self._in_flight])
        if isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self.client.connection_pool.disconnect()

    def _flush(self) -> None:
        if self._in_flight is not None or not self._futures:
            return
        commands, self._commands = self._commands, []
        futures, self._futures = self._futures, []
        self._in_flight = asyncio.get_running_loop().create_task(self._send(commands, futures))

    async def _send(self, commands: list[Command], futures: list[asyncio.Future[Any]]) -> None:
        try:
            try:
                replies = await self._round_trip(commands)
            except RedisConnectionError:
                # A pooled connection is found dead only when used (Redis restarted or
                # failed over meanwhile): once more on a new one. Every command sent here
                # is one its caller may repeat (a worker's Redis gate resends them anyway).
                replies = await self._round_trip(commands)
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        else:
            for future, reply in zip(futures, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
        finally:
            self._in_flight = None
            if self._futures:
                # After the callers just answered have had their turn: what they send next
                # goes with it.
                asyncio.get_running_loop().call_soon(self._flush)

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        if isinstance(self.client, RedisCluster):
            return await self._cluster_round_trip(self.client, commands)
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send_packed_command(
                    b"".join([hiredis.pack_command(c) for c in commands]),  # type: ignore[arg-type]
                    check_health=False,
                )
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response(disable_decoding=True))
                    except ResponseError as error:
                        replies.append(error)
            return replies
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError(f"Redis did not answer within {self.timeout}s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            await conn.disconnect(nowait=True)
            raise RedisConnectionError(f"lost the Redis connection: {exc!r}") from exc
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def _cluster_round_trip(
        self, cluster: RedisCluster, commands: list[Command]
    ) -> list[Any]:
        pipe = cluster.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            async with asyncio.timeout(self.timeout):
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except TimeoutError:
            raise RedisTimeoutError(f"Redis did not answer within {self.timeout}s") from None
        for reply in replies:
            # Only error replies are answers; a node lost past the pipeline's own retries
            # fails the batch as a lost connection does.
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                raise reply
        return replies
