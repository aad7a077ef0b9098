"""A research agent: an orchestrator that runs its tool calls as child runs in parallel,
sleeps between rounds, and waits for a person's approval, holding no worker meanwhile.

`python examples/research_agent.py` starts a worker in this process, in a namespace of its
own, and asks the agent one question. The "model" is a deterministic fake (no network):
it plans two rounds of searches, and the search tool fails on its first call for one
query (a flaky API), which the child run's retry absorbs. The agent then asks for an
approval token, which this script completes through the CLI
(`conveyor tokens complete TOKEN_ID --data '{"approved": true}'`), as a reviewer would,
and prints the run tree (`conveyor runs tree RUN_ID`).

`conveyor worker examples.research_agent` runs the same tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys

import msgspec
import uvloop

from conveyor import (
    Client,
    Retry,
    Settings,
    create_token,
    current_run,
    sleep,
    step,
    task,
    wait_for_token,
)

ROUNDS = 2
PAUSE = 1.0  # seconds between rounds (the search API asks for politeness)
# The query whose first search call fails, to show a child run's retry.
FLAKY = "history of conveyor belts"


@step()
async def plan(question: str) -> list[list[str]]:
    """The fake model's plan: a few searches per round, derived from the question."""
    topic = question.rstrip("?").removeprefix("How did ").removesuffix(" evolve")
    return [
        [f"history of {topic}", f"{topic} in factories", f"{topic} patents"],
        [f"{topic} today", f"future of {topic}"],
    ]


@task(id="search-web", retry=Retry(max_attempts=3, min_delay=0.2, jitter=False))
async def search_web(query: str) -> list[str]:
    if query == FLAKY and current_run().attempt == 1:
        raise ConnectionError("search API timed out")
    await asyncio.sleep(0.05)
    return [f"{query}: finding {i}" for i in (1, 2)]


@task(id="summarize", retry=Retry(max_attempts=2))
async def summarize(findings: list[str]) -> str:
    return f"{len(findings)} findings; first: {findings[0]}"


@step()
async def ask_for_approval(token_id: str, draft: str) -> None:
    """Where a real agent would post to a review queue; here it prints the token."""
    print(f"agent: draft ready ({draft}); approve with token {token_id}", flush=True)


@task(id="research-agent", retry=Retry(max_attempts=2))
async def research_agent(question: str) -> dict[str, object]:
    rounds = await plan(question)
    findings: list[str] = []
    for n, queries in enumerate(rounds[:ROUNDS]):
        results = await search_web.batch_trigger_and_wait([{"query": q} for q in queries])
        findings += [f for r in results if r.ok and r.value for f in r.value]
        if n + 1 < ROUNDS:
            await sleep(PAUSE)
    draft = await summarize.trigger_and_wait(findings=findings)
    token = await create_token(timeout=600)
    await ask_for_approval(token.id, draft)
    approval = await wait_for_token(token)
    return {"draft": draft, "approval": approval}


async def _cli(settings: Settings, *args: str) -> str:
    env = {**os.environ, "CONVEYOR_NAMESPACE": settings.namespace}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"conveyor {' '.join(args)} failed: {err.decode()}")
    return out.decode().strip()


async def demo(settings: Settings) -> bool:
    from conveyor.worker import Worker

    tasks = [research_agent, search_web, summarize]
    async with Client(settings=settings) as client, Worker(tasks, settings=settings):
        handle = await research_agent.trigger(question="How did conveyor belts evolve?")
        print(f"research agent: run {handle.id} in namespace {settings.namespace!r}")

        async def token_id() -> str:
            while True:
                run = await client.get_run(handle.id)
                if run.status.value == "WAITING" and "create_token#0" in run.steps:
                    token = await client.store.redis.hget(
                        client.store.keys.steps(handle.id), "create_token#0"
                    )
                    assert token is not None
                    return str(msgspec.json.decode(token)["id"])
                await asyncio.sleep(0.1)

        waiting_for = await asyncio.wait_for(token_id(), timeout=60)
        print(
            await _cli(settings, "tokens", "complete", waiting_for, "--data", '{"approved": true}')
        )
        result = await handle.result(timeout=60)
        print(f"result: {result}")
        print(await _cli(settings, "runs", "tree", handle.id))
        run = await client.get_run(handle.id)
        searches = [await client.get_run(c) for c in run.children]
    statuses = [a.status for a in run.attempts]
    print(f"attempts of the agent: {', '.join(statuses)}")
    for search in searches:
        if len(search.attempts) > 1:
            tried = ", ".join(
                f"{a.status} ({a.error})" if a.error else a.status for a in search.attempts
            )
            print(f"retried tool call {search.payload}: {tried}")
    return result.get("approval") == {"approved": True}


async def main() -> int:
    from conveyor.broker.purge import purge_namespace

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    settings = Settings.from_env(namespace=f"agent-{secrets.token_hex(4)}")
    try:
        ok = await demo(settings)
    finally:
        queues = [research_agent.queue, search_web.queue, summarize.queue]
        await purge_namespace(settings, queues)
    print(f"namespace {settings.namespace!r} removed from RabbitMQ and Redis")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
