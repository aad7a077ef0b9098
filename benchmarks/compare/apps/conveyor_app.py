"""conveyor: `python -m conveyor worker benchmarks.compare.apps.conveyor_app`.

conveyor always keeps the run's state and result in Redis; there is no backend to switch.
The fan-out parent waits with `batch_trigger_and_wait`: its first attempt records the
children and is suspended (it holds no slot while they run), the last child's end resumes
it, and the new attempt replays from the top, the start step returning its checkpoint.
"""

from __future__ import annotations

from conveyor import step, task

from ..stamps import CHAIN_FIRST, CHAIN_LAST, FANOUT_CHILD, FANOUT_START, record, record_collected


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


@task(id="cmp-fanout-child")
async def fanout_child(i: int) -> int:
    record(FANOUT_CHILD)
    return i


@step(name="fanout-start")
async def fanout_start() -> None:
    """A step, so that the replay after the wait does not stamp a second start."""
    record(FANOUT_START)


@task(id="cmp-fanout")
async def fanout(count: int) -> None:
    await fanout_start()
    results = await fanout_child.batch_trigger_and_wait([{"i": i} for i in range(count)])
    record_collected([r.value if r.ok else r.error for r in results], count)
