from conveyor import Client, RunStatus
from conveyor.shared.redis_client import redis_client
from conveyor.worker import Worker
from tests import tasks


async def test_echo_roundtrip(client: Client, worker: Worker) -> None:
    handle = await tasks.echo.trigger("ab", times=2)
    assert await handle.result(timeout=10) == "abab"


async def test_typed_steps_replay(client: Client, worker: Worker) -> None:
    handle = await tasks.typed_steps.trigger()
    assert await handle.result(timeout=15) == {"point": "3,6", "box": "b", "bytes": "00010203"}
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.COMPLETED
    assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"]
    r = redis_client(client.settings)
    trace = [t.decode() for t in await r.lrange(tasks.trace_key(handle.id), 0, -1)]
    await r.aclose()
    assert trace == ["make_point@1", "make_box@1", "make_bytes@1"]
