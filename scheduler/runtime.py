"""The connections of the scheduler and of the `conveyor dead` commands."""

from __future__ import annotations

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from conveyor.broker.connection import connect as amqp_connect
from conveyor.broker.publisher import Publisher
from conveyor.broker.topology import Topology
from conveyor.shared.redis_client import Redis, redis_client
from conveyor.shared.scripts import Scripts
from conveyor.shared.settings import Settings
from conveyor.shared.store import RunStore

SCRIPTS = ["sched_lease", "sched_due", "sched_tick", "dead_add", "dead_run", "dead_reopen"]


class Runtime:
    """Redis (the run store and the scheduler's scripts) and RabbitMQ (a publisher and a
    channel for reading the dead-letter queue)."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        # Bounded like the worker's: a hung Redis must not stall the lease loop for ever.
        self.redis: Redis = redis_client(settings)
        self.store = RunStore(self.redis, settings)
        self.keys = self.store.keys
        self.scripts = Scripts(self.store.batcher, SCRIPTS)
        self.topology = Topology(settings)
        self.publisher = Publisher(settings, self.topology)
        self.connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None

    async def connect(self) -> None:
        if self.connection is not None:
            return
        connection = await amqp_connect(self.settings, self.name)
        try:
            await self.publisher.connect(connection)
            self._channel = await connection.channel()
        except BaseException:
            await connection.close()
            raise
        self.connection = connection

    @property
    def channel(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("runtime used before connect()")
        return self._channel

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
        await self.store.close()
        await self.redis.aclose()
