"""The frames a worker receives most, read and decoded without pamqp's generic path.

aiormq reads a frame with three awaited reads and decodes it with pamqp, which looks up
the type of every field by name: about a quarter of a worker's CPU for a no-op run.
Here a frame takes two reads, and Basic.Deliver, Basic.Ack, content headers and body
frames are decoded directly into the same pamqp objects. Any other frame, a header with
a property not handled here, or a frame that does not decode exactly, goes to pamqp, so
what aiormq gets is always what pamqp would have made. `install` replaces the class that
aiormq's connection builds by name; broker/internals.py checks that it still does.
"""

from __future__ import annotations

import asyncio
import functools
import struct
from typing import Any

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands, decode
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

from .internals import check_receiver

_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
_ACK = b"\x00\x3c\x00\x50"  # class 60, method 80 (ack)
_TAG_BIT = struct.Struct(">qB")  # signed, as pamqp decodes a longlong
_HEADER = struct.Struct(">HHQH")  # class, weight, body size, first flag word
_METHOD, _CONTENT, _BODY = 1, 2, 3
_END = 0xCE

Deliver = commands.Basic.Deliver
Ack = commands.Basic.Ack
Properties = commands.Basic.Properties


class LeanFrameReceiver(aiormq.connection.FrameReceiver):
    async def get_frame(self) -> tuple[int, int, Any]:
        reader = self.reader
        if reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            head = await reader.readexactly(7)
            if not self.started and head.startswith(b"AMQP"):
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
            kind, channel, size = _HEAD.unpack(head)
            rest = await reader.readexactly(size + 1)
        except asyncio.IncompleteReadError as exc:
            raise AMQPConnectionError(
                f"Server connection unexpectedly closed. Read {len(exc.partial)} bytes "
                f"but {exc.expected} bytes expected"
            ) from exc
        except OSError as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        frame = _decode(kind, rest) if size and rest[-1] == _END else None
        if frame is not None:
            return 8 + size, channel, frame
        try:
            return pamqp.frame.unmarshal(head + rest)
        except PAMQPException as exc:
            raise InvalidFrameError(str(exc)) from exc


def install() -> None:
    """Make every aiormq connection opened from now on read with LeanFrameReceiver."""
    if aiormq.connection.FrameReceiver is not LeanFrameReceiver:
        check_receiver()
        aiormq.connection.FrameReceiver = LeanFrameReceiver  # type: ignore[misc]


def _decode(kind: int, rest: bytes) -> Any:
    """The frame in `rest` (payload and end octet), or None to leave it to pamqp."""
    try:
        if kind == _BODY:
            return ContentBody(rest[:-1])
        if kind == _CONTENT:
            return _content_header(rest)
        if kind == _METHOD:
            method = rest[:4]
            if method == _DELIVER:
                return _deliver(rest)
            if method == _ACK and len(rest) == 14:
                ack = Ack.__new__(Ack)
                ack.delivery_tag, bits = _TAG_BIT.unpack_from(rest, 4)
                ack.multiple = bool(bits & 1)
                return ack
    except (IndexError, struct.error, UnicodeDecodeError, PAMQPException, ValueError):
        pass  # pamqp decodes it again and says what is wrong
    return None


def _short(data: bytes, at: int) -> tuple[str, int]:
    end = at + 1 + data[at]
    if end > len(data):
        raise IndexError("short string past the end of the frame")
    return data[at + 1 : end].decode(), end


def _deliver(rest: bytes) -> Any:
    consumer_tag, at = _short(rest, 4)
    delivery_tag, bits = _TAG_BIT.unpack_from(rest, at)
    exchange, at = _short(rest, at + 9)
    routing_key, at = _short(rest, at)
    if at != len(rest) - 1:
        return None
    frame = Deliver.__new__(Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = bool(bits & 1)
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


@functools.cache
def _plan(flags: int) -> tuple[tuple[str, str], ...] | None:
    """The (property, type) pairs that `flags` says follow, in order; None for a type
    not decoded here (timestamp) or a second flag word."""
    if flags & 1:
        return None
    plan = tuple(
        (name, getattr(Properties, "_" + name))
        for name in Properties.__slots__
        if flags & Properties.flags[name]
    )
    return None if any(kind == "timestamp" for _, kind in plan) else plan


def _content_header(rest: bytes) -> Any:
    class_id, weight, body_size, flags = _HEADER.unpack_from(rest)
    plan = _plan(flags)
    if plan is None:
        return None
    values: dict[str, Any] = {}
    at = 14
    for name, kind in plan:
        if kind == "shortstr":
            values[name], at = _short(rest, at)
        elif kind == "octet":
            values[name] = rest[at]
            at += 1
        else:  # the headers table
            used, values[name] = decode.field_table(rest[at:-1])
            at += used
    if at != len(rest) - 1:
        return None
    header = ContentHeader(weight, body_size, Properties(**values))
    header.class_id = class_id
    return header
