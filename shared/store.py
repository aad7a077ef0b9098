"""The run state store: every read and write of run state in Redis.

Writes that must be atomic are Lua scripts (see lua/); each call here is one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, cast

import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from . import tracing
from .availability import Gate
from .batcher import Arg, Command, CommandBatcher
from .cluster_create import create_in_cluster
from .errors import InvalidListing, RunLost
from .keys import Keys
from .models import Attempt, AttemptInfo, Run, RunMessage, RunPage, RunStatus
from .redis_client import Redis, hot_path_client
from .runs_index import IndexReader, encode_cursor, index_write
from .scripts import Scripts
from .settings import Settings

# Runs per create.lua call: Redis runs nothing else while a script runs, so a big batch
# is cut into calls of a few milliseconds each (they still share one round trip).
CREATE_CHUNK = 200

_attempt_decoder = msgspec.json.Decoder(Attempt)
_tags_decoder = msgspec.json.Decoder(list[str])
_any_decoder = msgspec.json.Decoder()


def _ms(value: bytes | None) -> datetime | None:
    if value is None or value in (b"", b"0"):
        return None
    return datetime.fromtimestamp(int(float(value)) / 1000, tz=UTC)


# gc=False: made per trigger and never part of a cycle, so the garbage collector (a
# quarter of a trigger's client time under load) need not track them.
class NewRun(msgspec.Struct, frozen=True, gc=False):
    run_id: str
    task_id: str
    queue: str
    payload: bytes
    tags: list[str]
    idempotency_key: str | None
    delay_ms: int
    # A child run: the run that triggered it, the step of the parent waiting for it (None
    # for a child that is not waited for) and the root of the tree.
    parent: str | None = None
    parent_step: str | None = None
    root: str | None = None
    # Epoch ms of the cron tick that makes the run (0: none), see scheduler/cron.py.
    scheduled_at: int = 0
    concurrency_key: str = ""
    # How long after its delay the run may wait to start (0: for ever), else EXPIRED;
    # counted from `ttl_from_ms` (epoch ms) instead when set (a wire message's not_before).
    ttl_ms: int = 0
    ttl_from_ms: int = 0
    # The trigger's trace context (shared/tracing.py pack), kept for the messages rebuilt
    # from the run.
    trace: str = ""


class Created(msgspec.Struct, frozen=True, gc=False):
    run_id: str
    created: bool
    # False when the run was there already (created by a worker that got its message
    # first, or by an earlier try of a replayed step).
    new: bool = True


class Lineage(msgspec.Struct, frozen=True, gc=False):
    """Where a child run sits in its tree: the run that triggered it, the parent's step
    that waits for it ('' when none waits) and the root run."""

    parent: str
    parent_step: str
    root: str


class Expired(msgspec.Struct, frozen=True, gc=False):
    """A run expire.lua ended: its parent ('' for none), the parent's step that waits
    for it ('' when none waits) and the error it ended with."""

    parent: str
    parent_step: str
    error: str


class Claim(msgspec.Struct, frozen=True):
    kind: Literal["run", "drop", "busy", "early", "crashed", "missing", "alone", "tokens"]
    attempt: int = 0
    failures: int = 0
    crashes: int = 0
    checkpoints: dict[str, bytes] = msgspec.field(default_factory=dict)
    wait_ms: int = 0
    detail: str = ""
    lineage: Lineage | None = None
    # A dropped child run's end, for its parent (claim.lua 'drop'): output and error.
    output: bytes = b""
    error: str = ""
    # 'tokens': (step key, token id) of the waits on tokens past their timeout.
    tokens: list[tuple[str, str]] = msgspec.field(default_factory=list)


class WaitRequest(msgspec.Struct, frozen=True, gc=False):
    """A waitpoint to record (wait.lua): its step key, kind ('child' or 'sleep'), what it
    refers to (a child run id), and when a timer ends: at `until_ms`, or `delay_ms` from
    the first time it is recorded (-1: not relative)."""

    key: str
    kind: str
    ref: str = ""
    until_ms: int = 0
    delay_ms: int = -1


class WaitState(msgspec.Struct, frozen=True, gc=False):
    """A waitpoint as wait.lua found it: over (`result` saved) or pending until `timer_ms`."""

    result: bytes | None
    timer_ms: int = 0


class Suspended(msgspec.Struct, frozen=True, gc=False):
    """suspend.lua's answer: 'waiting' (until the earliest timer, 0: none), 'resume' (all
    it waited for is done: run again now) or 'stale' (the attempt lost the run)."""

    kind: Literal["waiting", "resume", "stale"]
    timer_ms: int = 0
    now_ms: int = 0


class Woken(msgspec.Struct, frozen=True, gc=False):
    """A run that resolve.lua made QUEUED again: what its message is rebuilt from."""

    task: str
    queue: str
    payload: bytes
    tags: list[str]
    scheduled_at: int | None = None
    concurrency_key: str | None = None
    trace: bytes = b""  # the trigger's trace context
    last_attempt: bytes = b""  # the traceparent of the attempt that suspended


class Finish(msgspec.Struct, frozen=True):
    kind: Literal["ok", "terminal", "stale"]
    status: str = ""
    at_ms: int = 0


class RunState(msgspec.Struct, frozen=True, gc=False):
    """Where a run stands, as the reaper and a republish judge it."""

    status: RunStatus
    attempt: int
    not_before: int
    lease_until: int
    # Parked by a concurrency limit (or deferred by a rate limit): the limit wakes it.
    throttled: bool = False
    # Epoch ms by which it must have started (0: no ttl); whether a parent's step waits
    # for it.
    expires_at: int = 0
    waited_for: bool = False

    def expired(self, now_ms: int) -> bool:
        """Never started and past its ttl at `now_ms` (the test of expire.lua)."""
        return (
            self.status in (RunStatus.QUEUED, RunStatus.DELAYED)
            and self.attempt == 0
            and 0 < self.expires_at <= now_ms
        )


class Republish(msgspec.Struct, frozen=True):
    """A run's message rebuilt from its hash, for the queue it belongs to."""

    queue: str
    message: RunMessage
    headers: dict[str, str] | None = None  # the trigger's trace context


class StatusView(msgspec.Struct, frozen=True):
    status: RunStatus
    output: bytes | None
    error: str | None


class RunStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.batcher = CommandBatcher(hot_path_client(settings), timeout=settings.redis_timeout)
        self.cluster = isinstance(self.batcher.client, RedisCluster)
        self.scripts = Scripts(
            self.batcher,
            [
                "create",
                "claim",
                "checkpoint",
                "finish",
                "heartbeat",
                "cancel",
                "abandon",
                "release",
                "expire",
                "wait",
                "suspend",
                "resolve",
                "token_create",
                "token_wait",
                "token_complete",
                "idem_claim",
            ],
        )
        # Set by a worker: claim, checkpoint and finish then wait there while Redis is
        # unavailable and are sent again (each is idempotent for its caller) instead of
        # failing the message.
        self.gate: Gate | None = None
        self._lease_ms = int(settings.lease_ttl * 1000)
        self._run_ttl = str(int(settings.run_ttl))
        self._claim_head = self.scripts.head("claim", 4)
        self._checkpoint_head = self.scripts.head("checkpoint", 2)
        self._finish_head = self.scripts.head("finish", 4)
        # claim's arguments are the same for every run a worker claims, but for the claim
        # token at the end.
        self._claim_tails: dict[tuple[str, bool], Command] = {}
        self._idem_ttl = str(int(settings.idempotency_ttl * 1000))
        self._creating: list[tuple[Sequence[NewRun], asyncio.Future[list[Created]]]] = []
        self._create_tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._create_tasks:
            await asyncio.wait(list(self._create_tasks))
        await self.batcher.close()

    # -- triggering ---------------------------------------------------------------------

    def create(self, runs: Sequence[NewRun]) -> asyncio.Future[list[Created]]:
        """Create runs; an idempotency key that exists returns its run. The runs of every
        call made in one turn of the event loop are created together: one script call
        per task (and tags and delay), in one round trip."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Created]] = loop.create_future()
        self._creating.append((runs, future))
        if len(self._creating) == 1:
            loop.call_soon(self._create_pending)
        return future

    def _create_pending(self) -> None:
        batch, self._creating = self._creating, []
        task = asyncio.get_running_loop().create_task(self._create(batch))
        self._create_tasks.add(task)
        task.add_done_callback(self._create_tasks.discard)

    async def _create(
        self, batch: list[tuple[Sequence[NewRun], asyncio.Future[list[Created]]]]
    ) -> None:
        runs = [run for wanted, _ in batch for run in wanted]
        # One create.lua call per task, queue, tags, delay, parent, cron tick, concurrency
        # key, ttl and trace.
        Group = tuple[str, str, tuple[str, ...], int, str | None, int, str, int, int, str]
        groups: dict[Group, list[int]] = {}
        for i, run in enumerate(runs):
            tags = tuple(run.tags)
            group = (
                run.task_id,
                run.queue,
                tags,
                run.delay_ms,
                run.parent,
                run.scheduled_at,
                run.concurrency_key,
                run.ttl_ms,
                run.ttl_from_ms,
                run.trace,
            )
            groups.setdefault(group, []).append(i)
        size = 1 if self.cluster else CREATE_CHUNK  # on a cluster each run has its slot
        chunks = [
            positions[start : start + size]
            for positions in groups.values()
            for start in range(0, len(positions), size)
        ]
        try:
            replies = await asyncio.gather(
                *(self._create_chunk([runs[i] for i in chunk]) for chunk in chunks),
                return_exceptions=True,
            )
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        results: list[Created | BaseException] = [Created("", False)] * len(runs)
        for chunk, reply in zip(chunks, replies, strict=True):
            for n, i in enumerate(chunk):
                results[i] = (
                    reply
                    if isinstance(reply, BaseException)
                    else Created(reply[2 * n + 1].decode(), reply[2 * n] != 0, reply[2 * n] == 1)
                )
        start = 0
        for wanted, future in batch:
            mine = results[start : start + len(wanted)]
            start += len(wanted)
            if future.done():
                continue
            failed = [r for r in mine if isinstance(r, BaseException)]
            if failed:
                future.set_exception(failed[0])
            else:
                future.set_result(cast(list[Created], mine))

    async def _create_chunk(self, runs: Sequence[NewRun]) -> Any:
        """One create.lua call for runs of the same task, queue, tags, delay, parent, tick,
        ttl and trace."""
        first = runs[0]
        head: list[Arg] = [
            first.task_id,
            first.queue,
            msgspec.json.encode(first.tags),
            first.delay_ms,
            self._idem_ttl,
            first.parent or "",
            first.root or "",
            first.scheduled_at,
            first.concurrency_key,
            first.ttl_ms,
            first.ttl_from_ms,
            first.trace,
        ]
        if self.cluster:
            per_run: list[Arg] = [
                first.payload,
                first.idempotency_key or "",
                first.parent_step or "",
            ]
            return await create_in_cluster(
                self.scripts,
                self.batcher,
                self.keys,
                self.settings,
                head,
                first.run_id,
                first.task_id,
                first.delay_ms,
                per_run,
            )
        index = index_write(self.keys, self.settings, first.task_id)
        keys = [index.bucket, index.task_bucket, self.keys.due]
        args = [*head, index.expires_ms, ""]
        for run in runs:
            run_key = self.keys.run(run.run_id)
            idem = run.idempotency_key or ""
            keys += (run_key, self.keys.idempotency(run.task_id, idem) if idem else run_key)
            args += (run.run_id, run.payload, idem, run.parent_step or "")
        return await self.scripts.call("create", keys, args)

    async def abandon(self, runs: Sequence[NewRun], error: str) -> list[bool]:
        """Mark runs whose message never reached the broker FAILED, if they never started
        (abandon.lua), and free their idempotency keys; True for each run failed."""
        run_ttl = self._run_ttl
        done = await asyncio.gather(
            *(
                self.scripts.call("abandon", [self.keys.run(r.run_id)], [error, run_ttl])
                for r in runs
            )
        )
        await asyncio.gather(
            *(
                self.scripts.call(
                    "release", [self.keys.idempotency(r.task_id, r.idempotency_key)], [r.run_id]
                )
                for r, failed in zip(runs, done, strict=True)
                if failed and r.idempotency_key
            )
        )
        return [bool(failed) for failed in done]

    # -- executing ----------------------------------------------------------------------

    async def claim(self, run_id: str, worker: str, token: str, *, alone: bool = False) -> Claim:
        """`token`: unique per delivery in the worker, so that the claim sent again after
        a lost reply is answered as the first time. `alone`: nothing else runs in the
        worker, as a run's last chance needs (claim.lua)."""
        tail = self._claim_tails.get((worker, alone))
        if tail is None:
            tail = (worker, self._lease_ms, self.settings.max_crashes, self._run_ttl, int(alone))
            self._claim_tails[worker, alone] = tail
        command = (*self._claim_head, *self.keys.four(run_id), *tail, token)
        reply = await self._hot("claim", command)
        kind = reply[0].decode()
        if kind == "run":
            flat = reply[7:]
            checkpoints = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
            lineage = None
            if reply[4]:
                lineage = Lineage(reply[4].decode(), reply[5].decode(), reply[6].decode())
            return Claim(
                "run", int(reply[1]), int(reply[2]), int(reply[3]), checkpoints, lineage=lineage
            )
        if kind == "drop" and len(reply) > 2:
            lineage = Lineage(reply[2].decode(), reply[3].decode(), "")
            return Claim(
                "drop",
                detail=reply[1].decode(),
                lineage=lineage,
                output=reply[4],
                error=reply[5].decode(),
            )
        if kind in ("busy", "early"):
            return Claim(kind, wait_ms=int(reply[1]))
        if kind == "tokens":
            pairs = [(reply[i].decode(), reply[i + 1].decode()) for i in range(1, len(reply), 2)]
            return Claim("tokens", tokens=pairs)
        if kind == "missing":
            return Claim("missing")
        if kind == "alone":
            return Claim("alone", crashes=int(reply[1]))
        return Claim(kind, detail=reply[1].decode())

    async def checkpoint(
        self, run_id: str, worker: str, attempt: int, step_key: str, value: bytes
    ) -> bytes:
        """Save a step's result if this worker's attempt still holds the run; returns the
        result that stands (a result saved first under the key wins). Raises RunLost when
        the run was taken over or ended: nothing is written then."""
        command = (
            *self._checkpoint_head,
            self.keys.run(run_id),
            self.keys.steps(run_id),
            worker,
            attempt,
            step_key,
            value,
        )
        reply = await self._hot("checkpoint", command)
        kind = reply[0]
        if kind == b"ok":
            return value
        if kind == b"saved":
            saved: bytes = reply[1]
            return saved
        raise RunLost(run_id, reply[1].decode())

    async def finish(
        self,
        run_id: str,
        worker: str,
        attempt: int,
        *,
        run_status: RunStatus,
        attempt_status: str,
        output: bytes = b"",
        error: str = "",
        traceback: str = "",
        retry_delay_ms: int = 0,
    ) -> Finish:
        command = (
            *self._finish_head,
            *self.keys.four(run_id),
            worker,
            attempt,
            run_status.value,
            attempt_status,
            output,
            error,
            traceback,
            self._run_ttl,
            retry_delay_ms,
        )
        reply = await self._hot("finish", command)
        kind = reply[0].decode()
        if kind == "ok":
            return Finish("ok", at_ms=int(reply[1]))
        return Finish(kind, status=reply[1].decode())

    async def _send(self, name: str, command: Command) -> Any:
        reply = await self.batcher.call(*command)
        if isinstance(reply, ResponseError):
            reply = await self.scripts.retry(name, command, reply)
        return reply

    async def _hot(self, name: str, command: Command) -> Any:
        """A hot-path script call. While Redis is unavailable it waits at the gate (when
        one is set) and is sent again: its script gives a repeated call the same answer.
        The common case (gate open, a good reply) awaits the batcher here, with no layer."""
        gate = self.gate
        if gate is not None and not gate.is_open:
            return await gate.call(lambda: self._send(name, command))
        try:
            reply = await self.batcher.call(*command)
            if isinstance(reply, ResponseError):
                reply = await self.scripts.retry(name, command, reply)
            return reply
        except Exception as exc:
            if gate is None or not gate.unavailable(exc):
                raise
            gate.close(exc)
            return await gate.call(lambda: self._send(name, command))

    # -- waiting ------------------------------------------------------------------------

    async def wait(
        self, run_id: str, worker: str, attempt: int, waits: Sequence[WaitRequest]
    ) -> list[WaitState]:
        """Record waitpoints of this worker's attempt (wait.lua): for each, its saved
        result if it is over, else when its timer ends (0: no timer). Raises RunLost when
        the attempt no longer holds the run."""
        args: list[Arg] = [worker, attempt]
        for w in waits:
            args += (w.key, w.kind, w.ref, w.until_ms, w.delay_ms)
        keys = [
            self.keys.run(run_id),
            self.keys.steps(run_id),
            self.keys.waits(run_id),
            self.keys.children(run_id),
        ]
        reply = await self._hot("wait", self.scripts.command("wait", keys, args))
        if reply[0] == b"stale":
            raise RunLost(run_id, reply[1].decode())
        return [
            WaitState(reply[i + 1]) if reply[i] == b"done" else WaitState(None, int(reply[i + 1]))
            for i in range(1, len(reply), 2)
        ]

    async def suspend(
        self, run_id: str, worker: str, attempt: int, traceparent: str = ""
    ) -> Suspended:
        """End this attempt as WAITING for its waitpoints (suspend.lua); `traceparent`:
        the attempt's span, for the attempt that resumes the run to link to."""
        keys = [self.keys.run(run_id), self.keys.waits(run_id)]
        args: list[Arg] = [worker, attempt, traceparent]
        reply = await self._hot("suspend", self.scripts.command("suspend", keys, args))
        kind = reply[0].decode()
        if kind == "waiting":
            return Suspended("waiting", int(reply[1]), int(reply[2]))
        if kind == "resume":
            return Suspended("resume", now_ms=int(reply[1]))
        return Suspended("stale")

    async def resolve(self, run_id: str, step_key: str, ref: str, result: bytes) -> Woken | None:
        """Hand a waitpoint's outcome to the run waiting for it (resolve.lua); the run
        to publish again if that was the last thing it waited for."""
        keys = [self.keys.run(run_id), self.keys.steps(run_id), self.keys.waits(run_id)]
        reply = await self._hot(
            "resolve", self.scripts.command("resolve", keys, [step_key, ref, result])
        )
        if reply[0] != b"wake":
            return None
        task, queue, payload, tags, scheduled, ckey, trace, last_attempt = reply[1:9]
        return Woken(
            task.decode(),
            queue.decode(),
            payload,
            _tags_decoder.decode(tags),
            int(scheduled) if scheduled else None,
            ckey.decode() or None,
            trace,
            last_attempt,
        )

    async def create_token(self, token_id: str, run_id: str, timeout_ms: int) -> int:
        """Create a wait token (token_create.lua); its expiry, epoch ms. Creating it again
        under the same id returns the first expiry, so it waits at the gate like the hot
        path while Redis is unavailable."""
        command = self.scripts.command(
            "token_create", [self.keys.token(token_id)], [run_id, timeout_ms, self._run_ttl]
        )
        expires: int = await self._hot("token_create", command)
        return expires

    async def token_wait(self, token_id: str, run_id: str, step_key: str) -> list[bytes]:
        """Tell the token which run's step waits for it (token_wait.lua): ['pending'],
        ['COMPLETED', data], ['TIMED_OUT'] or ['missing']. Idempotent: at the gate too."""
        command = self.scripts.command(
            "token_wait", [self.keys.token(token_id)], [run_id, step_key]
        )
        reply: list[bytes] = await self._hot("token_wait", command)
        return reply

    async def complete_token(self, token_id: str, data: bytes) -> list[bytes]:
        """Complete a token once (token_complete.lua): ['ok', run, step] or why not."""
        reply: list[bytes] = await self.scripts.call(
            "token_complete", [self.keys.token(token_id)], [data]
        )
        return reply

    async def children(self, run_id: str) -> list[str]:
        """The runs this run triggered, in order (waited for or not)."""
        ids: list[Any] = await self.redis.lrange(self.keys.children(run_id), 0, -1)
        return [i.decode() for i in ids]

    async def add_child(self, run_id: str, child_ids: Sequence[str]) -> None:
        """Record children that no step waits for (fire-and-forget triggers)."""
        await self.batcher.execute("RPUSH", self.keys.children(run_id), *child_ids)

    async def heartbeat(self, leases: Sequence[tuple[str, int]], worker: str) -> list[str]:
        """Renew the leases of (run_id, attempt) pairs; returns 'ok' or the status that
        ended it. Never waits at the gate: a renewal that fails is made at the next turn."""
        replies = await asyncio.gather(
            *(
                self.scripts.call(
                    "heartbeat", [self.keys.run(run_id)], [worker, attempt, self._lease_ms]
                )
                for run_id, attempt in leases
            )
        )
        return [r.decode() for r in replies]

    # -- reading and control ------------------------------------------------------------

    async def cancel(self, run_id: str) -> str:
        reply = await self.scripts.call(
            "cancel",
            [
                self.keys.run(run_id),
                self.keys.steps(run_id),
                self.keys.waits(run_id),
                self.keys.children(run_id),
            ],
            [self._run_ttl],
        )
        previous: str = reply.decode()
        if previous not in ("MISSING",) and not RunStatus(previous).is_terminal:
            await self.redis.publish(self.keys.cancel_channel, run_id)
        return previous

    async def status(self, run_id: str) -> StatusView | None:
        reply: list[Any] = await self.redis.hmget(
            self.keys.run(run_id), ["status", "output", "error"]
        )
        status, output, error = reply
        if status is None:
            return None
        return StatusView(RunStatus(status.decode()), output, error.decode() if error else None)

    async def statuses(self, run_ids: Sequence[str]) -> list[StatusView | None]:
        """status() of each run (None: no such run), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hmget(self.keys.run(run_id), ["status", "output", "error"])
            replies: list[Any] = await pipe.execute()
        return [
            None
            if status is None
            else StatusView(RunStatus(status.decode()), output, error.decode() if error else None)
            for status, output, error in replies
        ]

    async def states(self, run_ids: Sequence[str]) -> list[RunState | None]:
        """The state of each run (None: no such run), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hmget(
                    self.keys.run(run_id),
                    [
                        "status",
                        "attempt",
                        "not_before",
                        "lease_until",
                        "throttle",
                        "expires_at",
                        "parent_step",
                    ],
                )
            replies: list[Any] = await pipe.execute()
        return [
            None
            if status is None
            else RunState(
                RunStatus(status.decode()),
                int(attempt or 0),
                int(nb or 0),
                int(lu or 0),
                throttle is not None,
                int(expires or 0),
                bool(step),
            )
            for status, attempt, nb, lu, throttle, expires, step in replies
        ]

    async def expire(self, run_id: str) -> Expired | None:
        """End a run that never started and is past its ttl EXPIRED (expire.lua); None
        if it was not (started meanwhile, ended, not past its ttl)."""
        keys = [self.keys.run(run_id), self.keys.steps(run_id), self.keys.waits(run_id)]
        reply = await self.scripts.call("expire", keys, [self._run_ttl])
        if reply[0] != b"expired":
            return None
        return Expired(reply[1].decode(), reply[2].decode(), reply[3].decode())

    async def republishes(self, run_ids: Sequence[str]) -> list[Republish | None]:
        """Each run's message as its trigger published it (None: no such run)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hmget(
                    self.keys.run(run_id),
                    [
                        "task",
                        "queue",
                        "payload",
                        "tags",
                        "idem",
                        "not_before",
                        "scheduled_at",
                        "ckey",
                        "trace",
                    ],
                )
            replies: list[Any] = await pipe.execute()
        out: list[Republish | None] = []
        for run_id, (task, queue, payload, tags, idem, nb, sched, ckey, trace) in zip(
            run_ids, replies, strict=True
        ):
            if task is None or queue is None:
                out.append(None)
                continue
            message = RunMessage(
                task=task.decode(),
                payload=msgspec.Raw(payload or b"{}"),
                id=run_id,
                idempotency_key=idem.decode() if idem else None,
                tags=_tags_decoder.decode(tags or b"[]"),
                not_before=int(nb) if nb and int(nb) > 0 else None,
                scheduled_at=int(sched) if sched else None,
                concurrency_key=ckey.decode() if ckey else None,
            )
            out.append(Republish(queue.decode(), message, tracing.unpack(trace)))
        return out

    async def get(self, run_id: str) -> Run | None:
        [run] = await self.get_many([run_id])
        return run

    async def get_many(self, run_ids: Sequence[str]) -> list[Run | None]:
        """Runs by id in one round trip, None for those that do not exist."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hgetall(self.keys.run(run_id))
                pipe.hkeys(self.keys.steps(run_id))
                pipe.lrange(self.keys.children(run_id), 0, -1)
            replies = await pipe.execute()
        runs: list[Run | None] = []
        for n, run_id in enumerate(run_ids):
            fields, steps, children = replies[3 * n : 3 * n + 3]
            if not fields or b"status" not in fields:
                runs.append(None)
                continue
            run = _to_run(run_id, fields, sorted(s.decode() for s in steps))
            runs.append(msgspec.structs.replace(run, children=[c.decode() for c in children]))
        return runs

    async def list(
        self,
        *,
        task_id: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> RunPage:
        """Newest first, from the runs index (shared/runs_index.py)."""
        if limit < 1:
            raise InvalidListing("limit", limit, "a page holds at least 1 run")
        reader = IndexReader(self.redis, self.keys, self.settings)
        listed = await reader.page(task_id, status, limit, cursor)
        runs = [
            run
            for run in await self.get_many(listed.run_ids)
            # A run that ended (or expired) since the index was read.
            if run is not None and (status is None or run.status is status)
        ]
        return RunPage(runs, encode_cursor(listed.cursor) if listed.cursor else None)


def _to_run(run_id: str, f: dict[bytes, bytes], steps: list[str]) -> Run:
    attempts = sorted(
        (_attempt_info(k, v, f) for k, v in f.items() if k.startswith(b"a:")),
        key=lambda a: a.number,
    )
    output_raw = f.get(b"output")
    idem = f.get(b"idem", b"").decode()
    error = f.get(b"error")
    status = RunStatus(f[b"status"].decode())
    return Run(
        id=run_id,
        task_id=f[b"task"].decode(),
        status=status,
        attempts=attempts,
        payload=_any_decoder.decode(f.get(b"payload", b"{}")),
        output=_any_decoder.decode(output_raw) if output_raw else None,
        error=error.decode() if error else None,
        created_at=_ms(f.get(b"created_at")) or datetime.fromtimestamp(0, UTC),
        started_at=_ms(f.get(b"started_at")),
        finished_at=_ms(f.get(b"finished_at")),
        tags=_tags_decoder.decode(f.get(b"tags", b"[]")),
        idempotency_key=idem or None,
        queue=f.get(b"queue", b"").decode(),
        steps=steps,
        parent=f[b"parent"].decode() if b"parent" in f else None,
        root=f[b"root"].decode() if b"root" in f else None,
        scheduled_at=_ms(f.get(b"scheduled_at")),
        concurrency_key=_text(f.get(b"ckey")),
        throttled=_text(f.get(b"throttle")) if status is RunStatus.QUEUED else None,
        expires_at=_ms(f.get(b"expires_at")),
    )


def _attempt_info(field: bytes, record: bytes, run: dict[bytes, bytes]) -> AttemptInfo:
    a = _attempt_decoder.decode(record)
    finished = a.t1 if a.t1 is not None else a.finished_at
    worker = run.get(b"w:" + field[2:])
    return AttemptInfo(
        number=a.n if a.n is not None else a.number,
        status=a.s if a.s is not None else a.status,
        started_at=_ms(str(a.t0 or a.started_at).encode()) or datetime.fromtimestamp(0, UTC),
        finished_at=_ms(str(finished).encode()) if finished else None,
        error=a.e if a.e is not None else a.error,
        traceback=a.tb if a.tb is not None else a.traceback,
        worker=worker.decode() if worker is not None else a.worker,
    )


def _text(value: bytes | None) -> str | None:
    return value.decode() if value else None


def decode_any(raw: bytes) -> Any:
    return _any_decoder.decode(raw)
