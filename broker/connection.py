"""The one way conveyor opens a connection to RabbitMQ."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from conveyor.shared.settings import Settings

from . import receiver


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A connection that reconnects by itself, shown as `name` in RabbitMQ's management
    UI, that reads frames with broker/receiver.py and gives up after connect_timeout."""
    receiver.install()
    return await aio_pika.connect_robust(
        settings.amqp_url,
        timeout=settings.connect_timeout,
        client_properties={"connection_name": name},
    )
