"""A message from a work queue, straight from aiormq.

aio-pika builds a full message object per delivery, which cost a worker about an eighth of
its time per no-op run; a worker needs only the body, two properties and the tag.
"""

from __future__ import annotations

from typing import Any

from aiormq.abc import DeliveredMessage


class Delivery:
    __slots__ = ("_raw", "delivery_tag")

    def __init__(self, raw: DeliveredMessage) -> None:
        self._raw = raw
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

    async def ack(self) -> None:
        await self._raw.channel.basic_ack(self.delivery_tag)

    async def nack(self, requeue: bool = True) -> None:
        await self._raw.channel.basic_nack(self.delivery_tag, requeue=requeue)
