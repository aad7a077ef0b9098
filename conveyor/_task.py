"""@task: an async function that runs durably, and the registry workers load tasks from."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import msgspec

from conveyor.shared.bounds import ttl_ms
from conveyor.shared.context import current_context
from conveyor.shared.cron import Cron
from conveyor.shared.errors import InvalidArguments, InvalidOption, RunFailed, TaskDefinitionError
from conveyor.shared.limits import Concurrency, RateLimit, declare
from conveyor.shared.names import check_name
from conveyor.shared.retry import DEFAULT_RETRY, Retry

from ._waits import Result, wait_for_child, wait_for_children

if TYPE_CHECKING:
    from ._client import RunHandle

P = ParamSpec("P")
R = TypeVar("R")

_registry: dict[str, Task[Any, Any]] = {}


def registered_tasks() -> dict[str, Task[Any, Any]]:
    """Every task defined so far in this process, by id."""
    return dict(_registry)


class TriggerOptions(msgspec.Struct, frozen=True, kw_only=True):
    idempotency_key: str | None = None
    delay: float | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    concurrency_key: str | None = None
    # Seconds the run may wait to start, after its delay; then it ends EXPIRED.
    ttl: float | None = None


class Task(Generic[P, R]):
    """A durable task. Trigger it; a worker that imported it runs it."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        id: str,
        queue: str | None,
        retry: Retry,
        max_duration: float | None,
        cron: Sequence[Cron] = (),
        rate_limit: str | RateLimit | None = None,
        concurrency_limit: int | Concurrency | None = None,
        ttl: float | timedelta | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TaskDefinitionError(f"task {id!r}: {fn.__qualname__} must be an async function")
        if max_duration is not None and max_duration <= 0:
            raise TaskDefinitionError(f"task {id!r}: max_duration must be positive")
        ms, problem = ttl_ms(ttl)
        if problem is not None:
            raise TaskDefinitionError(f"task {id!r}: ttl {problem}")
        try:
            check_name("task id", id)
            check_name("queue", queue or id)
        except Exception as exc:
            raise TaskDefinitionError(str(exc)) from exc
        self.fn = fn
        self.id = id
        self.queue = queue or id
        self.retry = retry
        self.max_duration = max_duration
        self.rate_limit = _rate_limit(id, rate_limit)
        self.concurrency = _concurrency(id, concurrency_limit)
        # The runs' default ttl, in seconds; a trigger's options(ttl=...) overrides it.
        self.ttl = None if ms is None else ms / 1000
        self._signature = inspect.signature(fn)
        hints = _hints(fn)
        self._args_decoder = msgspec.json.Decoder(_args_struct(id, self._signature, hints))
        self.result_type: Any = hints.get("return", Any)
        self._result_decoder: msgspec.json.Decoder[R] = msgspec.json.Decoder(self.result_type)
        self._plain = BoundTask(self, TriggerOptions(ttl=self.ttl))
        # Its schedules, registered by `conveyor scheduler` (scheduler/declared.py).
        self.cron = list(cron)
        for c in self.cron:
            try:
                self.encode_arguments((), c.payload)
                self.decode_arguments(msgspec.json.encode(c.payload))
            except InvalidArguments as exc:
                raise TaskDefinitionError(f"task {id!r}: the payload of {c!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"Task({self.id!r}, queue={self.queue!r})"

    # -- triggering ---------------------------------------------------------------------

    async def trigger(self, *args: P.args, **kwargs: P.kwargs) -> RunHandle[R]:
        """Start a run; returns once RabbitMQ has confirmed the message."""
        return await self._plain.trigger(*args, **kwargs)

    def options(
        self,
        *,
        idempotency_key: str | None = None,
        delay: float | None = None,
        tags: Sequence[str] | None = None,
        concurrency_key: str | None = None,
        ttl: float | timedelta | None = None,
    ) -> BoundTask[P, R]:
        """`concurrency_key` puts the runs under the per-key limit of the task's
        Concurrency(per_key=...): a tenant, a user, an account. `ttl` (seconds or a
        timedelta; None: the task's): a run not started that long after its delay ends
        EXPIRED instead."""
        ms, problem = ttl_ms(ttl)
        if problem is not None:
            raise InvalidOption("ttl", problem)
        return BoundTask(
            self,
            TriggerOptions(
                idempotency_key=idempotency_key,
                delay=delay,
                tags=list(tags or []),
                concurrency_key=concurrency_key,
                ttl=self.ttl if ms is None else ms / 1000,
            ),
        )

    async def batch_trigger(self, items: Iterable[Mapping[str, Any]]) -> list[RunHandle[R]]:
        """Start one run per mapping of keyword arguments, published as one confirmed batch."""
        return await self._plain.batch_trigger(items)

    def trigger_and_wait(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        """Run this task as a child of the current run and return its result (RunFailed
        if it fails). The parent holds no worker slot while it waits. Outside a run: a
        trigger, then the handle's result()."""
        return self._plain.trigger_and_wait(*args, **kwargs)

    def batch_trigger_and_wait(
        self, items: Iterable[Mapping[str, Any]]
    ) -> Awaitable[list[Result[R]]]:
        """One child run per mapping of keyword arguments; their results in input order."""
        return self._plain.batch_trigger_and_wait(items)

    # -- encoding -----------------------------------------------------------------------

    def encode_arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(self.id, str(exc)) from exc
        try:
            return msgspec.json.encode(bound.arguments)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            bad = [name for name, value in bound.arguments.items() if not _encodable(value)]
            where = f" (argument {', '.join(map(repr, bad))})" if bad else ""
            raise InvalidArguments(self.id, f"{exc}{where}") from exc

    def decode_arguments(self, payload: bytes) -> dict[str, Any]:
        try:
            values = self._args_decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise InvalidArguments(self.id, str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise InvalidArguments(self.id, f"payload is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # msgspec decodes nesting within the recursion limit
            raise InvalidArguments(self.id, "payload is nested too deeply") from exc
        return {name: getattr(values, name) for name in values.__struct_fields__}

    def decode_result(self, raw: bytes) -> R:
        return self._result_decoder.decode(raw)


class BoundTask(Generic[P, R]):
    """A task with trigger options applied: `task.options(...).trigger(...)`."""

    def __init__(self, task: Task[P, R], options: TriggerOptions) -> None:
        self.task = task
        self.opts = options

    async def trigger(self, *args: P.args, **kwargs: P.kwargs) -> RunHandle[R]:
        from ._client import active_client

        payload = self.task.encode_arguments(args, kwargs)
        client = await active_client()
        [handle] = await client.trigger_task(self.task, [payload], self.opts)
        return handle

    async def batch_trigger(self, items: Iterable[Mapping[str, Any]]) -> list[RunHandle[R]]:
        from ._client import active_client

        payloads = [self.task.encode_arguments((), item) for item in items]
        client = await active_client()
        return await client.trigger_task(self.task, payloads, self.opts)

    def trigger_and_wait(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        # The step key is taken now, not when awaited: calls gathered together get the
        # same keys on every replay.
        payload = self.task.encode_arguments(args, kwargs)
        ctx = current_context()
        if ctx is None:
            return self._trigger_then_result(payload)
        key = ctx.step_key(f"trigger_and_wait:{self.task.id}")
        return wait_for_child(ctx, self.task, key, payload, self.opts)

    def batch_trigger_and_wait(
        self, items: Iterable[Mapping[str, Any]]
    ) -> Awaitable[list[Result[R]]]:
        payloads = [self.task.encode_arguments((), item) for item in items]
        ctx = current_context()
        if ctx is None:
            return self._batch_then_results(payloads)
        key = ctx.step_key(f"batch_trigger_and_wait:{self.task.id}")
        return wait_for_children(ctx, self.task, key, payloads, self.opts)

    async def _trigger_then_result(self, payload: bytes) -> R:
        from ._client import active_client

        client = await active_client()
        [handle] = await client.trigger_task(self.task, [payload], self.opts)
        return await handle.result()

    async def _batch_then_results(self, payloads: list[bytes]) -> list[Result[R]]:
        from ._client import active_client

        client = await active_client()
        handles = await client.trigger_task(self.task, payloads, self.opts)
        results: list[Result[R]] = []
        for handle in handles:
            try:
                results.append(Result(True, await handle.result()))
            except RunFailed as exc:
                results.append(Result(False, status=exc.status, error=exc.error))
        return results


def task(
    *,
    id: str,
    queue: str | None = None,
    retry: Retry | None = None,
    max_duration: float | None = None,
    cron: str | Cron | Sequence[str | Cron] | None = None,
    every: timedelta | None = None,
    rate_limit: str | RateLimit | None = None,
    concurrency_limit: int | Concurrency | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Task[P, R]]:
    """Declare an async function as a durable task with a stable id.

    `queue` defaults to the id; `retry` to Retry(); `max_duration` (seconds) ends an
    attempt that runs longer as TIMED_OUT. `cron` (an expression, a Cron or a list of
    them) and `every` (an interval) schedule runs, fired by `conveyor scheduler`; a bad
    expression or time zone raises InvalidSchedule here. `rate_limit` ('10/s' or a
    RateLimit) and `concurrency_limit` (a number or a Concurrency) hold across all
    workers; a RateLimit or Concurrency with a name is shared by the tasks that use it.
    `ttl` (seconds or a timedelta) ends a run that no worker started that long after
    its delay as EXPIRED."""
    schedules = _schedules(cron, every)

    def decorate(fn: Callable[P, Awaitable[R]]) -> Task[P, R]:
        defined = Task(
            fn,
            id=id,
            queue=queue,
            retry=retry or DEFAULT_RETRY,
            max_duration=max_duration,
            cron=schedules,
            rate_limit=rate_limit,
            concurrency_limit=concurrency_limit,
            ttl=ttl,
        )
        existing = _registry.get(id)
        if existing is not None and (
            existing.fn.__module__.split(".")[-1],
            existing.fn.__qualname__,
        ) != (fn.__module__.split(".")[-1], fn.__qualname__):
            raise TaskDefinitionError(
                f"task id {id!r} is already used by {existing.fn.__module__}."
                f"{existing.fn.__qualname__}; task ids must be unique"
            )
        _registry[id] = defined
        return defined

    return decorate


def _schedules(
    cron: str | Cron | Sequence[str | Cron] | None, every: timedelta | None
) -> list[Cron]:
    items: list[str | Cron] = (
        [] if cron is None else [cron] if isinstance(cron, str | Cron) else list(cron)
    )
    out = [c if isinstance(c, Cron) else Cron(c) for c in items]
    if every is not None:
        out.append(Cron(every=every))
    return out


def _rate_limit(task_id: str, limit: str | RateLimit | None) -> RateLimit | None:
    if limit is None:
        return None
    if isinstance(limit, str):
        limit = RateLimit.parse(limit)
    elif not isinstance(limit, RateLimit):
        raise TaskDefinitionError(
            f"task {task_id!r}: rate_limit must be a string such as '10/s' or a RateLimit, "
            f"got {limit!r}"
        )
    if limit.name is not None:
        declare(task_id, limit)
    return limit.named(f"task:{task_id}")


def _concurrency(task_id: str, limit: int | Concurrency | None) -> Concurrency | None:
    if limit is None:
        return None
    if not isinstance(limit, Concurrency):
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TaskDefinitionError(
                f"task {task_id!r}: concurrency_limit must be a number or a Concurrency, "
                f"got {limit!r}"
            )
        limit = Concurrency(limit)
    if limit.name is not None:
        declare(task_id, limit)
    return limit.named(f"task:{task_id}")


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception as exc:
        raise TaskDefinitionError(
            f"cannot resolve the annotations of {fn.__qualname__}: {exc}"
        ) from exc


def _args_struct(
    task_id: str, sig: inspect.Signature, hints: dict[str, Any]
) -> type[msgspec.Struct]:
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for param in sig.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TaskDefinitionError(
                f"task {task_id!r}: *args and **kwargs parameters are not supported; "
                "name each argument so it can be validated"
            )
        annotation = hints.get(param.name, Any)
        if param.default is param.empty:
            fields.append((param.name, annotation))
        else:
            fields.append((param.name, annotation, param.default))
    return msgspec.defstruct(
        f"Arguments[{task_id}]", fields, kw_only=True, forbid_unknown_fields=True
    )


def _encodable(value: Any) -> bool:
    try:
        msgspec.json.encode(value)
    except Exception:
        return False
    return True
