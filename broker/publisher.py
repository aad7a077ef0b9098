"""The publisher: persistent, mandatory, confirmed messages that survive a broker restart.

A publish returns only once the broker has confirmed the message; an unroutable message
or a nack raises PublishFailed; a lost connection is retried until `publish_timeout`.

Messages are framed here and handed to aiormq's connection writer as one write per
call, with a confirmation registered per message on the channel the way aiormq's own
`basic_publish` does it. aio-pika's path (a Message object, a task, a lock, a timeout
and a socket write per message, each write waiting for the one before) cost about eight
times as much client CPU per message as the broker's confirm; triggers are mostly that.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from aiormq.abc import ChannelFrame
from pamqp.encode import field_table

from conveyor.shared.errors import PublishFailed
from conveyor.shared.settings import Settings

from .delay import delay_routing_key
from .topology import Topology

log = logging.getLogger("conveyor.broker")

Headers = Mapping[str, aio_pika.abc.FieldValue]

REASON_HEADER = "x-conveyor-reason"
QUEUE_HEADER = "x-conveyor-queue"

_TRANSIENT = (AMQPConnectionError, ChannelInvalidStateError, ChannelClosed, ConnectionError)

# AMQP 0-9-1 framing (spec section 4.2.3): type, channel, payload size, payload, end octet.
_FRAME = struct.Struct(">BHI")
_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC = 60
_PUBLISH = struct.pack(">HHH", _BASIC, 40, 0)  # basic.publish, reserved ticket 0
_MANDATORY = b"\x01"
# Content header: class, weight 0, body size, property flags, then the properties in flag order.
_CONTENT = struct.Struct(">HHQH")
_CONTENT_TYPE, _HAS_HEADERS, _DELIVERY_MODE, _MESSAGE_ID = 0x8000, 0x2000, 0x1000, 0x0080
_JSON = b"\x10application/json"
_PERSISTENT = b"\x02"


def _short(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


class Outgoing:
    """A message to publish: where it goes and what it carries."""

    __slots__ = ("body", "delay_ms", "headers", "message_id", "queue")

    def __init__(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str | None = None,
        delay_ms: int = 0,
        headers: Headers | None = None,
    ) -> None:
        self.queue = queue
        self.body = body
        self.message_id = message_id
        self.delay_ms = delay_ms
        self.headers = headers


class _Routed:
    """A message with its exchange and routing key decided."""

    __slots__ = ("body", "exchange", "headers", "message_id", "queue", "routing_key")

    def __init__(
        self,
        queue: str,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str | None,
        headers: Headers | None,
    ) -> None:
        self.queue = queue
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        # aiormq matches a returned (unroutable) message to its publish by message id
        self.message_id = message_id or uuid.uuid4().hex
        self.headers = headers


# The messages of one publish call, and the future that gets their confirmations.
_Queued = tuple[list[_Routed], asyncio.Future[list[asyncio.Future[Any]]]]


class Publisher:
    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self.names = topology.names
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self._pending: list[_Queued] = []
        self._writes: set[asyncio.Task[None]] = set()

    async def connect(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self.channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.topology.declare_base(self.channel)

    async def ensure_queue(self, queue: str) -> None:
        """Declare a work queue once, so triggers before any worker starts are kept."""
        if queue in self.topology.declared_queues:
            return
        deadline = time.monotonic() + self.settings.publish_timeout
        pause = 0.05
        while True:
            try:
                await self.topology.declare_queue(self._require(), queue)
                return
            except _TRANSIENT as exc:
                pause = await self._pause(exc, pause, deadline)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish all messages in one write; returns when every one is confirmed."""
        routed = []
        for m in messages:
            if m.delay_ms > 0:
                exchange, routing_key = (
                    self.names.delay_entry,
                    delay_routing_key(m.delay_ms, m.queue),
                )
            else:
                exchange, routing_key = self.names.runs, m.queue
            routed.append(_Routed(m.queue, exchange, routing_key, m.body, m.message_id, m.headers))
        await self._send(routed)

    async def dead_letter(self, body: bytes, queue: str, reason: str, headers: Headers) -> None:
        merged = {k: v for k, v in headers.items() if not k.startswith("x-death")}
        merged.update({REASON_HEADER: reason[:1000], QUEUE_HEADER: queue})
        await self._send([_Routed(queue, self.names.dead, "", body, None, merged)])

    async def _send(self, messages: list[_Routed]) -> None:
        """Publish until every message is confirmed; what a lost connection took is sent
        again until `publish_timeout`."""
        deadline = time.monotonic() + self.settings.publish_timeout
        pause = 0.05
        while messages:
            try:
                confirms = await self._queue(messages)
            except _TRANSIENT as exc:
                pause = await self._pause(exc, pause, deadline)
                continue
            messages, lost = await self._confirmed(messages, confirms)
            if lost is not None:
                pause = await self._pause(lost, pause, deadline)

    def _queue(self, messages: list[_Routed]) -> asyncio.Future[list[asyncio.Future[Any]]]:
        """Join this loop turn's write; the future gets a confirmation per message."""
        loop = asyncio.get_running_loop()
        queued: asyncio.Future[list[asyncio.Future[Any]]] = loop.create_future()
        self._pending.append((messages, queued))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return queued

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[_Queued]) -> None:
        """Queue the frames of every message of the batch as one write to the connection,
        and register a confirmation for each, numbered as aiormq's basic_publish numbers
        them, under the same channel lock."""
        try:
            channel = cast(aiormq.Channel, await self._require().get_underlay_channel())
            parts, framed = [], []
            for messages, queued in batch:
                if queued.done():
                    continue  # the caller was cancelled
                try:
                    parts.append(_frames(channel.number, channel.max_content_size, messages))
                except ValueError as exc:
                    queued.set_exception(exc)
                    continue
                framed.append((messages, queued))
            batch = framed
            frame = ChannelFrame(payload=b"".join(parts), should_close=False)
            async with channel.lock:
                # Registered only once queued: no await from here to the end of the block,
                # so the writer cannot send these frames (nor the broker confirm them) before.
                await channel.write_queue.put(frame)
                for messages, queued in batch:
                    confirms = [_register(channel, m.message_id) for m in messages]
                    if not queued.done():
                        queued.set_result(confirms)
        except Exception as exc:
            for _, queued in batch:
                if not queued.done():
                    queued.set_exception(exc)
        except BaseException:
            for _, queued in batch:
                queued.cancel()
            raise

    async def _confirmed(
        self, messages: list[_Routed], confirms: list[asyncio.Future[Any]]
    ) -> tuple[list[_Routed], BaseException | None]:
        """Wait for every confirmation; returns the messages a lost connection took, and
        why. Raises PublishFailed for an unroutable or refused message."""
        lost: list[_Routed] = []
        cause: BaseException | None = None
        failed: PublishFailed | None = None
        for m, confirm in zip(messages, confirms, strict=True):
            try:
                await confirm
            except _TRANSIENT as exc:
                lost.append(m)
                cause = exc
            except PublishError as exc:
                failed = failed or PublishFailed(
                    f"the broker could not route the message for queue {m.queue!r} "
                    f"(is the queue declared in namespace {self.settings.namespace!r}?): {exc}"
                )
            except DeliveryError as exc:
                failed = failed or PublishFailed(
                    f"the broker refused the message for {m.queue!r}: {exc}"
                )
        if failed is not None:
            raise failed
        return lost, cause

    async def _pause(self, exc: BaseException, pause: float, deadline: float) -> float:
        """Wait before trying again, or raise PublishFailed when out of time."""
        if time.monotonic() + pause > deadline:
            raise PublishFailed(
                f"RabbitMQ at {_safe_url(self.settings.amqp_url)} did not take the message "
                f"within {self.settings.publish_timeout}s: {exc!r}"
            ) from exc
        log.warning("broker unavailable (%r); retrying in %.2fs", exc, pause)
        await asyncio.sleep(pause)
        return min(pause * 2, 1.0)

    def _require(self) -> AbstractChannel:
        if self.channel is None:
            raise RuntimeError("publisher used before connect()")
        return self.channel


def _frames(number: int, limit: int, messages: list[_Routed]) -> bytes:
    """The frames of each message on channel `number`: basic.publish (mandatory), the
    content header, and body frames of at most `limit` bytes."""
    end = _FRAME_END
    methods: dict[tuple[str, str], bytes] = {}
    parts: list[bytes] = []
    for m in messages:
        method = methods.get((m.exchange, m.routing_key))
        if method is None:
            payload = _PUBLISH + _short(m.exchange) + _short(m.routing_key) + _MANDATORY
            method = _FRAME.pack(_METHOD, number, len(payload)) + payload + end
            methods[m.exchange, m.routing_key] = method
        body = m.body
        flags = _CONTENT_TYPE | _DELIVERY_MODE | _MESSAGE_ID
        table = b""
        if m.headers:
            flags |= _HAS_HEADERS
            table = field_table(dict(m.headers))
        header = (
            _CONTENT.pack(_BASIC, 0, len(body), flags)
            + _JSON
            + table
            + _PERSISTENT
            + _short(m.message_id)
        )
        parts += (method, _FRAME.pack(_HEADER, number, len(header)), header, end)
        for start in range(0, len(body), limit):
            chunk = body[start : start + limit]
            parts += (_FRAME.pack(_BODY, number, len(chunk)), chunk, end)
    return b"".join(parts)


def _register(channel: aiormq.Channel, message_id: str) -> asyncio.Future[Any]:
    """The next delivery tag's confirmation, as aiormq's basic_publish registers it: the
    message id lets a return (unroutable) find it, and is forgotten once it is done."""
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    confirm = channel.create_future()
    channel.confirmations[tag] = confirm
    tags = channel.message_id_delivery_tag
    tags[message_id] = tag

    def forget(_: asyncio.Future[Any]) -> None:
        if tags.get(message_id) == tag:
            del tags[message_id]

    confirm.add_done_callback(forget)
    return confirm


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('@', 1)[1]}"
