"""Rules for names that end up in AMQP routing keys and Redis keys."""

from __future__ import annotations

import re

from .errors import ConfigurationError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigurationError(
            f"{kind} {value!r} is not valid: use 1-200 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter, digit or '_'"
        )
    return value
