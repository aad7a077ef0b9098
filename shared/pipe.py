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


def _pack(args: tuple[Arg, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = repr(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


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
        self._pending: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._connect_lock = asyncio.Lock()
        self._sends: set[asyncio.Task[None]] = set()

    def call(self, *args: Arg) -> asyncio.Future[Any]:
        """Send a command with this loop turn's batch; the future gets the reply (an error
        reply is returned as a ResponseError instance, not raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((_pack(args), future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return future

    async def execute(self, *args: Arg) -> Any:
        """One command; an error reply is raised."""
        reply = await self.call(*args)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def close(self) -> None:
        if self._sends:
            await asyncio.wait(list(self._sends))
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.reading is not None:
                conn.reading.cancel()
                await asyncio.wait([conn.reading])
            conn.fail(RedisConnectionError("connection closed"))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        try:
            conn = self._conn or await self._connect()
        except Exception as exc:
            error = RedisConnectionError(f"cannot connect to Redis: {exc!r}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        # No await between queueing the futures and writing: replies come back in order.
        conn.waiting.extend(future for _, future in batch)
        conn.writer.write(b"".join(data for data, _ in batch))
        try:
            await conn.writer.drain()
        except Exception as exc:
            self._drop(conn, RedisConnectionError(f"lost the Redis connection: {exc!r}"))

    async def _connect(self) -> _Connection:
        async with self._connect_lock:
            if self._conn is not None:
                return self._conn
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
                writer.write(_pack(command))
                reply: Any = False
                while reply is False:
                    parser.feed(await reader.read(65536))
                    reply = parser.gets()
                if isinstance(reply, ResponseError):
                    writer.close()
                    raise reply
            conn = self._conn = _Connection(writer)
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
