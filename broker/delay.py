"""The delay ladder: one queue per power-of-two delay, so any delay takes few hops.

Level L holds messages for UNIT_MS * 2**L. A delayed message's routing key starts with
LEVELS words, one bit each (highest level first), followed by the destination queue name;
each level's exchange sends it either into its queue (bit 1) or straight on to the next
level down (bit 0). The lowest level hands it to the delivery exchange, which routes it
back to the work queue by the name at the end of the key. A message enters at the level of
its highest set bit (the levels above would only pass it on). Every message in one level's
queue has the same TTL, so nothing waits behind a longer delay.
"""

from __future__ import annotations

UNIT_MS = 100
LEVELS = 24  # UNIT_MS * 2**LEVELS is about 19 days; longer delays go round again.
MAX_UNITS: int = 2**LEVELS - 1  # typed: int ** int is Any to mypy


def _units(delay_ms: int) -> int:
    return min(MAX_UNITS, max(1, -(-delay_ms // UNIT_MS)))


def delay_routing_key(delay_ms: int, queue: str) -> str:
    """The routing key that sends a message through the ladder for at least `delay_ms`."""
    bits = format(_units(delay_ms), f"0{LEVELS}b")
    return ".".join(bits) + "." + queue


def entry_level(delay_ms: int) -> int:
    """The level whose exchange a delayed message is published to: its highest set bit.
    The levels above would only pass it on (bit 0), and each topic exchange a message
    crosses costs the broker about as much as the rest of its publish: entering at the
    top level, 24 exchanges deep, capped the whole ladder at about 560 messages/s here."""
    return _units(delay_ms).bit_length() - 1


def delivery_binding(queue: str) -> str:
    """The delivery exchange's binding for a work queue: any LEVELS bits, then the name."""
    return "*." * LEVELS + queue


def level_bindings(level: int) -> tuple[str, str]:
    """(to this level's queue, on to the next level) binding keys of one level's exchange."""
    prefix = "*." * (LEVELS - 1 - level)
    return prefix + "1.#", prefix + "0.#"
