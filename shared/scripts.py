"""The Lua scripts, called by SHA over the pipelined connection (see pipe.py)."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import ResponseError

from .pipe import Arg, RedisPipe, bulk


def source(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


class Scripts:
    def __init__(self, pipe: RedisPipe, names: list[str]) -> None:
        self.pipe = pipe
        self._source = {name: source(name) for name in names}
        self.sha = {
            name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._source.items()
        }
        # "EVALSHA <sha>" packed once per script: most of a call's bytes never change.
        self._head = {name: bulk("EVALSHA") + bulk(sha) for name, sha in self.sha.items()}

    def head(self, name: str, keys: int, args: int) -> bytes:
        """The packed start of a call of `name` with that many keys and arguments; the
        keys and arguments follow it, each packed with pipe.bulk(). The hot path keeps
        the parts of its calls that never change packed."""
        return b"*%d\r\n%s%s" % (3 + keys + args, self._head[name], bulk(keys))

    def command(self, name: str, keys: list[str], args: list[Arg]) -> bytes:
        return self.head(name, len(keys), len(args)) + b"".join(map(bulk, [*keys, *args]))

    async def call(self, name: str, keys: list[str], args: list[Arg]) -> Any:
        command = self.command(name, keys, args)
        reply = await self.pipe.send(command)
        if isinstance(reply, ResponseError):
            return await self.retry(name, command, reply)
        return reply

    async def retry(self, name: str, command: bytes, error: ResponseError) -> Any:
        """After an error reply to `command`: if Redis restarted or flushed its script
        cache (NOSCRIPT), load the script and call again; otherwise raise the error. The
        hot path awaits the pipe itself and comes here only on an error."""
        if not str(error).startswith("NOSCRIPT"):
            raise error
        await self.pipe.execute("SCRIPT", "LOAD", self._source[name])
        reply = await self.pipe.send(command)
        if isinstance(reply, ResponseError):
            raise reply
        return reply
