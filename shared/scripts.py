"""Lua scripts, called through one pipeline per event-loop turn.

Concurrent runs in a worker each make the same few script calls; sending every call made
in one turn of the event loop as a single pipeline costs one round trip and one socket
write for all of them instead of one each.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

Pending = tuple[str, list[str], list[Any], "asyncio.Future[Any]"]


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


class Scripts:
    def __init__(self, redis: aioredis.Redis, names: list[str]) -> None:
        self.redis = redis
        self._source = {name: _source(name) for name in names}
        self._sha = {
            name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._source.items()
        }
        self._pending: list[Pending] = []
        self._flushes: set[asyncio.Task[None]] = set()

    def call(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue a script call for this loop turn's pipeline; await the returned future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((name, keys, args, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[Pending]) -> None:
        try:
            replies = await self._execute(batch)
            if any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted or flushed its script cache: load and send again.
                for source in self._source.values():
                    await self.redis.script_load(source)
                replies = await self._execute(batch)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(self, batch: list[Pending]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, keys, args, _ in batch:
                pipe.evalsha(self._sha[name], len(keys), *keys, *args)
            result: list[Any] = await pipe.execute(raise_on_error=False)
            return result
