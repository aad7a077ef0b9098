"""broker/receiver.py reads frames as pamqp would: every frame, well formed or not, comes
out as pamqp.frame.unmarshal makes it (or is refused as aiormq refuses it), and a real
connection reads with it."""

from __future__ import annotations

import asyncio
import datetime
import struct
from typing import Any

import aio_pika
import aiormq.connection
import pamqp.frame
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands, heartbeat
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from conveyor import ConfigurationError, Settings
from conveyor.broker import connection as amqp
from conveyor.broker import internals, receiver

short = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
names = st.from_regex(r"[a-zA-Z0-9_.:-]{0,40}", fullmatch=True)
tags = st.integers(min_value=0, max_value=2**63 - 1)
tables = st.dictionaries(st.text(min_size=1, max_size=10), st.integers(-(2**31), 2**31 - 1) | short)
when = st.datetimes(
    min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2100, 1, 1)
).map(lambda d: d.replace(microsecond=0, tzinfo=datetime.UTC))
properties = st.builds(
    commands.Basic.Properties,
    content_type=st.none() | short,
    content_encoding=st.none() | short,
    headers=st.none() | tables,
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 255),
    correlation_id=st.none() | short,
    message_id=st.none() | short,
    timestamp=st.none() | when,
    app_id=st.none() | short,
)
frames = st.one_of(
    st.builds(commands.Basic.Deliver, short, tags, st.booleans(), names, short),
    st.builds(commands.Basic.Ack, tags, st.booleans()),
    st.builds(commands.Basic.Nack, tags, st.booleans(), st.booleans()),
    st.builds(ContentHeader, st.just(0), tags, properties),
    st.builds(ContentBody, st.binary(min_size=1, max_size=300)),
    st.just(heartbeat.Heartbeat()),
)


def _state(frame: Any) -> tuple[Any, ...]:
    """What aiormq reads off a frame: its type and every field."""
    names = getattr(frame, "__slots__", None) or sorted(vars(frame))
    fields = [getattr(frame, name, None) for name in names]
    if isinstance(frame, ContentHeader):
        fields.append(_state(frame.properties))
    return (type(frame), *fields)


async def _read(data: bytes) -> list[tuple[int, int, Any]]:
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    frames = receiver.LeanFrameReceiver(stream)
    frames.started = True  # past the handshake
    return [frame async for frame in frames]


def _marshal(frame: Any, channel: int) -> bytes:
    if isinstance(frame, heartbeat.Heartbeat):
        return frame.marshal()
    return pamqp.frame.marshal(frame, channel)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(frames, st.integers(0, 2047)), min_size=1, max_size=5))
def test_frames_come_out_as_pamqp_makes_them(sent: list[tuple[Any, int]]) -> None:
    data = [_marshal(frame, channel) for frame, channel in sent]
    got = asyncio.run(_read(b"".join(data)))
    assert len(got) == len(data)
    for raw, (weight, channel, frame) in zip(data, got, strict=True):
        want_weight, want_channel, want = pamqp.frame.unmarshal(raw)
        assert (weight, channel, _state(frame)) == (want_weight, want_channel, _state(want))
    for (frame, _), raw in zip(sent, data, strict=True):
        lean = isinstance(frame, commands.Basic.Deliver | commands.Basic.Ack | ContentBody) or (
            isinstance(frame, ContentHeader) and frame.properties.timestamp is None
        )
        if lean:  # decoded here, not left to pamqp
            assert receiver._decode(raw[0], raw[7:]) is not None


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 2, 3]),
    st.sampled_from([b"\x00\x3c\x00\x3c", b"\x00\x3c\x00\x50", b"\x00\x3c\x00\x00"]),
    st.binary(max_size=60),
)
def test_a_malformed_frame_is_what_pamqp_says(kind: int, start: bytes, tail: bytes) -> None:
    """Frames whose fields do not add up: decoded or refused exactly as pamqp would."""
    payload = (start + tail) if kind == 1 else tail
    raw = struct.pack(">BHI", kind, 1, len(payload)) + payload + b"\xce"
    try:
        want: Any = _state(pamqp.frame.unmarshal(raw)[2])
    except Exception:
        want = InvalidFrameError
    try:
        [(_, _, frame)] = asyncio.run(_read(raw))
        got: Any = _state(frame)
    except InvalidFrameError:
        got = InvalidFrameError
    assert got == want


async def test_a_frame_without_its_end_octet_or_cut_short_is_refused() -> None:
    raw = pamqp.frame.marshal(ContentBody(b"abc"), 1)
    with pytest.raises(InvalidFrameError):
        await _read(raw[:-1] + b"\x00")
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await _read(raw[:-2])


async def test_a_real_connection_reads_with_it(settings: Settings) -> None:
    connection = await amqp.connect(settings, "conveyor-test-receiver")
    try:
        assert aiormq.connection.FrameReceiver is receiver.LeanFrameReceiver
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        body = b"x" * 200_000  # more than one body frame
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers={"k": 1}, message_id="m1"), queue.name
        )
        message = await queue.get(timeout=10)
        assert (message.body, message.headers, message.message_id) == (body, {"k": 1}, "m1")
        await message.ack()
    finally:
        await connection.close()


def test_a_moved_frame_reader_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    internals.check_receiver()  # the installed aiormq builds its reader as expected
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", None)
    with pytest.raises(ConfigurationError, match=r"FrameReceiver\.get_frame is missing") as refused:
        receiver.install()
    assert f"aiormq{internals.SUPPORTED}" in str(refused.value)
