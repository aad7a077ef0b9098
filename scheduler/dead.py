"""Dead letters: each message in `{ns}.dead` becomes a record in Redis and ends its run.

A message reaches `{ns}.dead` from a worker (a bad body, an unknown task, a run that
crashed too often; headers x-conveyor-reason, x-conveyor-queue, x-conveyor-run-id) or
from RabbitMQ itself (the delivery limit; its x-death and x-first-death-* headers).
Ingesting one: store a record (at most `dead_letters_max`, the oldest dropped beyond),
end its run FAILED with the reason unless the run has ended already or a live worker
holds it, then ack. The scheduler leader ingests as messages come; `conveyor dead`
ingests what is in the queue first, so it works with no scheduler running.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from conveyor.broker.publisher import QUEUE_HEADER, REASON_HEADER, Outgoing
from conveyor.shared.errors import ConfigurationError, ConveyorError
from conveyor.shared.models import TERMINAL
from conveyor.shared.names import check_name

from .lease import Refused
from .runtime import Runtime

log = logging.getLogger("conveyor.scheduler")

RUN_ID_HEADER = "x-conveyor-run-id"
# What a worker accepts beyond the payload limit for the rest of a message (worker.py).
BODY_ALLOWANCE = 64 * 1024
_TERMINAL = "," + ",".join(sorted(s.value for s in TERMINAL)) + ","


class DeadLetter(msgspec.Struct, kw_only=True):
    """One dead-lettered message as stored (`{ns}:{sched}:dead`) and listed."""

    id: str
    at: int  # epoch ms when it was recorded
    reason: str
    queue: str
    task: str | None = None
    run_id: str | None = None
    body: bytes = b""
    # The body's size; a body over the size a worker takes is not kept (it could never run).
    size: int = 0
    body_kept: bool = True
    headers: dict[str, Any] = msgspec.field(default_factory=dict)


_decoder = msgspec.json.Decoder(DeadLetter)
_body = msgspec.json.Decoder(dict[str, Any])


class DeadLetters:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.keys = runtime.keys
        self._queue: AbstractQueue | None = None

    async def ingest(self, token: str = "", *, limit: int = 10_000) -> int:
        """Record every message waiting in `{ns}.dead` (at most `limit`); returns how many.
        `token`: the leader's fencing token; a refused write stops here, and the message
        goes back to the queue for the leader that holds the lease now."""
        queue = await self._dead_queue()
        count = 0
        while count < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            try:
                recorded = await self._ingest_one(message, token)
            except Exception:
                # Redis unavailable, most likely: the message waits in the queue meanwhile.
                await message.nack(requeue=True)
                raise
            if not recorded:
                await message.nack(requeue=True)
                raise Refused("dead-letter record refused: this scheduler lost the lease")
            await message.ack()
            count += 1
        return count

    async def _ingest_one(self, message: AbstractIncomingMessage, token: str) -> bool:
        record = _record(message, self.rt.topology.names.queue(""))
        if record.size > self.rt.settings.max_payload_bytes + BODY_ALLOWANCE:
            record.body, record.body_kept = b"", False
        dropped = await self.rt.scripts.call(
            "dead_add",
            [self.keys.leader, self.keys.dead, self.keys.dead_index],
            [token, record.id, msgspec.json.encode(record), self.rt.settings.dead_letters_max],
        )
        if int(dropped) < 0:
            return False
        if int(dropped):
            log.warning(
                "dropped the %d oldest dead-letter records (over dead_letters_max)", dropped
            )
        outcome = "no run"
        if record.run_id:
            reply = await self.rt.scripts.call(
                "dead_run",
                [self.keys.run(record.run_id), self.keys.steps(record.run_id)],
                [record.reason, record.id, int(self.rt.settings.run_ttl), _TERMINAL],
            )
            outcome = reply.decode()
        log.warning(
            "dead letter %s from queue %r (run %s: %s): %s",
            record.id,
            record.queue,
            record.run_id,
            outcome,
            record.reason,
        )
        return True

    async def recent(self, limit: int = 50) -> list[DeadLetter]:
        """Newest first."""
        ids: list[Any] = await self.rt.redis.zrevrange(self.keys.dead_index, 0, limit - 1)
        return await self._records([i.decode() for i in ids])

    async def replay(self, ids: Sequence[str] | None) -> list[DeadLetter]:
        """Publish the records' bodies back to their queues as fresh messages (all records
        when `ids` is None), reopening each run their dead letter ended; returns them."""
        if ids is None:
            every: list[Any] = await self.rt.redis.zrange(self.keys.dead_index, 0, -1)
            ids = [i.decode() for i in every]
        records = await self._records(ids)
        missing = set(ids) - {r.id for r in records}
        if missing:
            raise ConveyorError(
                f"no dead letter {', '.join(sorted(missing))} (see `conveyor dead list`)"
            )
        for record in records:
            if not record.queue:
                raise ConveyorError(f"dead letter {record.id} names no queue to replay it to")
            if not record.body_kept:
                raise ConveyorError(
                    f"dead letter {record.id} has a body of {record.size} bytes, too large for "
                    "any worker, and it was not kept; `conveyor dead purge` removes it"
                )
        for record in records:
            await self._replay_one(record)
        return records

    async def _replay_one(self, record: DeadLetter) -> None:
        if record.run_id:
            # Reopened before the message goes out, or its claim would drop it as FAILED.
            reopened = await self.rt.scripts.call(
                "dead_reopen",
                [self.keys.run(record.run_id), self.keys.steps(record.run_id)],
                [record.id],
            )
            if reopened:
                seconds, micros = await self.rt.redis.time()
                now = int(seconds) * 1000 + int(micros) // 1000
                await self.rt.redis.zadd(self.keys.due, {record.run_id: now})
        await self.rt.publisher.ensure_queue(record.queue)
        await self.rt.publisher.publish(
            [
                Outgoing(
                    record.queue,
                    record.body,
                    message_id=record.run_id,
                    headers=_fresh_headers(record.headers),
                )
            ]
        )
        await self._remove([record.id])

    async def purge(self) -> int:
        """Ingest what waits in the queue (ending its runs), then remove every record."""
        await self.ingest()
        count: int = await self.rt.redis.zcard(self.keys.dead_index)
        await self.rt.redis.delete(self.keys.dead, self.keys.dead_index)
        return count

    async def _records(self, ids: Sequence[str]) -> list[DeadLetter]:
        if not ids:
            return []
        raw: list[Any] = await self.rt.redis.hmget(self.keys.dead, list(ids))
        return [_decoder.decode(r) for r in raw if r is not None]

    async def _remove(self, ids: Sequence[str]) -> None:
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.keys.dead, *ids)
            pipe.zrem(self.keys.dead_index, *ids)
            await pipe.execute()

    async def _dead_queue(self) -> AbstractQueue:
        if self._queue is None:
            # Declared by the publisher's connect (Topology.declare_base); looked up here.
            self._queue = await self.rt.channel.get_queue(self.rt.topology.names.dead)
        return self._queue


def _record(message: AbstractIncomingMessage, work_prefix: str) -> DeadLetter:
    headers = dict(message.headers or {})
    body: dict[str, Any] = {}
    # A bad body is what got some messages here: it is kept as it came.
    with contextlib.suppress(msgspec.DecodeError):
        body = _body.decode(message.body)
    # RabbitMQ names the work queue it dead-lettered from ({ns}.q.{queue}); a worker, ours.
    queue = _text(headers.get(QUEUE_HEADER)) or _text(
        headers.get("x-first-death-queue")
    ).removeprefix(work_prefix)
    reason = _text(headers.get(REASON_HEADER)) or _text(headers.get("x-first-death-reason"))
    task = body.get("task")
    body_id = body.get("id")
    # A message RabbitMQ dead-lettered keeps its message id, which is the run's (the wire
    # format); a worker's dead letter has a fresh one, and names the run in a header.
    run_id = (
        _text(headers.get(RUN_ID_HEADER))
        or (body_id if isinstance(body_id, str) else None)
        or (None if REASON_HEADER in headers else message.message_id)
    )
    if run_id:
        try:
            check_name("run id", run_id)  # it becomes part of Redis keys
        except ConfigurationError:
            run_id = None  # kept in the body and headers of the record only
    return DeadLetter(
        id=f"{int(time.time() * 1000):013d}-{secrets.token_hex(4)}",
        at=int(time.time() * 1000),
        reason=reason or "unknown (no reason header)",
        queue=queue,
        task=task if isinstance(task, str) else None,
        run_id=run_id or None,
        body=message.body,
        size=len(message.body),
        headers=_builtins(headers),
    )


def _builtins(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers as JSON can hold them (AMQP tables carry datetimes, bytes, decimals)."""
    out: dict[str, Any] = {}
    for key, value in headers.items():
        try:
            out[key] = msgspec.to_builtins(value)
        except TypeError:
            out[key] = repr(value)
    return out


def _fresh_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """A replayed message starts afresh: no x-death trail (RabbitMQ would drop a message
    dead-lettered into a queue its x-death names) and no reason headers of ours."""
    return {
        k: v
        for k, v in headers.items()
        if not k.startswith("x-") and isinstance(v, (str, int, float, bool))
    }


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""
