"""Exchange and queue names, and their declaration. Every name carries the namespace.

{ns}.runs               direct exchange; routing key = queue name
{ns}.q.{queue}          quorum work queue, bound to {ns}.runs and {ns}.delay.deliver
{ns}.ladder.{L}         topic exchange + quorum queue with TTL UNIT_MS*2**L (the ladder)
{ns}.delay.deliver      topic exchange ending the ladder, routes to work queues
{ns}.dead               fanout exchange + queue for messages that cannot be processed
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from conveyor.shared.settings import Settings

from .delay import LEVELS, UNIT_MS, delivery_binding, level_bindings


class Names:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.runs = f"{namespace}.runs"
        self.delay_deliver = f"{namespace}.delay.deliver"
        self.dead = f"{namespace}.dead"

    def queue(self, queue: str) -> str:
        return f"{self.namespace}.q.{queue}"

    def delay_level(self, level: int) -> str:
        return f"{self.namespace}.ladder.{level}"

    def classic_delay_level(self, level: int) -> str:
        """A level of the classic ladder that earlier versions declared (see the migration
        in docs/architecture.md): still wired, so what waits there arrives, but unused."""
        return f"{self.namespace}.delay.{level}"


def work_queue_arguments(settings: Settings) -> dict[str, aio_pika.abc.FieldValue]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": Names(settings.namespace).dead,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def ladder_queue_arguments(names: Names, level: int) -> dict[str, aio_pika.abc.FieldValue]:
    """A ladder level: a quorum queue whose expired messages are dead-lettered one level
    down at least once (RabbitMQ retries until the queues below have confirmed them, even
    while their leaders are still being elected after a restart; at-least-once needs
    reject-publish). The routing key is kept through every hop."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": UNIT_MS * 2**level,
        "x-dead-letter-exchange": names.delay_level(level - 1) if level else names.delay_deliver,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


class Topology:
    """Declares what the namespace needs; declarations are idempotent and cached."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.declared_queues: set[str] = set()
        self._base_done = False

    async def declare_base(self, channel: AbstractChannel) -> None:
        if self._base_done:
            return
        n = self.names
        await channel.declare_exchange(n.runs, aio_pika.ExchangeType.DIRECT, durable=True)
        deliver = await channel.declare_exchange(
            n.delay_deliver, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead = await channel.declare_exchange(n.dead, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(
            n.dead, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead)
        below: AbstractExchange = deliver
        for level in range(LEVELS):
            name = n.delay_level(level)
            exchange = await channel.declare_exchange(
                name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(
                name, durable=True, arguments=ladder_queue_arguments(n, level)
            )
            to_queue, onwards = level_bindings(level)
            await queue.bind(exchange, to_queue)
            await below.bind(exchange, onwards)
            below = exchange
        self._base_done = True

    async def declare_queue(self, channel: AbstractChannel, queue: str) -> AbstractQueue:
        await self.declare_base(channel)
        name = self.names.queue(queue)
        declared = await channel.declare_queue(
            name, durable=True, arguments=work_queue_arguments(self.settings)
        )
        if queue not in self.declared_queues:
            await declared.bind(self.names.runs, queue)
            await declared.bind(self.names.delay_deliver, delivery_binding(queue))
            self.declared_queues.add(queue)
        return declared

    async def delete(self, channel: AbstractChannel, queues: list[str]) -> None:
        """Remove everything of the namespace (tests and tear-down tools)."""
        n = self.names
        for queue in queues:
            await channel.queue_delete(n.queue(queue))
        for level in range(LEVELS):
            await channel.queue_delete(n.delay_level(level))
            await channel.exchange_delete(n.delay_level(level))
        await channel.queue_delete(n.dead)
        for exchange in (n.runs, n.delay_deliver, n.dead):
            await channel.exchange_delete(exchange)
        self._base_done = False
        self.declared_queues.clear()

    async def delete_classic_ladder(self, channel: AbstractChannel) -> None:
        """Remove the classic ladder a namespace upgraded from it may still hold."""
        for level in range(LEVELS):
            await channel.queue_delete(self.names.classic_delay_level(level))
            await channel.exchange_delete(self.names.classic_delay_level(level))
