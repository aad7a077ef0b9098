"""The Lua scripts, called by SHA through the hot path's batcher (see batcher.py)."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from .batcher import Arg, Command, CommandBatcher


def source(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


class Scripts:
    def __init__(self, batcher: CommandBatcher, names: list[str]) -> None:
        self.batcher = batcher
        self._source = {name: source(name) for name in names}
        self.sha = {
            name: hashlib.sha1(src.encode()).hexdigest() for name, src in self._source.items()
        }

    def head(self, name: str, keys: int) -> Command:
        """The start of a call of `name` with that many keys; the keys and arguments
        follow it."""
        return ("EVALSHA", self.sha[name], keys)

    def command(self, name: str, keys: list[str], args: list[Arg]) -> Command:
        return (*self.head(name, len(keys)), *keys, *args)

    async def call(self, name: str, keys: list[str], args: list[Arg]) -> Any:
        command = self.command(name, keys, args)
        reply = await self.batcher.call(*command)
        if isinstance(reply, ResponseError):
            return await self.retry(name, command, reply)
        return reply

    async def retry(self, name: str, command: Command, error: ResponseError) -> Any:
        """After an error reply to `command`: if Redis restarted or flushed its script
        cache (NOSCRIPT), load the script and call again; otherwise raise the error. The
        hot path awaits the batcher itself and comes here only on an error."""
        if not isinstance(error, NoScriptError):
            raise error
        await self.batcher.load_script(self._source[name])
        reply = await self.batcher.call(*command)
        if isinstance(reply, ResponseError):
            raise reply
        return reply
