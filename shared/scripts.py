"""The Lua scripts, called by SHA over the pipelined connection (see pipe.py)."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import ResponseError

from .pipe import Arg, RedisPipe, bulk


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


class Scripts:
    def __init__(self, pipe: RedisPipe, names: list[str]) -> None:
        self.pipe = pipe
        self._source = {name: _source(name) for name in names}
        # "EVALSHA <sha>" packed once per script: most of a call's bytes never change.
        self._head = {
            name: bulk("EVALSHA") + bulk(hashlib.sha1(src.encode()).hexdigest())
            for name, src in self._source.items()
        }

    def head(self, name: str, keys: int, args: int) -> bytes:
        """The packed start of a call of `name` with that many keys and arguments; the
        keys and arguments follow it, each packed with pipe.bulk()."""
        return b"*%d\r\n%s%s" % (3 + keys + args, self._head[name], bulk(keys))

    async def call(self, name: str, keys: list[str], args: list[Arg]) -> Any:
        head = self.head(name, len(keys), len(args))
        return await self.call_packed(name, head + b"".join(map(bulk, [*keys, *args])))

    async def call_packed(self, name: str, command: bytes) -> Any:
        """Send a whole call packed ahead (head() and bulk()): the hot path keeps the
        parts that never change packed."""
        reply = await self.pipe.send(command)
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or flushed its script cache: load the script and call again.
            await self.pipe.execute("SCRIPT", "LOAD", self._source[name])
            reply = await self.pipe.send(command)
        if isinstance(reply, ResponseError):
            raise reply
        return reply
