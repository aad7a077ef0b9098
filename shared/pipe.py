"""A pipelined Redis connection for the hot path (claim, finish, checkpoint, create).

Commands issued in one turn of the event loop are written to one connection in a single
write, and replies are handed back in order as they arrive, with any number of batches in
flight. redis-py spends most of a run's Redis time on per-command machinery (pool,
pipeline objects, timeouts); this does the same work for a fraction of it, parsing with
hiredis. redis-py still serves everything else: reads, pub/sub, administration.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Arg = bytes | str | int | float


def bulk(arg: Arg) -> bytes:
    """One argument of a command in the Redis protocol (a bulk string)."""
    if isinstance(arg, bytes):
        data = arg
    elif isinstance(arg, str):
        data = arg.encode()
    else:
        data = repr(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack(args: tuple[Arg, ...]) -> bytes:
    """A whole command in the Redis protocol."""
    return b"*%d\r\n%s" % (len(args), b"".join(map(bulk, args)))


class _Connection:
    """One socket and the callers waiting for its replies, in the order they were sent."""

    __slots__ = ("reading", "waiting", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.reading: asyncio.Task[None] | None = None

    def fail(self, error: Exception) -> None:
        self.writer.close()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RedisPipe:
    def __init__(self, url: str) -> None:
        self._params: dict[str, Any] = dict(parse_url(url))
        self._conn: _Connection | None = None
        self._data: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        # Set while connecting: commands queue up until the connection is there.
        self._connecting: asyncio.Task[None] | None = None

    def call(self, *args: Arg) -> asyncio.Future[Any]:
        """Send a command with this loop turn's batch; the future gets the reply (an error
        reply is returned as a ResponseError instance, not raised)."""
        return self.send(pack(args))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """As call(), for a command already packed (see pack())."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._data.append(command)
        self._futures.append(future)
        if len(self._futures) == 1 and self._connecting is None:
            loop.call_soon(self._flush)
        return future

    async def execute(self, *args: Arg) -> Any:
        """One command; an error reply is raised."""
        reply = await self.call(*args)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def close(self) -> None:
        if self._connecting is not None:
            await asyncio.wait([self._connecting])
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.reading is not None:
                conn.reading.cancel()
                await asyncio.wait([conn.reading])
            conn.fail(RedisConnectionError("connection closed"))

    def _flush(self) -> None:
        """Write this turn's commands, without a task or an await: the futures are queued
        for replies in the same step as the bytes are written, so replies match in order.
        The callers awaiting their replies bound what is in flight, so nothing waits for
        the socket buffer to drain; a broken socket shows up in the reader."""
        if not self._futures:
            return
        conn = self._conn
        if conn is None:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        data, self._data = self._data, []
        futures, self._futures = self._futures, []
        conn.waiting.extend(futures)
        try:
            conn.writer.write(b"".join(data))
        except Exception as exc:  # the transport closed before the reader saw it
            self._drop(conn, RedisConnectionError(f"lost the Redis connection: {exc!r}"))

    async def _connect(self) -> None:
        """Connect, then send what queued up meanwhile; if that fails, fail those calls."""
        try:
            self._conn = await self._open()
        except Exception as exc:
            error = RedisConnectionError(f"cannot connect to Redis: {exc!r}")
            futures, self._futures, self._data = self._futures, [], []
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._connecting = None
        self._flush()

    async def _open(self) -> _Connection:
        p = self._params
        cls = p.get("connection_class")
        if cls is UnixDomainSocketConnection:
            reader, writer = await asyncio.open_unix_connection(p["path"])
        else:
            context = ssl.create_default_context() if cls is SSLConnection else None
            reader, writer = await asyncio.open_connection(
                p.get("host", "127.0.0.1"), p.get("port", 6379), ssl=context
            )
        parser = hiredis.Reader(replyError=ResponseError)
        handshake: list[tuple[Arg, ...]] = []
        if p.get("password"):
            user = p.get("username")
            handshake.append(("AUTH", user, p["password"]) if user else ("AUTH", p["password"]))
        if p.get("db"):
            handshake.append(("SELECT", p["db"]))
        for command in handshake:
            writer.write(pack(command))
            reply: Any = False
            while reply is False:
                parser.feed(await reader.read(65536))
                reply = parser.gets()
            if isinstance(reply, ResponseError):
                writer.close()
                raise reply
        conn = _Connection(writer)
        conn.reading = asyncio.get_running_loop().create_task(self._read(conn, reader, parser))
        return conn

    async def _read(
        self, conn: _Connection, reader: asyncio.StreamReader, parser: hiredis.Reader
    ) -> None:
        waiting = conn.waiting
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                parser.feed(data)
                reply = parser.gets()
                while reply is not False:
                    future = waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
                    reply = parser.gets()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = (
                exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(repr(exc))
            )
            self._drop(conn, error)

    def _drop(self, conn: _Connection, error: Exception) -> None:
        """Fail every command waiting on a broken connection; the next call reconnects."""
        if self._conn is conn:
            self._conn = None
        conn.fail(error)
