"""JSON encoding and typed decoding with msgspec; decoders are built once per type."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgspec

encode = msgspec.json.encode


@lru_cache(maxsize=1024)
def decoder_for(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)
