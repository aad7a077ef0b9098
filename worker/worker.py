"""The worker: consumes run messages, executes attempts, and acks only durable outcomes.

Per message: decode strictly, claim the run in Redis (one script: drop, defer, or start an
attempt with a lease and the checkpoints), run the task, write the outcome (one script),
publish a retry if one is due, then ack. A worker killed mid-run leaves the message
unacked; RabbitMQ redelivers it and the next worker resumes from the checkpoints once the
dead worker's lease has run out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from aio_pika.abc import (
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage

from conveyor._task import Task, registered_tasks
from conveyor.broker.connection import connect as amqp_connect
from conveyor.broker.publisher import Outgoing, Publisher
from conveyor.broker.topology import Topology
from conveyor.shared import logs, metrics, tracing
from conveyor.shared.availability import (
    Backoff,
    Gate,
    is_broker_unavailable,
    is_redis_unavailable,
)
from conveyor.shared.context import RunContext, RunInfo
from conveyor.shared.errors import (
    ConfigurationError,
    ServiceUnavailable,
    TokenNotFound,
    describe,
)
from conveyor.shared.ids import new_run_id
from conveyor.shared.models import RunMessage, RunStatus
from conveyor.shared.redis_client import Redis, redis_client
from conveyor.shared.settings import Settings, redact
from conveyor.shared.store import Created, Lineage, NewRun, RunStore
from conveyor.shared.waits import child_result, notify_parent, timed_out, token_outcome

from .admission import Admission
from .delivery import Acks, Delivery
from .execution import Execution, run_attempt
from .limits import PARKED, Limits
from .slots import Slots
from .supervision import Supervisor
from .validation import Invalid, delivery_count, validate

log = logging.getLogger("conveyor.worker")

_decoder = msgspec.json.Decoder(RunMessage)
_encoder = msgspec.json.Encoder()

# A message for a task this worker does not know is requeued this many times (another
# worker may know it) before it is dead-lettered.
UNKNOWN_TASK_DELIVERIES = 3
# Deferred messages come back this much after the moment they wait for.
DEFER_MARGIN_MS = 50


class Worker:
    """Runs tasks from the given queues until stopped (SIGTERM in the CLI)."""

    def __init__(
        self,
        tasks: Mapping[str, Task[Any, Any]] | Sequence[Task[Any, Any]] | None = None,
        *,
        concurrency: int = 100,
        prefetch: int | None = None,
        queues: Sequence[str] | None = None,
        settings: Settings | None = None,
        amqp_url: str | None = None,
        redis_url: str | None = None,
        namespace: str | None = None,
    ) -> None:
        if tasks is None:
            tasks = registered_tasks()
        self.tasks = dict(tasks) if isinstance(tasks, Mapping) else {t.id: t for t in tasks}
        if not self.tasks:
            raise ConfigurationError("no tasks to run: import the modules that define them")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        if prefetch is not None and prefetch < concurrency:
            raise ConfigurationError(
                f"prefetch ({prefetch}) must be at least the concurrency ({concurrency})"
            )
        self.settings = settings or Settings.from_env(
            amqp_url=amqp_url, redis_url=redis_url, namespace=namespace
        )
        self.queues = list(queues) if queues else sorted({t.queue for t in self.tasks.values()})
        self.concurrency = concurrency
        # Deliveries held per queue: twice the slots by default (as Dramatiq does), so a
        # freed slot finds its next run already here. A quorum queue delivers a fifth
        # faster with this much credit (benchmarks/results/latest.md); the runs beyond
        # the slots wait in the worker (see _take_slot).
        self.prefetch = prefetch or 2 * concurrency
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.redis: Redis = redis_client(self.settings, max_connections=concurrency + 16)
        self.store = RunStore(self.redis, self.settings)
        self.topology = Topology(self.settings)
        self.publisher = Publisher(self.settings, self.topology)
        # Keyed by run and attempt: a worker that re-claims its own expired run (it stalled
        # past its lease) tracks the stale attempt and the new one apart.
        self.inflight: dict[tuple[str, int], Execution] = {}
        self._acks = Acks()
        self._slots = Slots(concurrency, max_wait=self.settings.handover_after)
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        # While a service is unavailable, the work that needs it waits at its gate: at most
        # handover_after, so no delivery is held long enough for consumer_timeout.
        self.redis_gate = Gate(
            "Redis",
            unavailable=is_redis_unavailable,
            stopping=self._stopping,
            hold_for=self.settings.handover_after,
            probe=lambda: self.store.batcher.execute("PING"),
            probe_timeout=self.settings.redis_timeout,
        )
        self.broker_gate = Gate(
            "RabbitMQ",
            unavailable=is_broker_unavailable,
            stopping=self._stopping,
            hold_for=self.settings.handover_after,
        )
        self.store.gate = self.redis_gate
        self.admission = Admission(
            self.store, self.id, self._stopping, max_wait=self.settings.handover_after
        )
        self.limits = Limits(self.store, self.id, self._publish_all)
        self.run_logs = logs.RunLogs(self.store)
        self._connection: AbstractRobustConnection | None = None
        # The publisher's own connection: RabbitMQ blocks a connection that publishes
        # during a resource alarm, and a blocked socket would hold up acks and deliveries.
        self._publishing: AbstractRobustConnection | None = None
        self._queues: list[AbstractQueue] = []
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._supervisor = Supervisor(self)

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def run(self) -> None:
        """Start, work until stop() is called, then shut down gracefully."""
        try:
            await self.start()
        except ServiceUnavailable as exc:
            log.warning("%s", exc)
            await self.shutdown()
            return
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def start(self) -> None:
        """Connect to Redis and RabbitMQ and start consuming. A service that is down or
        restarting is waited for (with backoff, saying what is awaited) until stop()."""
        await self._until_up(
            f"Redis at {redact(self.settings.redis_url)}", self._connect_redis, is_redis_unavailable
        )
        await self._until_up(
            f"RabbitMQ at {redact(self.settings.amqp_url)}",
            self._start_consuming,
            is_broker_unavailable,
        )
        self._supervisor.start()
        log.info(
            "worker %s consuming %s in namespace %r (concurrency %d)",
            self.id,
            ", ".join(self.queues),
            self.settings.namespace,
            self.concurrency,
        )

    async def _until_up(
        self,
        service: str,
        connect: Callable[[], Awaitable[None]],
        unavailable: Callable[[BaseException], bool],
    ) -> None:
        """Run `connect` until it succeeds; an error other than `service` being unavailable
        (a wrong password, queue arguments that do not match) is raised at once."""
        backoff = Backoff(first=0.2, cap=5.0)
        while True:
            try:
                await connect()
                return
            except Exception as exc:
                if not unavailable(exc):
                    raise
                await self._close_connections()
                pause = backoff.next()
                log.warning(
                    "waiting for %s (%s); trying again in %.1fs", service, describe(exc), pause
                )
                if await _wait_set(self._stopping, pause):
                    raise ServiceUnavailable(f"stopped while waiting for {service}") from exc

    async def _connect_redis(self) -> None:
        await self.store.batcher.execute("PING")
        await self._check_redis()

    async def _start_consuming(self) -> None:
        self._publishing = await amqp_connect(self.settings, f"conveyor-worker-publisher:{self.id}")
        await self.publisher.connect(self._publishing)
        self._connection = await amqp_connect(self.settings, f"conveyor-worker:{self.id}")
        channel: AbstractRobustChannel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.prefetch)
        # Strong references: the robust channel re-declares these queues after a reconnect.
        self._queues = [await self.topology.declare_queue(channel, name) for name in self.queues]
        await self._consume(channel)
        # A reopened channel (reconnect, consumer_timeout) has no consumers: add them again.
        channel.reopen_callbacks.add(self._on_reopen)

    async def _on_reopen(self, channel: AbstractRobustChannel | None, /) -> None:
        if channel is not None:
            await self._consume(channel)

    async def _consume(self, channel: AbstractRobustChannel) -> None:
        if self._stopping.is_set():
            return
        underlay = await channel.get_underlay_channel()
        self._consumers = []
        for name, queue in zip(self.queues, self._queues, strict=True):
            ok = await underlay.basic_consume(queue.name, functools.partial(self._on_message, name))
            self._consumers.append((queue, ok.consumer_tag or ""))

    async def shutdown(self) -> None:
        """Stop consuming, let running attempts finish within the grace period, hand the
        rest back, return prefetched messages, close connections."""
        self._stopping.set()
        for queue, tag in self._consumers:
            try:
                underlay = await queue.channel.get_underlay_channel()
                await underlay.basic_cancel(tag)
            except Exception as exc:  # the channel may already be gone
                log.debug("cancel consumer %s: %r", tag, exc)
        self._consumers.clear()
        running = [t for t in self._handlers if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_grace)
            if pending:
                log.warning("grace period over: handing %d runs back", len(self.inflight))
                for execution in list(self.inflight.values()):
                    execution.stop("shutdown")
                await asyncio.wait(pending, timeout=10)
        await self._supervisor.stop()
        # Closing the connection drops frames still queued: the last acks go out first.
        await self._acks.written(timeout=5)
        await self._close_connections()
        await self.redis_gate.aclose()
        await self.broker_gate.aclose()
        await self.store.close()
        await self.redis.aclose()

    async def _close_connections(self) -> None:
        self._consumers.clear()
        connections = (self._connection, self._publishing)
        self._connection = self._publishing = None
        for connection in connections:
            if connection is not None:
                try:
                    await connection.close()
                except Exception as exc:  # it may not have opened completely
                    log.debug("closing a connection: %r", exc)

    # -- messages -----------------------------------------------------------------------

    async def _on_message(self, queue: str, raw: DeliveredMessage) -> None:
        message = Delivery(raw, self._acks)
        # aiormq cancels consumer callbacks when their channel closes (consumer_timeout, a
        # lost connection, a broker restart). A run must outlive its channel: its lease keeps
        # it owned, the redelivery is deferred, and the late ack fails harmlessly. So the
        # work runs in a task of the worker's own.
        handler = asyncio.create_task(self._process(queue, message))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    async def _process(self, queue: str, message: Delivery) -> None:
        try:
            if self._stopping.is_set():
                await message.nack(requeue=True)
                return
            if not await self._take_slot(queue, message):
                return
            try:
                if self._stopping.is_set():
                    await message.nack(requeue=True)
                    return
                await self._handle(queue, message)
            finally:
                self._slots.release()
        except ServiceUnavailable as exc:
            # Held as long as a delivery may be: back to the queue, once.
            log.warning("giving a message back to queue %r: %s", queue, exc)
            await message.nack(requeue=True)
        except Exception:
            # Not a known outage, not a known bad message: a bug or an unknown failure.
            # Requeued after a pause that grows with its deliveries, never in a tight loop.
            pause = _requeue_pause(message.headers)
            log.exception(
                "unexpected error handling a message from queue %r; requeued in %.1fs",
                queue,
                pause,
            )
            await _wait_set(self._stopping, pause)
            await message.nack(requeue=True)

    async def _take_slot(self, queue: str, message: Delivery) -> bool:
        """Wait for a free slot; a message that waits as long as a run may keep its own
        (long runs were handed over, so the broker sent more) goes round the delay ladder
        instead, before RabbitMQ's consumer_timeout closes the channel over it."""
        try:
            await self._slots.acquire()
        except TimeoutError:
            delay_ms = int(self.settings.lease_ttl * 1000)
            await self._publish(
                Outgoing(
                    queue,
                    message.body,
                    message_id=message.message_id,
                    delay_ms=delay_ms,
                    headers=tracing.forward(message.headers),
                )
            )
            message.ack()
            return False
        return True

    async def _handle(self, queue: str, message: Delivery) -> None:
        now_ms = int(time.time() * 1000)
        checked = validate(
            message.body, message.message_id, self.settings.max_payload_bytes, now_ms
        )
        if isinstance(checked, Invalid):
            await self._dead_letter(message, queue, checked.reason)
            return
        msg, payload = checked.msg, checked.payload
        task = self.tasks.get(msg.task)
        if task is None:
            if delivery_count(message.headers) + 1 >= UNKNOWN_TASK_DELIVERIES:
                await self._dead_letter(message, queue, f"unknown task {msg.task!r}")
            else:
                await message.nack(requeue=True)
            return
        if msg.id is None:
            # Give the run an id its redeliveries keep: otherwise a redelivery after a crash
            # would start a second run and leave the first one EXECUTING for ever.
            msg.id = new_run_id()
            await self._publish(
                Outgoing(
                    queue,
                    _encoder.encode(msg),
                    message_id=msg.id,
                    headers=tracing.forward(message.headers),
                )
            )
            message.ack()
            return
        if msg.not_before is not None:
            early = msg.not_before - now_ms
            if early > DEFER_MARGIN_MS:
                await self._defer(message, msg, queue, early)
                return
        if task.rate_limit is None and task.concurrency is None:
            await self._claim_and_run(message, msg, task, queue, payload)
            return
        wait = await self.limits.admit(task, msg, queue, tracing.forward(message.headers))
        if wait == PARKED:
            message.ack()
        elif wait is not None:
            await self._defer(message, msg, queue, wait + DEFER_MARGIN_MS)
        else:
            try:
                await self._claim_and_run(message, msg, task, queue, payload)
            finally:
                await self.limits.release(task, msg.id)

    async def _claim_and_run(
        self, message: Delivery, msg: RunMessage, task: Task[Any, Any], queue: str, payload: bytes
    ) -> None:
        assert msg.id is not None
        claimed_at = time.monotonic()
        claim = await self.admission.claim(msg.id)
        if claim.kind == "tokens":
            # Waits on tokens past their timeout: each token says how it ended, then the
            # run is claimed again (it runs if that was all it waited for).
            await self._end_token_waits(msg.id, claim.tokens)
            claimed_at = time.monotonic()
            claim = await self.admission.claim(msg.id)
        if claim.kind == "missing":
            # Triggered straight through the broker (wire format): the run starts here.
            new = NewRun(
                msg.id,
                msg.task,
                queue,
                payload,
                msg.tags,
                msg.idempotency_key,
                0,
                scheduled_at=msg.scheduled_at or 0,
                concurrency_key=msg.concurrency_key or "",
                ttl_ms=msg.ttl or 0,
                # Time spent queued after the message could run counts too.
                ttl_from_ms=msg.not_before or 0,
                trace=tracing.pack(tracing.forward(message.headers)),
            )
            [created] = await self.redis_gate.call(lambda: self._create(new))
            if created.run_id != msg.id:
                log.info("run %s: idempotency key already used by %s", msg.id, created.run_id)
                message.ack()
                return
            claimed_at = time.monotonic()
            claim = await self.admission.claim(msg.id)
        if claim.kind == "drop" and claim.lineage is not None and claim.lineage.parent_step:
            # An ended child run: its parent must know before the message goes.
            result = child_result(claim.detail, claim.output, claim.error)
            await self._notify_parent(claim.lineage, msg.id, result)
            message.ack()
        elif claim.kind in ("drop", "missing"):
            message.ack()
        elif claim.kind in ("busy", "early"):
            await self._defer(message, msg, queue, claim.wait_ms + DEFER_MARGIN_MS)
        elif claim.kind == "crashed":
            metrics.of(task.id).outcome_written(RunStatus.CRASHED, "CRASHED")
            await self._dead_letter(message, queue, claim.detail, run_id=msg.id)
        else:
            await self._execute(
                message,
                msg,
                task,
                queue,
                payload,
                claim.attempt,
                claim.failures,
                claim.checkpoints,
                claimed_at,
                claim.lineage,
            )

    async def _end_token_waits(self, run_id: str, waits: list[tuple[str, str]]) -> None:
        for key, token_id in waits:
            try:
                result = await token_outcome(self.store, token_id, run_id, key)
            except TokenNotFound:  # expired with its key: the wait timed out
                result = timed_out(token_id)
            if result is not None:
                await self.store.resolve(run_id, key, token_id, result)

    async def _notify_parent(self, lineage: Lineage, child_id: str, result: bytes) -> None:
        await self.redis_gate.call(
            lambda: notify_parent(
                self.store,
                self._publish_message,
                lineage.parent,
                lineage.parent_step,
                child_id,
                result,
            )
        )

    async def _publish_message(
        self, queue: str, msg: RunMessage, headers: tracing.Carrier | None, delay_ms: int = 0
    ) -> None:
        await self._publish(
            Outgoing(
                queue, _encoder.encode(msg), message_id=msg.id, delay_ms=delay_ms, headers=headers
            )
        )

    async def _spawn(self, children: list[NewRun]) -> None:
        """Create and publish the child runs a waiting step starts (those created by an
        earlier try are there already: a crash before their publish is the reaper's)."""
        # Under the span of the step or wait that starts them (current in this task).
        ids = [c.run_id for c in children]
        with tracing.publishing(children[0].queue, children[0].task_id, ids) as carrier:
            await self._start_children(children, carrier)

    async def _start_children(
        self, children: list[NewRun], carrier: tracing.Carrier | None
    ) -> None:
        if carrier:
            trace = tracing.pack(carrier)
            children = [msgspec.structs.replace(c, trace=trace) for c in children]
        created = await self.redis_gate.call(lambda: self.store.create(children))
        outgoing = [
            Outgoing(
                child.queue,
                _encoder.encode(
                    RunMessage(
                        task=child.task_id,
                        payload=msgspec.Raw(child.payload),
                        id=child.run_id,
                        tags=child.tags,
                        concurrency_key=child.concurrency_key or None,
                        ttl=child.ttl_ms or None,
                    )
                ),
                message_id=child.run_id,
                delay_ms=child.delay_ms,
                headers=carrier,
            )
            for child, made in zip(children, created, strict=True)
            if made.new
        ]
        if outgoing:
            await self.broker_gate.call(lambda: self._publish_children(outgoing))

    async def _publish_children(self, outgoing: list[Outgoing]) -> None:
        for queue in {o.queue for o in outgoing}:
            await self.publisher.ensure_queue(queue)
        await self.publisher.publish(outgoing)

    async def _create(self, run: NewRun) -> list[Created]:
        return await self.store.create([run])

    async def _execute(
        self,
        message: Delivery,
        msg: RunMessage,
        task: Task[Any, Any],
        queue: str,
        payload: bytes,
        attempt: int,
        failures: int,
        checkpoints: dict[str, bytes],
        claimed_at: float,
        lineage: Lineage | None,
    ) -> None:
        run_id = msg.id
        assert run_id is not None
        execution = Execution(run_id, attempt, task.id, queue, message, claimed_at)
        tracer = tracing.tracer()
        span = (
            None
            if tracer is None
            else tracing.AttemptSpan(tracer, message.headers, run_id, task.id, queue, attempt)
        )
        ctx = RunContext(
            RunInfo(
                run_id,
                task.id,
                attempt,
                scheduled_at=None if msg.scheduled_at is None else _from_ms(msg.scheduled_at),
            ),
            self.store,
            checkpoints,
            worker=self.id,
            stop=execution.stop,
            spawn=self._spawn,
            lineage=lineage,
            tracer=tracer,
        )
        key = (run_id, attempt)
        self.inflight[key] = execution
        meter = metrics.of(task.id)
        meter.attempt_started(run_id, attempt, msg.not_before, msg.scheduled_at)
        known = len(checkpoints)
        try:
            # The attempt's last records are sent with its outcome, in one write.
            with self.run_logs.attempt(run_id, attempt, task.id):
                outcome = await run_attempt(task, payload, ctx, failures, execution)
            if span is not None:
                span.ended(outcome.attempt_status, outcome.error, outcome.traceback)
            meter.attempt_ran(
                outcome.attempt_status,
                time.monotonic() - execution.started,
                len(checkpoints) - known,
                len(ctx.replayed),
            )
            if execution.stop_reason == "lost":
                # Taken over (this attempt stalled past its lease) or ended: whatever this
                # attempt found is not the run's any more, so it writes nothing.
                log.warning("run %s: attempt %d lost the run; its outcome is dropped", *key)
            elif outcome.run_status is RunStatus.WAITING:
                traceparent = "" if span is None else span.traceparent()
                headers = _next_headers(message, span)
                await self._suspend(msg, queue, attempt, headers, traceparent)
            else:
                if outcome.attempt_status == "THROTTLED":
                    await self.limits.pause(task, outcome.retry_delay_ms / 1000)
                result = await self.store.finish(
                    run_id,
                    self.id,
                    attempt,
                    run_status=outcome.run_status,
                    attempt_status=outcome.attempt_status,
                    output=outcome.output,
                    error=outcome.error,
                    traceback=outcome.traceback,
                    retry_delay_ms=outcome.retry_delay_ms,
                )
                if result.kind == "ok":
                    meter.outcome_written(outcome.run_status, outcome.attempt_status)
                if (
                    result.kind == "ok"
                    and outcome.run_status.is_terminal
                    and lineage is not None
                    and lineage.parent_step
                ):
                    ended = child_result(outcome.run_status.value, outcome.output, outcome.error)
                    await self._notify_parent(lineage, run_id, ended)
                if result.kind == "ok" and outcome.run_status is RunStatus.RETRYING:
                    msg.not_before = result.at_ms
                    msg.reserved = None
                    await self._publish(
                        Outgoing(
                            queue,
                            _encoder.encode(msg),
                            message_id=run_id,
                            delay_ms=outcome.retry_delay_ms,
                            headers=_next_headers(message, span),
                        )
                    )
        finally:
            if span is not None:
                span.end()
            meter.attempt_left()
            execution.done = True
            self.inflight.pop(key, None)
            self.admission.finished(run_id)
        if execution.handed_over:
            return
        if outcome.requeue:
            await message.nack(requeue=True)
        else:
            message.ack()

    async def _suspend(
        self,
        msg: RunMessage,
        queue: str,
        attempt: int,
        headers: tracing.Carrier | None,
        traceparent: str,
    ) -> None:
        """End an attempt that only waits: WAITING, woken by what it waits for (a child's
        end, through notify_parent) or by a message at its earliest timer; or, when all of
        it is over already, run again at once."""
        assert msg.id is not None
        run_id = msg.id
        suspended = await self.store.suspend(run_id, self.id, attempt, traceparent)
        msg.not_before = None
        if suspended.kind == "resume":
            await self._publish_message(queue, msg, headers)
        elif suspended.kind == "waiting" and suspended.timer_ms:
            delay_ms = max(1, suspended.timer_ms - suspended.now_ms)
            await self._publish_message(queue, msg, headers, delay_ms)

    async def _publish(self, outgoing: Outgoing) -> None:
        """Publish one message, waiting at the broker gate while RabbitMQ is unavailable."""
        await self.broker_gate.call(lambda: self.publisher.publish([outgoing]))

    async def _publish_all(self, outgoing: list[Outgoing]) -> None:
        await self.broker_gate.call(lambda: self.publisher.publish(outgoing))

    async def _defer(self, message: Delivery, msg: RunMessage, queue: str, delay_ms: int) -> None:
        """Send the message round the delay ladder and ack this copy: nothing waits here."""
        run_id = msg.id
        await self._publish(
            Outgoing(
                queue,
                _encoder.encode(msg),
                message_id=run_id,
                delay_ms=max(delay_ms, 1),
                headers=tracing.forward(message.headers),
            )
        )
        message.ack()

    async def hand_over(self, execution: Execution) -> None:
        """Replace a long-running run's unacked message by a delayed watchdog copy, so
        RabbitMQ's consumer_timeout never fires; the lease keeps the run ours meanwhile."""
        message = execution.message
        msg = _decoder.decode(message.body)
        msg.id = execution.run_id
        msg.not_before = None
        delay_ms = int(self.settings.lease_ttl * 1000) + DEFER_MARGIN_MS
        await self._publish(
            Outgoing(
                execution.queue,
                _encoder.encode(msg),
                message_id=execution.run_id,
                delay_ms=delay_ms,
                headers=tracing.forward(message.headers),
            )
        )
        execution.handed_over = True
        message.ack()

    async def _dead_letter(
        self,
        message: Delivery,
        queue: str,
        reason: str,
        *,
        run_id: str | None = None,
    ) -> None:
        log.warning("dead-lettering a message from queue %r: %s", queue, reason)
        await self.broker_gate.call(
            lambda: self.publisher.dead_letter(message.body, queue, reason, message.headers, run_id)
        )
        message.ack()

    async def _check_redis(self) -> None:
        try:
            config: dict[Any, Any] = await self.redis.config_get("appendonly")
            config.update(await self.redis.config_get("maxmemory-policy"))
        except Exception:  # managed Redis often forbids CONFIG
            return
        if config.get(b"appendonly", config.get("appendonly")) in (b"no", "no"):
            log.warning("Redis has appendonly=no: run state can be lost on a Redis restart")
        policy = config.get(b"maxmemory-policy", config.get("maxmemory-policy"))
        if policy not in (b"noeviction", "noeviction"):
            log.warning(
                "Redis maxmemory-policy is %r; use noeviction so run state is never evicted", policy
            )


async def _wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `event`; whether it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _next_headers(message: Delivery, span: tracing.AttemptSpan | None) -> tracing.Carrier | None:
    """The headers of a retry or resume: the trigger's trace context (and, when this
    attempt was traced, a link to it)."""
    return tracing.forward(message.headers) if span is None else span.next_headers()


def _requeue_pause(headers: Mapping[str, Any]) -> float:
    """A random pause before requeueing after an unexpected error, growing with the
    message's deliveries so far (up to 30 s)."""
    deliveries = headers.get("x-delivery-count")
    deliveries = deliveries if isinstance(deliveries, int) and deliveries >= 0 else 0
    return random.uniform(0.5, min(30.0, 1.0 * 2 ** min(deliveries, 5)))


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
