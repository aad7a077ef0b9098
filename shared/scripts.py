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

    async def call(self, name: str, keys: list[str], args: list[Arg]) -> Any:
        command = b"*%d\r\n%s%s%s" % (
            3 + len(keys) + len(args),
            self._head[name],
            bulk(len(keys)),
            b"".join(map(bulk, [*keys, *args])),
        )
        reply = await self.pipe.send(command)
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or flushed its script cache: load the script and call again.
            await self.pipe.execute("SCRIPT", "LOAD", self._source[name])
            reply = await self.pipe.send(command)
        if isinstance(reply, ResponseError):
            raise reply
        return reply
