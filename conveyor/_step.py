"""@step and run_step: calls whose results are checkpointed in the run."""

from __future__ import annotations

import functools
import typing
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from conveyor.shared.context import current_context
from conveyor.shared.retry import Retry

P = ParamSpec("P")
R = TypeVar("R")


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(fn).get("return", Any)
    except Exception:  # unresolved forward references: decode as plain JSON
        return Any


def step(
    name: str | None = None, *, retry: Retry | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Checkpoint the decorated coroutine function's result in the run.

    A later attempt of the same run returns the saved result, decoded to the annotated
    return type, instead of calling the function again. Outside a run it is a plain call.
    `retry` retries the step in process before the failure reaches the task.
    """

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        step_name = name or fn.__qualname__
        result_type = _return_type(fn)

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
            ctx = current_context()
            if ctx is None:
                return fn(*args, **kwargs)
            key = ctx.step_key(step_name)
            coro: Awaitable[R] = ctx.run_step(key, result_type, retry, fn, args, kwargs)
            return coro

        return call

    return decorate


@overload
def run_step(
    name: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
) -> Awaitable[R]: ...
@overload
def run_step(
    name: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
) -> Awaitable[R]: ...
def run_step(
    name: str, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs
) -> Awaitable[Any]:
    """Run any callable (sync or async) as a checkpointed step named `name`."""
    ctx = current_context()
    if ctx is None:
        return _plain(fn, args, kwargs)
    key = ctx.step_key(name)
    coro: Awaitable[Any] = ctx.run_step(key, _return_type(fn), None, fn, args, kwargs)
    return coro


async def _plain(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    if isinstance(result, Awaitable):
        return await result
    return result
