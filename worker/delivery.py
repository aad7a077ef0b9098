"""A message from a work queue, straight from aiormq, and how it is settled.

aio-pika builds a full message object per delivery, which cost a worker about an eighth of
its time per no-op run; a worker needs only the body, two properties and the tag.

Acks are the other per-run AMQP cost: aiormq writes each ack frame to the socket on its
own (one system call each) and wakes the caller once it is written. An ack needs no
answer, so the acks of one event-loop turn leave together, one write per channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiormq.abc import AbstractChannel, ChannelFrame, DeliveredMessage
from pamqp.commands import Basic

log = logging.getLogger("conveyor.worker")


class Acks:
    """Collects the acks of one loop turn and queues them per channel as one write."""

    def __init__(self) -> None:
        self._pending: dict[AbstractChannel, list[int]] = {}

    def ack(self, channel: AbstractChannel, tag: int) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        tags = self._pending.get(channel)
        if tags is None:
            self._pending[channel] = [tag]
        else:
            tags.append(tag)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for channel, tags in pending.items():
            if channel.is_closed:
                # The broker requeued these when the channel closed; an ack on a channel
                # opened since (it may have the same number) would be for other messages.
                continue
            frames = [Basic.Ack(delivery_tag=tag) for tag in tags]
            channel.connection.write_queue.put_nowait(ChannelFrame.marshall(channel.number, frames))

    async def written(self, timeout: float) -> None:
        """Wait until every ack so far has been handed to the socket (before closing the
        connection, which drops frames still queued)."""
        channels = list(self._pending)
        self._flush()
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            if channel.is_closed:
                continue
            done = loop.create_future()
            channel.connection.write_queue.put_nowait(ChannelFrame(b"", False, done))
            waits.append(done)
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waits)


class Delivery:
    __slots__ = ("_acks", "_raw", "delivery_tag")

    def __init__(self, raw: DeliveredMessage, acks: Acks) -> None:
        self._raw = raw
        self._acks = acks
        # a consumer only gets Basic.Deliver, whose tag is always set
        self.delivery_tag: int = getattr(raw.delivery, "delivery_tag", 0)

    @property
    def body(self) -> bytes:
        return self._raw.body

    @property
    def headers(self) -> dict[str, Any]:
        return self._raw.header.properties.headers or {}

    @property
    def message_id(self) -> str | None:
        return self._raw.header.properties.message_id

    def ack(self) -> None:
        """Ack with this loop turn's batch. There is nothing to wait for: a channel that
        closed first (a reconnect) has had its unacked messages requeued by the broker,
        and their redeliveries find the run finished or leased."""
        self._acks.ack(self._raw.channel, self.delivery_tag)

    async def nack(self, requeue: bool = True) -> None:
        """Nack; on a channel from before a reconnect this fails harmlessly (the broker has
        requeued the message already)."""
        try:
            await self._raw.channel.basic_nack(self.delivery_tag, requeue=requeue)
        except Exception as exc:
            log.debug("could not nack a message: %r", exc)
