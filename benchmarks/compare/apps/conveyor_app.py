"""conveyor: `python -m conveyor worker benchmarks.compare.apps.conveyor_app`.

conveyor always keeps the run's state and result in Redis; there is no backend to switch.
"""

from __future__ import annotations

from conveyor import step, task

from ..stamps import CHAIN_FIRST, CHAIN_LAST, record


@task(id="cmp-noop")
async def noop(tag: float) -> None:
    record(tag)


@step(name="first")
async def first() -> None:
    record(CHAIN_FIRST)


@step(name="second")
async def second() -> None:
    pass


@step(name="third")
async def third() -> None:
    record(CHAIN_LAST)


@task(id="cmp-chain")
async def chain() -> None:
    """Three checkpointed steps: a retry would resume after the last one that finished."""
    await first()
    await second()
    await third()
