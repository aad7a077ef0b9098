"""Client: triggers runs, reads and cancels them. RunHandle: one run seen from outside."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aio_pika
import msgspec
from redis.exceptions import RedisError

from conveyor.broker.connection import connect as amqp_connect
from conveyor.broker.publisher import Outgoing, Publisher
from conveyor.broker.topology import Topology
from conveyor.shared import tracing
from conveyor.shared.bounds import MAX_DELAY_MS, options_problem, ttl_ms
from conveyor.shared.context import current_context
from conveyor.shared.errors import (
    InvalidArguments,
    InvalidOption,
    InvalidWait,
    PayloadTooLarge,
    PublishFailed,
    RunFailed,
    RunNotFound,
    TokenNotFound,
    TokenNotPending,
    TriggerError,
    TriggerIncomplete,
)
from conveyor.shared.ids import new_run_id
from conveyor.shared.logs import LogEntry
from conveyor.shared.logs import decode as decode_logs
from conveyor.shared.models import Run, RunMessage, RunPage, RunStatus
from conveyor.shared.names import check_name
from conveyor.shared.redis_client import Redis, redis_client
from conveyor.shared.schedules import ScheduleStore
from conveyor.shared.settings import Settings
from conveyor.shared.store import Created, NewRun, RunStore, decode_any
from conveyor.shared.waits import WaitResult, woken_message

from ._results import Endings
from ._schedules import Schedules

if TYPE_CHECKING:
    from ._task import Task, TriggerOptions

R = TypeVar("R")

_message_encoder = msgspec.json.Encoder()


class RunHandle(Generic[R]):
    """A triggered run: its id, its status, and a way to wait for its result."""

    __slots__ = ("_client", "_decode", "id")

    def __init__(self, run_id: str, client: Client, decode: Callable[[bytes], R]) -> None:
        self.id = run_id
        self._client = client
        self._decode = decode

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"

    async def status(self) -> RunStatus:
        view = await self._client.store.status(self.id)
        if view is None:
            raise RunNotFound(self.id)
        return view.status

    async def get(self) -> Run:
        return await self._client.get_run(self.id)

    async def cancel(self) -> RunStatus:
        return await self._client.cancel(self.id)

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the run to end; return its output or raise RunFailed (ResultTimeout
        after `timeout` seconds). It wakes on the run's end notice (see _results.py)."""
        view = await self._client.endings.wait(self.id, timeout)
        if view.status is RunStatus.COMPLETED:
            return self._decode(view.output or b"null")
        raise RunFailed(self.id, view.status.value, view.error)


class Client:
    """A connection to conveyor's RabbitMQ and Redis for triggering and inspecting runs.

    Use `async with Client(...)`; inside the block, `Task.trigger` goes through it.
    Settings come from CONVEYOR_* variables; keyword arguments override them."""

    def __init__(
        self,
        *,
        amqp_url: str | None = None,
        redis_url: str | None = None,
        namespace: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env(
            amqp_url=amqp_url, redis_url=redis_url, namespace=namespace
        )
        # Named, so that CLIENT LIST tells a client's connections from a worker's.
        self.redis: Redis = redis_client(
            self.settings, client_name=f"conveyor-client:{self.settings.namespace}"
        )
        self.store = RunStore(self.redis, self.settings)
        self.endings = Endings(self.store, self.settings)
        self.topology = Topology(self.settings)
        self.publisher = Publisher(self.settings, self.topology)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._connect_lock = asyncio.Lock()
        self._tokens: list[Token[Client | None]] = []
        self.schedules = Schedules(ScheduleStore(self.redis, self.store.batcher, self.store.keys))

    async def __aenter__(self) -> Client:
        self._tokens.append(_active.set(self))
        return self

    async def __aexit__(self, *exc: object) -> None:
        _active.reset(self._tokens.pop())
        await self.close()

    async def connect(self) -> None:
        """Connect to RabbitMQ (Redis connects per command); called on first use."""
        async with self._connect_lock:
            if self._connection is None:
                connection = await amqp_connect(
                    self.settings, f"conveyor-client:{self.settings.namespace}"
                )
                try:
                    await self.publisher.connect(connection)
                except BaseException:
                    await connection.close()
                    raise
                # Set last: a trigger that finds it set goes on without the lock.
                self._connection = connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        await self.endings.aclose()
        await self.store.close()
        await self.redis.aclose()

    # -- triggering ---------------------------------------------------------------------

    async def trigger(
        self,
        task_id: str,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        delay: float | None = None,
        tags: Sequence[str] | None = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        ttl: float | timedelta | None = None,
    ) -> RunHandle[Any]:
        """Trigger a task by id with a JSON-compatible payload of keyword arguments.
        `ttl` (seconds or a timedelta): a run not started that long after its delay ends
        EXPIRED (the task's own default is not known here)."""
        from ._task import TriggerOptions

        check_name("task id", task_id)
        try:
            body = msgspec.json.encode(dict(payload or {}))
        except (TypeError, ValueError) as exc:
            raise InvalidArguments(task_id, f"payload is not JSON-serializable: {exc}") from exc
        ms, bad_ttl = ttl_ms(ttl)
        if bad_ttl is not None:
            raise InvalidOption("ttl", bad_ttl)
        opts = TriggerOptions(
            idempotency_key=idempotency_key,
            delay=delay,
            tags=list(tags or []),
            concurrency_key=concurrency_key,
            ttl=None if ms is None else ms / 1000,
        )
        [handle] = await self._trigger(task_id, queue or task_id, [body], opts, decode_any)
        return handle

    async def trigger_task(
        self, task: Task[Any, R], payloads: Sequence[bytes], options: TriggerOptions
    ) -> list[RunHandle[R]]:
        return await self._trigger(task.id, task.queue, payloads, options, task.decode_result)

    async def _trigger(
        self,
        task_id: str,
        queue: str,
        payloads: Sequence[bytes],
        opts: TriggerOptions,
        decode: Callable[[bytes], R],
    ) -> list[RunHandle[R]]:
        limit = self.settings.max_payload_bytes
        for body in payloads:
            if len(body) > limit:
                raise PayloadTooLarge(task_id, len(body), limit)
        if opts.delay is not None and not 0 <= opts.delay <= MAX_DELAY_MS / 1000:
            raise InvalidOption(
                "delay", f"must be 0 to {MAX_DELAY_MS // 1000} seconds, got {opts.delay}"
            )
        problem = options_problem(opts.idempotency_key, opts.tags, opts.concurrency_key)
        if problem is not None:
            raise InvalidOption(*problem)
        if opts.idempotency_key is not None and len(payloads) > 1:
            raise TriggerError("one idempotency_key cannot be shared by a batch of runs")
        bad_ttl = ttl_ms(opts.ttl)[1]
        if bad_ttl is not None:
            raise InvalidOption("ttl", bad_ttl)
        if self._connection is None:
            await self.connect()
        if queue not in self.topology.declared_queues:
            await self.publisher.ensure_queue(queue)
        run_ids = [new_run_id() for _ in payloads]
        with tracing.publishing(queue, task_id, run_ids) as carrier:
            return await self._start(task_id, queue, payloads, run_ids, opts, decode, carrier)

    async def _start(
        self,
        task_id: str,
        queue: str,
        payloads: Sequence[bytes],
        run_ids: Sequence[str],
        opts: TriggerOptions,
        decode: Callable[[bytes], R],
        carrier: tracing.Carrier | None,
    ) -> list[RunHandle[R]]:
        """Create the runs and publish their messages, with the trace context `carrier`."""
        delay_ms = int((opts.delay or 0) * 1000)
        run_ttl_ms = ttl_ms(opts.ttl)[0]  # checked by _trigger
        # Triggered inside a run: a child run, recorded under it (for its tree and cancel).
        ctx = current_context()
        parent, root = (ctx.info.id, ctx.root) if ctx is not None else (None, None)
        trace = tracing.pack(carrier)
        runs = [
            NewRun(
                run_id,
                task_id,
                queue,
                body,
                opts.tags,
                opts.idempotency_key,
                delay_ms,
                parent=parent,
                root=root,
                concurrency_key=opts.concurrency_key or "",
                ttl_ms=run_ttl_ms or 0,
                trace=trace,
            )
            for run_id, body in zip(run_ids, payloads, strict=True)
        ]
        # One budget for the whole trigger: recording the runs and getting their confirms.
        deadline = asyncio.get_running_loop().time() + self.settings.publish_timeout
        if opts.idempotency_key is None and not delay_ms:
            # Nothing to look up first, so the runs are created and their messages published
            # at once: a worker that gets a message before its run exists creates it itself.
            creating = self.store.create(runs)
            await self._publish(
                runs, self._messages(task_id, queue, runs, None, carrier), creating, deadline
            )
            # Answered before returning, so the runs can be read at once.
            await self._created(runs, creating, deadline, published=True)
            if parent is not None:
                await self.store.add_child(parent, [run.run_id for run in runs])
            return [RunHandle(run.run_id, self, decode) for run in runs]
        created = await self._created(runs, self.store.create(runs), deadline, published=False)
        fresh = [run for run, c in zip(runs, created, strict=True) if c.created]
        not_before = int(time.time() * 1000) + delay_ms if delay_ms else None
        await self._publish(
            fresh, self._messages(task_id, queue, fresh, not_before, carrier), None, deadline
        )
        hits = [c.run_id for c in created if not c.created]
        if hits:
            await self._republish_unstarted(hits)
        if parent is not None and fresh:
            await self.store.add_child(parent, [run.run_id for run in fresh])
        return [RunHandle(c.run_id, self, decode) for c in created]

    async def _republish_unstarted(self, run_ids: list[str]) -> None:
        """An idempotency hit on a run that never started: its message may be the one a
        crash lost, so it is published again (a spare one is dropped by the claim)."""
        states = await self.store.states(run_ids)
        unstarted = [
            run_id
            for run_id, state in zip(run_ids, states, strict=True)
            if state is not None
            and state.status in (RunStatus.QUEUED, RunStatus.DELAYED)
            and state.attempt == 0
        ]
        now = int(time.time() * 1000)
        outgoing = [
            Outgoing(
                r.queue,
                _message_encoder.encode(r.message),
                message_id=r.message.id,
                delay_ms=max(0, (r.message.not_before or 0) - now),
                headers=r.headers,
            )
            for r in await self.store.republishes(unstarted)
            if r is not None
        ]
        if outgoing:
            await self.publisher.publish(outgoing)

    def _messages(
        self,
        task_id: str,
        queue: str,
        runs: Sequence[NewRun],
        not_before: int | None,
        headers: tracing.Carrier | None,
    ) -> list[Outgoing]:
        return [
            Outgoing(
                queue,
                _message_encoder.encode(
                    RunMessage(
                        task=task_id,
                        payload=msgspec.Raw(run.payload),
                        id=run.run_id,
                        idempotency_key=run.idempotency_key,
                        tags=run.tags,
                        not_before=not_before,
                        concurrency_key=run.concurrency_key or None,
                        ttl=run.ttl_ms or None,
                    )
                ),
                message_id=run.run_id,
                delay_ms=run.delay_ms,
                headers=headers,
            )
            for run in runs
        ]

    async def _created(
        self,
        runs: Sequence[NewRun],
        creating: asyncio.Future[list[Created]],
        deadline: float,
        *,
        published: bool,
    ) -> list[Created]:
        """The create's answer; a failed create is tried again (create.lua leaves a run
        that exists alone) until the deadline, then TriggerIncomplete."""
        loop = asyncio.get_running_loop()
        pause = 0.05
        while True:
            try:
                if creating.done():  # usually answered by now: no timer
                    created = creating.result()
                else:
                    async with asyncio.timeout_at(deadline):
                        created = await creating
                if runs[0].idempotency_key is None:
                    return created
                # A retried create whose first try was applied finds the idempotency key
                # holding its own run id: that run is this one.
                return [
                    c if c.created or c.run_id != run.run_id else Created(c.run_id, True)
                    for run, c in zip(runs, created, strict=True)
                ]
            except (RedisError, OSError) as exc:  # OSError includes the TimeoutError
                if loop.time() + pause >= deadline:
                    raise TriggerIncomplete(
                        [run.run_id for run in runs],
                        published,
                        f"Redis did not answer the create within "
                        f"{self.settings.publish_timeout}s: {exc!r}",
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                creating = self.store.create(runs)

    async def _publish(
        self,
        runs: Sequence[NewRun],
        outgoing: list[Outgoing],
        creating: asyncio.Future[list[Created]] | None,
        deadline: float,
    ) -> None:
        """Publish; on failure raise TriggerIncomplete, first failing the runs that will not
        start (abandon.lua leaves any that a worker started)."""
        try:
            await self.publisher.publish(outgoing)
        except PublishFailed as exc:
            ids = [run.run_id for run in runs]
            if creating is not None:
                # Answered first: the abandon must come after the create, not before it
                # (given a moment even when the publish used up the budget).
                wait_until = max(deadline, asyncio.get_running_loop().time() + 1.0)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout_at(wait_until):
                        await creating
            if exc.unknown:
                raise TriggerIncomplete(ids, None, str(exc)) from exc
            with contextlib.suppress(RedisError, OSError):
                await self.store.abandon(runs, f"not published: {exc}")
            raise TriggerIncomplete(ids, False, str(exc)) from exc

    # -- reading and control ------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run:
        run = await self.store.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    async def get_logs(self, run_id: str, *, attempt: int | None = None) -> list[LogEntry]:
        """The records that the run's attempts logged (or one attempt's), by attempt,
        each attempt's in the order it logged them. An attempt keeps at most 1,000
        records and 256 KiB of them; a last record notes how many more it logged."""
        raws: list[Any] = await self.redis.lrange(self.store.keys.logs(run_id), 0, -1)
        if not raws and not await self.redis.exists(self.store.keys.run(run_id)):
            raise RunNotFound(run_id)
        return decode_logs(run_id, raws, attempt)

    async def list_runs(
        self,
        *,
        task_id: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> RunPage:
        """The newest live runs (of a task, with a status), up to `limit`, and the cursor
        of the next page: pass it back as `cursor` for the runs older than these. A page
        with a status filter examines at most max(10 * limit, 1000) runs and can come
        back short with a cursor; the cursor is None once no older run is left."""
        return await self.store.list(task_id=task_id, status=status, limit=limit, cursor=cursor)

    async def cancel(self, run_id: str, *, children: bool = True) -> RunStatus:
        """Cancel a run that has not ended, and (unless `children=False`) the runs of its
        tree that have not ended; returns the status the run had before."""
        previous = await self.store.cancel(run_id)
        if previous == "MISSING":
            raise RunNotFound(run_id)
        if children:
            pending = await self.store.children(run_id)
            while pending:
                await asyncio.gather(*(self.store.cancel(c) for c in pending))
                below = await asyncio.gather(*(self.store.children(c) for c in pending))
                pending = [c for group in below for c in group]
        return RunStatus(previous)

    async def complete_token(self, token_id: str, data: Any = None) -> None:
        """Complete a wait token with `data` (JSON-compatible): the run waiting for it
        resumes with the data. A token completes once, and only before its timeout."""
        try:
            encoded = msgspec.json.encode(data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidWait(f"token data must be JSON-compatible: {exc}") from exc
        limit = self.settings.max_payload_bytes
        if len(encoded) > limit:
            raise InvalidWait(f"token data is {len(encoded)} bytes, over the limit of {limit}")
        reply = await self.store.complete_token(token_id, encoded)
        if reply[0] == b"missing":
            raise TokenNotFound(token_id)
        if reply[0] != b"ok":
            raise TokenNotPending(token_id, reply[0].decode())
        run_id, step = reply[1].decode(), reply[2].decode()
        if not run_id or not step:
            return  # nobody waits yet: the run's wait_for_token will find it completed
        result = msgspec.json.encode(WaitResult(True, msgspec.Raw(encoded)))
        woken = await self.store.resolve(run_id, step, token_id, result)
        if woken is not None:
            if self._connection is None:
                await self.connect()
            message = woken_message(run_id, woken)
            outgoing = Outgoing(
                woken.queue,
                msgspec.json.encode(message),
                message_id=run_id,
                headers=tracing.woken_headers(woken.trace, woken.last_attempt),
            )
            await self.publisher.publish([outgoing])

    def handle(self, run_id: str) -> RunHandle[Any]:
        return RunHandle(run_id, self, decode_any)


_active: ContextVar[Client | None] = ContextVar("conveyor_client", default=None)
_default: dict[asyncio.AbstractEventLoop, Client] = {}


async def active_client() -> Client:
    """The client of the innermost `async with Client()`, else a default one from the
    environment, created on first use and kept for the event loop."""
    client = _active.get()
    if client is not None:
        return client
    loop = asyncio.get_running_loop()
    for other in [lp for lp in _default if lp is not loop and lp.is_closed()]:
        del _default[other]
    client = _default.get(loop)
    if client is None:
        client = _default[loop] = Client()
    return client
