"""A message from a work queue, straight from aiormq, and how it is settled.

aio-pika builds a full message object per delivery, which cost a worker about an eighth of
its time per no-op run; a worker needs only the body, two properties and the tag.

Acks are the other per-run AMQP cost, in the worker (aiormq writes every ack frame with a
system call of its own) and more so in RabbitMQ, where each ack frame is one settlement
command in the quorum queue's log. So acks wait for the end of the event-loop turn, and
the acked deliveries below the oldest one still unsettled on their channel go as one
`multiple` ack; the few acked out of that order go one by one in the same turn.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage

log = logging.getLogger("conveyor.worker")


class _Channel:
    """What the worker knows about the delivery tags of one consuming channel."""

    __slots__ = ("acked", "contiguous", "last", "open")

    def __init__(self) -> None:
        self.open: set[int] = set()  # delivered here and not settled yet
        self.acked: list[int] = []  # acked in this loop turn, not sent yet
        self.last = 0  # the highest tag delivered here
        # False once a tag was skipped (a delivery aiormq did not hand to the worker): a
        # `multiple` ack could then settle a message nobody processed.
        self.contiguous = True


class Acks:
    """Settles deliveries: acks are batched per loop turn, nacks go out at once."""

    def __init__(self) -> None:
        self._channels: dict[AbstractChannel, _Channel] = {}
        self._flushing = False
        # (channel, `multiple` ack up to this tag or 0, single acks), in the order decided
        self._outgoing: list[tuple[AbstractChannel, int, list[int]]] = []
        self._sender: asyncio.Task[None] | None = None

    def received(self, channel: AbstractChannel, tag: int) -> None:
        """Called for every delivery, in the order of the tags (aiormq hands them over
        in order), before it can be settled."""
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        if tag != state.last + 1:
            state.contiguous = False
        state.last = tag
        state.open.add(tag)

    def ack(self, channel: AbstractChannel, tag: int) -> None:
        state = self._channels.get(channel)
        if state is None or tag not in state.open:
            return  # its channel closed and was forgotten: the broker requeued it
        state.open.discard(tag)
        state.acked.append(tag)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def nack(self, channel: AbstractChannel, tag: int, requeue: bool) -> None:
        try:
            await channel.basic_nack(tag, requeue=requeue)
        except Exception as exc:  # a channel from before a reconnect: already requeued
            log.debug("could not nack a message: %r", exc)
        finally:
            # Only now: a `multiple` ack must not cover this tag before the nack is out.
            state = self._channels.get(channel)
            if state is not None:
                state.open.discard(tag)

    def _flush(self) -> None:
        self._flushing = False
        for channel, state in list(self._channels.items()):
            if channel.is_closed:
                # The broker requeued what was unacked; a channel opened since may have
                # the same number, and these tags would mean other messages there.
                del self._channels[channel]
                continue
            if not state.acked:
                continue
            acked, state.acked = state.acked, []
            lowest_open = min(state.open) if state.open else state.last + 1
            below = [tag for tag in acked if tag < lowest_open] if state.contiguous else []
            single = [tag for tag in acked if tag > lowest_open] if below else acked
            self._outgoing.append((channel, max(below) if below else 0, single))
        if self._outgoing and (self._sender is None or self._sender.done()):
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """Send the acks in the order they were decided: a `multiple` ack must not
        overtake a single ack of a lower tag, which the broker would then not know."""
        while self._outgoing:
            outgoing, self._outgoing = self._outgoing, []
            for channel, up_to, single in outgoing:
                try:
                    if up_to:
                        await channel.basic_ack(up_to, multiple=True)
                    for tag in single:
                        await channel.basic_ack(tag)
                except Exception as exc:  # a channel from before a reconnect
                    log.debug("could not ack messages: %r", exc)

    async def written(self, timeout: float) -> None:
        """Wait until every ack so far is written to the socket (closing the connection
        drops frames still queued in aiormq)."""
        if self._flushing:
            self._flush()
        if self._sender is not None:
            await asyncio.wait([self._sender], timeout=timeout)


class Delivery:
    __slots__ = ("_acks", "_raw", "delivery_tag")

    def __init__(self, raw: DeliveredMessage, acks: Acks) -> None:
        self._raw = raw
        self._acks = acks
        # a consumer only gets Basic.Deliver, whose tag is always set
        self.delivery_tag: int = getattr(raw.delivery, "delivery_tag", 0)
        acks.received(raw.channel, self.delivery_tag)

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
        """Ack with this loop turn's batch. There is nothing to wait for: if the channel
        closes first (a reconnect), the broker has requeued the message, and its
        redelivery finds the run finished or leased."""
        self._acks.ack(self._raw.channel, self.delivery_tag)

    async def nack(self, requeue: bool = True) -> None:
        await self._acks.nack(self._raw.channel, self.delivery_tag, requeue)
