"""A pipelined Redis connection for the hot path (claim, finish, checkpoint, create).

Commands issued in one turn of the event loop are written to one connection in a single
write, and replies are handed back in order as they arrive. One batch is in flight at a
time: commands issued meanwhile gather and leave together as soon as it is answered (as
Nagle's algorithm does for TCP). A write to a local Redis costs the worker about as much
as the Python work of a run's two scripts, and Redis a read; under load this makes the
batches about three times larger, and an idle connection still sends at once.

redis-py spends most of a run's Redis time on per-command machinery (pool, pipeline
objects, timeouts); this does the same work for a fraction of it, parsing with hiredis.
redis-py still serves everything else: reads, pub/sub, administration.

Nothing waits on it without a bound: connecting (and the AUTH/SELECT handshake) has
`connect_timeout`, and a connection that has calls waiting but has received nothing for
`timeout` seconds (a hung or paused server, a half-open connection) is dropped, failing
those calls, by a watchdog that looks four times per `timeout` rather than a timer per call.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


class _Connection(asyncio.Protocol):
    """One socket and the callers waiting for its replies, in the order they were sent.

    Replies are parsed as the bytes arrive (a protocol, not a stream and a reader task):
    the callers wake in the loop turn after the reply, not one later."""

    def __init__(
        self,
        parser: hiredis.Reader,
        lost: Callable[[_Connection, Exception], None],
        idle: Callable[[], None],
    ):
        self.idle = idle
        self.parser = parser
        self.lost = lost
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        # Bumped by every write and every read: the watchdog's sign of life.
        self.progress = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        waiting = self.waiting
        try:
            self.parser.feed(data)
            reply = self.parser.gets()
            while reply is not False:
                future = waiting.popleft()
                if not future.done():
                    future.set_result(reply)
                reply = self.parser.gets()
            if not waiting:
                self.idle()
        except Exception as exc:  # not the Redis protocol, or a reply nobody waits for
            self.lost(self, RedisConnectionError(repr(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost(self, RedisConnectionError(f"lost the Redis connection: {exc!r}"))

    def fail(self, error: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()  # not close(): a hung server would never take the rest
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RedisPipe:
    def __init__(self, url: str, *, timeout: float = 10.0, connect_timeout: float = 5.0) -> None:
        self._params: dict[str, Any] = dict(parse_url(url))
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._watchdog: asyncio.Task[None] | None = None
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
            conn = self._conn
            if conn is None or not conn.waiting:
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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(RedisConnectionError("connection closed"))

    def _flush(self) -> None:
        """Write this turn's commands, without a task or an await: the futures are queued
        for replies in the same step as the bytes are written, so replies match in order.
        The callers awaiting their replies bound what is in flight, so nothing waits for
        the socket buffer to drain; a broken socket shows up as connection_lost."""
        if not self._futures:
            return
        conn = self._conn
        if conn is None:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        if conn.waiting:
            return  # sent as soon as the batch in flight is answered (see _idle)
        data, self._data = self._data, []
        futures, self._futures = self._futures, []
        self._write(conn, data, futures)

    def _write(
        self, conn: _Connection, data: list[bytes], futures: list[asyncio.Future[Any]]
    ) -> None:
        """One write carrying a batch; its replies will come back in this order."""
        conn.waiting.extend(futures)
        conn.progress += 1
        try:
            assert conn.transport is not None
            conn.transport.write(b"".join(data))
        except Exception as exc:  # the transport closed before connection_lost came
            self._drop(conn, RedisConnectionError(f"lost the Redis connection: {exc!r}"))

    async def _connect(self) -> None:
        """Connect, then send what queued up meanwhile; if that fails, fail those calls."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._conn = await self._open()
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.get_running_loop().create_task(self._watch())
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
        loop = asyncio.get_running_loop()

        def protocol() -> _Connection:
            return _Connection(hiredis.Reader(replyError=ResponseError), self._drop, self._idle)

        conn: _Connection
        if cls is UnixDomainSocketConnection:
            _, conn = await loop.create_unix_connection(protocol, p["path"])
        else:
            context = ssl.create_default_context() if cls is SSLConnection else None
            _, conn = await loop.create_connection(
                protocol, p.get("host", "127.0.0.1"), p.get("port", 6379), ssl=context
            )
        handshake: list[tuple[Arg, ...]] = []
        if p.get("password"):
            user = p.get("username")
            handshake.append(("AUTH", user, p["password"]) if user else ("AUTH", p["password"]))
        if p.get("db"):
            handshake.append(("SELECT", p["db"]))
        try:
            for command in handshake:
                reply = loop.create_future()
                conn.waiting.append(reply)
                assert conn.transport is not None
                conn.transport.write(pack(command))
                answer = await reply
                if isinstance(answer, ResponseError):
                    raise answer
        except BaseException:
            conn.fail(RedisConnectionError("connection closed"))
            raise
        return conn

    async def _watch(self) -> None:
        """Drop a connection that has calls waiting and has shown no progress for `timeout`."""
        seen: tuple[_Connection | None, int] = (None, 0)
        quiet = 0.0
        interval = self.timeout / 4
        while True:
            await asyncio.sleep(interval)
            conn = self._conn
            if conn is None or not conn.waiting or seen != (conn, conn.progress):
                seen = (conn, conn.progress if conn is not None else 0)
                quiet = 0.0
                continue
            quiet += interval
            if quiet >= self.timeout:
                self._drop(
                    conn,
                    RedisTimeoutError(f"Redis did not answer within {self.timeout}s"),
                )

    def _drop(self, conn: _Connection, error: Exception) -> None:
        """Fail every command waiting on a broken connection; the next call reconnects."""
        if self._conn is conn:
            self._conn = None
            self._idle()
        conn.fail(error)

    def _idle(self) -> None:
        """The batch in flight was answered (or the connection dropped): what gathered
        meanwhile goes out after the callers just answered have had their turn, so what
        they send next goes with it."""
        if self._futures:
            asyncio.get_running_loop().call_soon(self._flush)
