"""The publisher: persistent, mandatory, confirmed messages that survive a broker restart.

A publish returns only once the broker has confirmed the message; an unroutable message
or a nack raises PublishFailed; a lost connection is retried until `publish_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)

from conveyor.shared.errors import PublishFailed
from conveyor.shared.settings import Settings

from .delay import delay_routing_key
from .topology import Topology

log = logging.getLogger("conveyor.broker")

T = TypeVar("T")

Headers = Mapping[str, aio_pika.abc.FieldValue]

REASON_HEADER = "x-conveyor-reason"
QUEUE_HEADER = "x-conveyor-queue"

_TRANSIENT = (AMQPConnectionError, ChannelInvalidStateError, ChannelClosed, ConnectionError)


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


class Publisher:
    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self.names = topology.names
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}

    async def connect(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self.channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.topology.declare_base(self.channel)
        for name in (self.names.runs, self.names.delay_entry, self.names.dead):
            self._exchanges[name] = await self.channel.get_exchange(name, ensure=False)

    async def ensure_queue(self, queue: str) -> None:
        """Declare a work queue once, so triggers before any worker starts are kept."""
        if queue not in self.topology.declared_queues:
            await self._retrying(lambda: self.topology.declare_queue(self._require(), queue))

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish all messages concurrently; returns when every one is confirmed."""
        await asyncio.gather(*(self._publish_one(m) for m in messages))

    async def dead_letter(self, body: bytes, queue: str, reason: str, headers: Headers) -> None:
        merged = {k: v for k, v in headers.items() if not k.startswith("x-death")}
        merged.update({REASON_HEADER: reason[:1000], QUEUE_HEADER: queue})
        message = self._message(body, None, merged)
        await self._retrying(
            lambda: self._exchanges[self.names.dead].publish(message, "", mandatory=True)
        )

    async def _publish_one(self, out: Outgoing) -> None:
        message = self._message(out.body, out.message_id, out.headers)
        if out.delay_ms > 0:
            exchange = self._exchanges[self.names.delay_entry]
            routing_key = delay_routing_key(out.delay_ms, out.queue)
        else:
            exchange = self._exchanges[self.names.runs]
            routing_key = out.queue
        try:
            await self._retrying(lambda: exchange.publish(message, routing_key, mandatory=True))
        except PublishError as exc:
            raise PublishFailed(
                f"the broker could not route the message for queue {out.queue!r} "
                f"(is the queue declared in namespace {self.settings.namespace!r}?): {exc}"
            ) from exc
        except DeliveryError as exc:
            raise PublishFailed(f"the broker refused the message for {out.queue!r}: {exc}") from exc

    @staticmethod
    def _message(body: bytes, message_id: str | None, headers: Headers | None) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=dict(headers) if headers else None,
        )

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.settings.publish_timeout
        pause = 0.05
        while True:
            try:
                return await attempt()
            except _TRANSIENT as exc:
                if time.monotonic() + pause > deadline:
                    raise PublishFailed(
                        f"RabbitMQ at {_safe_url(self.settings.amqp_url)} did not take the message "
                        f"within {self.settings.publish_timeout}s: {exc!r}"
                    ) from exc
                log.warning("broker unavailable (%r); retrying in %.2fs", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _require(self) -> AbstractChannel:
        if self.channel is None:
            raise RuntimeError("publisher used before connect()")
        return self.channel


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('@', 1)[1]}"
