"""Settings: the one place conveyor reads its environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import ConfigurationError
from .names import check_name


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('@', 1)[1]}"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "conveyor"
    max_payload_bytes: int = 1024 * 1024
    idempotency_ttl: float = 24 * 3600.0
    run_ttl: float = 7 * 24 * 3600.0
    # A run's lease lives this long without a heartbeat; a dead worker's run is resumed after it.
    lease_ttl: float = 10.0
    # A running message is handed over to a delayed watchdog after this long, well before
    # RabbitMQ's consumer_timeout (30 min by default) would close the channel.
    handover_after: float = 600.0
    shutdown_grace: float = 30.0
    # Broker-side bound on deliveries of one message (quorum queue x-delivery-limit).
    delivery_limit: int = 10
    # A run whose worker died this many times ends CRASHED.
    max_crashes: int = 3
    publish_timeout: float = 30.0
    # A Redis command unanswered this long drops its connection (hung server, half-open
    # connection); connecting, to Redis or RabbitMQ, has connect_timeout.
    redis_timeout: float = 10.0
    connect_timeout: float = 5.0
    # A client waiting in result() reads every run it waits for again this often, in case
    # the notice of a run's end was lost (its subscription reconnecting, Redis restarting).
    result_recheck: float = 5.0
    # The scheduler leader's lease; a standby takes over within this long of its death.
    scheduler_lease_ttl: float = 10.0
    # A run that has not moved this long after it was due is republished by the reaper.
    reap_after: float = 60.0
    # How often the leader looks for such runs (and for new dead letters).
    reap_interval: float = 5.0
    # Dead-letter records kept; beyond it the oldest are dropped.
    dead_letters_max: int = 10000
    # Cron ticks missed by at most this long (no scheduler led, Redis was down) fire late,
    # once each; older ones are skipped and logged. Longer than a leader takeover.
    cron_catch_up: float = 300.0
    # Added to the time the scheduler reads (Redis's TIME): a test hook that simulates a
    # scheduler whose clock is off. Leave it at 0.
    scheduler_clock_offset: float = 0.0
    # Width of the runs index's time buckets (shared/runs_index.py). Tests make it small
    # to cross bucket boundaries; leave it at its default, since a listing only finds the
    # buckets of the width it is given.
    run_index_bucket: float = 3600.0

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        for field in ("amqp_url", "redis_url"):
            if not getattr(self, field):
                raise ConfigurationError(f"{field} must not be empty")
        for field in (
            "max_payload_bytes",
            "idempotency_ttl",
            "run_ttl",
            "lease_ttl",
            "handover_after",
            "publish_timeout",
            "redis_timeout",
            "connect_timeout",
            "result_recheck",
            "delivery_limit",
            "max_crashes",
            "scheduler_lease_ttl",
            "reap_after",
            "reap_interval",
            "dead_letters_max",
            "cron_catch_up",
            "run_index_bucket",
        ):
            if getattr(self, field) <= 0:
                raise ConfigurationError(f"{field} must be positive, got {getattr(self, field)!r}")
        if self.shutdown_grace < 0:
            raise ConfigurationError("shutdown_grace must be zero or positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from CONVEYOR_* variables; keyword overrides that are not None win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in cls.__struct_fields__:
            variable = f"CONVEYOR_{field.upper()}"
            raw = env.get(variable)
            if raw is not None and raw != "":
                # Checked one at a time so that the error names the variable to fix.
                try:
                    msgspec.convert({field: raw}, cls, strict=False)
                except (msgspec.ValidationError, ConfigurationError) as exc:
                    raise ConfigurationError(f"{variable}={raw!r} is not valid: {exc}") from exc
                values[field] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.__struct_fields__)
        if unknown:
            raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(
                f"invalid setting: {exc} (check the CONVEYOR_* variables)"
            ) from exc
