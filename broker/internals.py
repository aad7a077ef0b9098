"""The aiormq internals conveyor relies on, checked before they are used.

broker/publisher.py writes its own frames to aiormq's connection writer and keeps their
confirms in the channel's bookkeeping (see its _Tally); broker/receiver.py replaces the
frame reader that aiormq's connection builds. Those are not aiormq's public API:
pyproject.toml pins aiormq to the minor series this was checked against, and these
checks turn a moved internal into a clear start-up error instead of lost confirms or
frames read the old way.
"""

from __future__ import annotations

import asyncio
import inspect
from importlib import metadata
from typing import Any

import aiormq.connection
from aiormq.abc import ChannelFrame

from conveyor.shared.errors import ConfigurationError

# The aiormq versions the framing was checked against (pyproject.toml pins the same).
SUPPORTED = ">=7.2.4,<7.3"

# attribute of aiormq.Channel -> what it must be
_CHANNEL: dict[str, tuple[type, ...]] = {
    "confirmations": (dict,),
    "message_id_delivery_tag": (dict,),
    "delivery_tag": (int,),
    "number": (int,),
    "max_content_size": (int,),
    "write_queue": (asyncio.Queue,),
}


def check_aiormq(channel: Any) -> None:
    """Raise ConfigurationError if the aiormq channel lacks what the publisher uses."""
    problems = [
        f"Channel.{name} is {type(getattr(channel, name, None)).__name__}, "
        f"expected {' or '.join(t.__name__ for t in types)}"
        for name, types in _CHANNEL.items()
        if not isinstance(getattr(channel, name, None), types)
    ]
    # a property that makes a fresh context manager per use: looked up on the class
    if not isinstance(getattr(type(channel), "lock", None), property):
        problems.append("Channel.lock is not a property (the channel lock)")
    if not callable(getattr(channel, "create_future", None)):
        problems.append("Channel.create_future is missing")
    fields = inspect.signature(ChannelFrame).parameters
    if not {"payload", "should_close"} <= set(fields):
        problems.append(f"aiormq.abc.ChannelFrame takes {', '.join(fields)}")
    _raise("publisher", problems)


def check_receiver() -> None:
    """Raise ConfigurationError if aiormq's connection no longer reads its frames with
    a FrameReceiver built by name from its module, with get_frame() as the one read."""
    problems = []
    receiver = getattr(aiormq.connection, "FrameReceiver", None)
    if not isinstance(receiver, type) or not callable(getattr(receiver, "get_frame", None)):
        problems.append("aiormq.connection.FrameReceiver.get_frame is missing")
    elif "FrameReceiver(reader)" not in inspect.getsource(aiormq.connection.Connection):
        problems.append("aiormq.connection.Connection no longer builds FrameReceiver(reader)")
    _raise("frame reader", problems)


def _raise(part: str, problems: list[str]) -> None:
    if problems:
        raise ConfigurationError(
            f"conveyor's {part} does not support the installed aiormq {_version()} "
            f"(supported: aiormq{SUPPORTED}): {'; '.join(problems)}. "
            f"Install a supported version: pip install 'aiormq{SUPPORTED}'"
        )


def _version() -> str:
    try:
        return metadata.version("aiormq")
    except metadata.PackageNotFoundError:
        return "(version unknown)"
