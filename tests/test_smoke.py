from conveyor import Client
from conveyor.worker import Worker
from tests import tasks


async def test_echo_roundtrip(client: Client, worker: Worker) -> None:
    handle = await tasks.echo.trigger("ab", times=2)
    assert await handle.result(timeout=10) == "abab"
