"""The publisher: persistent, mandatory, confirmed messages that survive a broker restart.

A publish returns only once the broker has confirmed the message; an unroutable message
or a nack raises PublishFailed; a lost connection is retried until `publish_timeout`, and
a confirm that has not come by then raises PublishFailed with the outcome unknown.

Messages are framed here (AMQP 0-9-1) and handed to aiormq's connection writer: every
message published in one turn of the event loop, by any number of calls, goes out in one
write, numbered and confirmed through the bookkeeping aiormq keeps for its own
`basic_publish` (see _Tally). aio-pika's path (a Message object, a task, a lock, a
timeout and a socket write per message, each publish holding the channel lock until its
frames were written) cost about 70 us of client CPU per message here; this about 9.
"""

from __future__ import annotations

import asyncio
import logging
import struct
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
from conveyor.shared.settings import Settings, redact

from .delay import delay_routing_key, entry_level
from .internals import check_aiormq
from .topology import Topology

log = logging.getLogger("conveyor.broker")

Headers = Mapping[str, aio_pika.abc.FieldValue]

REASON_HEADER = "x-conveyor-reason"
QUEUE_HEADER = "x-conveyor-queue"
RUN_ID_HEADER = "x-conveyor-run-id"
DROPPED_HEADER = "x-conveyor-headers-dropped"

# aiormq looks at every unconfirmed message of the channel for each confirm frame, so
# a very large batch goes out in windows of this many, each confirmed before the next.
_WINDOW = 4096

# How often unconfirmed publishes are checked against their deadline.
_SWEEP = 0.25

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
# A content header's bytes besides its header table: class, weight, size, flags, content
# type, delivery mode and a message id of up to 255 bytes.
_HEADER_OVERHEAD = _CONTENT.size + len(_JSON) + len(_PERSISTENT) + 256


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


class _NoConfirm(Exception):
    """A message's confirm did not come within publish_timeout."""


class _Tally:
    """The confirmations of one publish call's messages; `done` is set once all are in.

    Each message's entry in aiormq's `channel.confirmations` is a _Confirm, which aiormq
    settles as it settles the future its own basic_publish puts there (a result on an ack,
    an error on a nack or a return). One future per call instead of aiormq's one per
    message, each tracked by the channel and the connection with four callbacks, which
    were a fifth of a trigger's client time."""

    __slots__ = ("done", "first", "left", "messages", "outcomes", "settled", "tags", "watch")

    def __init__(self, messages: list[_Routed]) -> None:
        self.messages = messages
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outcomes: list[BaseException | None] = [None] * len(messages)
        self.settled = [False] * len(messages)
        self.left = len(messages)
        self.tags: dict[str, int] = {}
        self.first = 0
        self.watch: _Watch | None = None

    def register(self, channel: aiormq.Channel, watch: _Watch) -> None:
        """Number the messages with the channel's next delivery tags, as basic_publish
        does; a message id lets a return (unroutable) find its message."""
        self.watch = watch
        self.tags = channel.message_id_delivery_tag
        self.first = channel.delivery_tag + 1
        confirmations = cast(dict[int, Any], channel.confirmations)
        for index, m in enumerate(self.messages):
            channel.delivery_tag += 1
            confirmations[channel.delivery_tag] = _Confirm(self, index)
            self.tags[m.message_id] = channel.delivery_tag

    def settle(self, index: int, error: BaseException | None) -> None:
        if self.settled[index]:
            return
        self.settled[index] = True
        self.outcomes[index] = error
        message_id = self.messages[index].message_id
        if self.tags.get(message_id) == self.first + index:
            del self.tags[message_id]
        self.left -= 1
        if not self.left:
            if not self.done.done():
                self.done.set_result(None)
            if self.watch is not None:
                self.watch.settled()

    def fail(self, error: BaseException) -> None:
        """Settle every message not settled yet with this error."""
        for index in range(len(self.messages)):
            self.settle(index, error)


class _Confirm:
    """One message's entry in aiormq's channel.confirmations (see _Tally)."""

    __slots__ = ("index", "tally")

    def __init__(self, tally: _Tally, index: int) -> None:
        self.tally = tally
        self.index = index

    def done(self) -> bool:
        return self.tally.settled[self.index]

    def cancelled(self) -> bool:
        return False

    def set_result(self, _: object) -> None:
        self.tally.settle(self.index, None)

    def set_exception(self, error: BaseException) -> None:
        self.tally.settle(self.index, error)


class _Watch:
    """Fails the tallies of one write if their channel closes first: aiormq rejects every
    future of a closing channel, and this is one; it is resolved once they are settled."""

    __slots__ = ("future", "left", "tallies")

    def __init__(self, channel: aiormq.Channel, tallies: list[_Tally]) -> None:
        self.tallies = tallies
        self.left = len(tallies)
        self.future = channel.create_future()
        self.future.add_done_callback(self._closed)

    def _closed(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            for tally in self.tallies:
                tally.fail(error)

    def settled(self) -> None:
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)


class Publisher:
    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self.names = topology.names
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self._pending: list[_Tally] = []
        self._watched: dict[_Tally, float] = {}  # publish calls waiting for confirms
        self._sweeper: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()

    async def connect(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self.channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        check_aiormq(await self.channel.get_underlay_channel())
        await self.topology.declare_base(self.channel)

    async def ensure_queue(self, queue: str) -> None:
        """Declare a work queue once, so triggers before any worker starts are kept."""
        if queue in self.topology.declared_queues:
            return
        deadline = asyncio.get_running_loop().time() + self.settings.publish_timeout
        pause = 0.05
        while True:
            try:
                await self.topology.declare_queue(self._require(), queue)
                return
            except _TRANSIENT as exc:
                pause = await self._pause(exc, pause, deadline)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish the messages, in one write with those of other calls made in the same
        turn of the event loop; returns when every one is confirmed."""
        routed = []
        for m in messages:
            if m.delay_ms > 0:
                exchange, routing_key = (
                    self.names.delay_level(entry_level(m.delay_ms)),
                    delay_routing_key(m.delay_ms, m.queue),
                )
            else:
                exchange, routing_key = self.names.runs, m.queue
            routed.append(_Routed(m.queue, exchange, routing_key, m.body, m.message_id, m.headers))
        for start in range(0, len(routed), _WINDOW):
            await self._send(routed[start : start + _WINDOW])

    async def publish_by_queue(self, messages: Sequence[Outgoing]) -> dict[str, PublishFailed]:
        """Publish the messages queue by queue, declaring each queue first, so that one
        queue that cannot take them (deleted, declared with other arguments) does not
        hold up the others; returns the failures, by queue."""
        by_queue: dict[str, list[Outgoing]] = {}
        for m in messages:
            by_queue.setdefault(m.queue, []).append(m)
        failed: dict[str, PublishFailed] = {}
        for queue, outgoing in by_queue.items():
            try:
                await self.ensure_queue(queue)
                await self.publish(outgoing)
            except PublishFailed as exc:
                failed[queue] = exc
        return failed

    async def dead_letter(
        self, body: bytes, queue: str, reason: str, headers: Headers, run_id: str | None = None
    ) -> None:
        """Publish a message to the dead-letter queue with the reason, keeping its headers
        as long as they fit in one frame of this connection (see dead_letter_headers)."""
        channel = cast(aiormq.Channel, await self._require().get_underlay_channel())
        table = dead_letter_headers(
            headers, reason, queue, run_id, channel.max_content_size - _HEADER_OVERHEAD
        )
        await self._send([_Routed(queue, self.names.dead, "", body, None, table)])

    async def _send(self, messages: list[_Routed]) -> None:
        """Publish until every message is confirmed; what a lost connection took is sent
        again until `publish_timeout`."""
        deadline = asyncio.get_running_loop().time() + self.settings.publish_timeout
        pause = 0.05
        while messages:
            tally = self._queue(messages)
            self._watch(tally, deadline)
            try:
                await tally.done
            finally:
                del self._watched[tally]  # not kept alive until the next sweep
            messages, lost = self._outcome(tally)
            if lost is not None:
                pause = await self._pause(lost, pause, deadline)

    def _watch(self, tally: _Tally, deadline: float) -> None:
        """Fail the tally if its confirms are not all in by the deadline (a broker that
        blocks this connection in a resource alarm sends none). One sweep every _SWEEP
        seconds for all calls: a timer per call measured several microseconds of a
        trigger's 50 or so of client CPU here."""
        self._watched[tally] = deadline
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for tally, deadline in list(self._watched.items()):
            if now >= deadline:
                tally.fail(_NoConfirm())
        self._sweeper = (
            asyncio.get_running_loop().call_later(_SWEEP, self._sweep) if self._watched else None
        )

    def _queue(self, messages: list[_Routed]) -> _Tally:
        """Join this loop turn's write."""
        tally = _Tally(messages)
        self._pending.append(tally)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return tally

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[_Tally]) -> None:
        """Queue the frames of every message of the batch as one write to the connection,
        numbered under the channel lock that aiormq's basic_publish holds to number its own."""
        try:
            channel = cast(aiormq.Channel, await self._require().get_underlay_channel())
            parts, framed = [], []
            for tally in batch:
                if tally.done.done():
                    continue  # the caller was cancelled
                try:
                    parts.append(_frames(channel.number, channel.max_content_size, tally.messages))
                except (ValueError, TypeError, AttributeError) as exc:  # pamqp, on bad headers
                    tally.fail(exc)
                    continue
                framed.append(tally)
            if not framed:
                return
            frame = ChannelFrame(payload=b"".join(parts), should_close=False)
            async with channel.lock:
                await channel.write_queue.put(frame)
                # No await from here on: the writer cannot send the frames (nor the broker
                # confirm them) before they are registered.
                watch = _Watch(channel, framed)
                for tally in framed:
                    tally.register(channel, watch)
        except Exception as exc:
            for tally in batch:
                if tally.watch is None:
                    tally.fail(exc)
        except BaseException:
            for tally in batch:
                tally.done.cancel()
            raise

    def _outcome(self, tally: _Tally) -> tuple[list[_Routed], BaseException | None]:
        """The messages a lost connection took, and why. Raises PublishFailed for an
        unroutable or refused message."""
        lost: list[_Routed] = []
        cause: BaseException | None = None
        failed: PublishFailed | None = None
        for m, error in zip(tally.messages, tally.outcomes, strict=True):
            if error is None:
                continue
            if isinstance(error, _NoConfirm):
                failed = failed or PublishFailed(
                    f"RabbitMQ at {redact(self.settings.amqp_url)} did not confirm the "
                    f"message for queue {m.queue!r} within {self.settings.publish_timeout}s "
                    "(is it blocked by a memory or disk alarm?); the outcome is unknown: "
                    "the message may or may not be queued",
                    unknown=True,
                )
            elif isinstance(error, _TRANSIENT):
                lost.append(m)
                cause = error
            elif isinstance(error, PublishError):
                failed = failed or PublishFailed(
                    f"the broker could not route the message for queue {m.queue!r} "
                    f"(is the queue declared in namespace {self.settings.namespace!r}?): {error}"
                )
            elif isinstance(error, DeliveryError):
                failed = failed or PublishFailed(
                    f"the broker refused the message for {m.queue!r}: {error}"
                )
            else:
                raise error
        if failed is not None:
            raise failed
        return lost, cause

    async def _pause(self, exc: BaseException, pause: float, deadline: float) -> float:
        """Wait before trying again, or raise PublishFailed when out of time (a message
        sent before the connection was lost may have reached the broker)."""
        if asyncio.get_running_loop().time() + pause > deadline:
            raise PublishFailed(
                f"RabbitMQ at {redact(self.settings.amqp_url)} did not take the message "
                f"within {self.settings.publish_timeout}s: {exc!r}",
                unknown=True,
            ) from exc
        log.warning("broker unavailable (%r); retrying in %.2fs", exc, pause)
        await asyncio.sleep(pause)
        return min(pause * 2, 1.0)

    def _require(self) -> AbstractChannel:
        if self.channel is None:
            raise RuntimeError("publisher used before connect()")
        return self.channel


def dead_letter_headers(
    headers: Mapping[str, Any], reason: str, queue: str, run_id: str | None, limit: int
) -> dict[str, Any]:
    """The headers of a dead letter: the message's own (without RabbitMQ's x-death
    history) and conveyor's reason, queue and run id. When the message's own would not
    encode, or would not fit in `limit` bytes (a content header must fit in one frame,
    whose size the connection negotiated), only conveyor's are kept, with a note."""
    ours: dict[str, Any] = {REASON_HEADER: reason[:1000], QUEUE_HEADER: queue}
    if run_id:
        ours[RUN_ID_HEADER] = run_id
    copied = {k: v for k, v in headers.items() if not str(k).startswith("x-death")}
    merged = {**copied, **ours}
    try:
        size = len(field_table(merged))
    except Exception as exc:  # any producer can send headers; pamqp re-encodes what it read
        ours[DROPPED_HEADER] = f"{len(copied)} headers dropped: they do not encode ({exc})"[:500]
        return ours
    if size > limit:
        ours[DROPPED_HEADER] = (
            f"{len(copied)} headers dropped: {size} bytes, over the {limit} that fit in a frame"
        )
        return ours
    return merged


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
        if len(header) > limit:
            # The broker would close the connection over it, taking every other message.
            raise ValueError(
                f"the headers of a message for {m.queue!r} take {len(header)} bytes, "
                f"over the {limit} of a frame"
            )
        parts += (method, _FRAME.pack(_HEADER, number, len(header)), header, end)
        for start in range(0, len(body), limit):
            chunk = body[start : start + limit]
            parts += (_FRAME.pack(_BODY, number, len(chunk)), chunk, end)
    return b"".join(parts)
