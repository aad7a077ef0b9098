"""Tasks whose spans tests/test_tracing.py checks (in the test process and in
`conveyor worker tests.tracing_tasks`)."""

from __future__ import annotations

from conveyor import Retry, current_run, step, task


@step(name="fetch")
async def fetch(n: int) -> int:
    return n + 1


@step(name="transform")
async def transform(n: int) -> int:
    return n * 2


@step(name="store")
async def store(n: int) -> int:
    return n


@task(id="traced-steps", retry=Retry(max_attempts=3, min_delay=0.05, jitter=False))
async def traced_steps(n: int = 1, fail_first: bool = False) -> int:
    """Three steps; with `fail_first`, the first attempt fails after the first two."""
    a = await fetch(n)
    b = await transform(a)
    if fail_first and current_run().attempt == 1:
        raise RuntimeError("the first attempt fails after two steps")
    return await store(b)


@task(id="traced-child")
async def traced_child(n: int) -> int:
    return await fetch(n)


@task(id="traced-parent")
async def traced_parent(n: int) -> int:
    child = await traced_child.trigger_and_wait(n=n)
    return await store(child)


ALL = [traced_steps, traced_child, traced_parent]
