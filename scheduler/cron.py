"""The cron ticker: the leader fires the ticks that came due, exactly once each.

The due index (`{ns}:{sched}:schedules:due`, schedule key -> next fire time in epoch ms)
is read from its head, so a pass costs what came due, not the number of schedules. For
each due schedule the leader walks its fire times up to now, and for each tick:

1. creates the run `cron:{key}:{fire_ms}` with its scheduled time, in one script
   (create.lua leaves a run that exists alone, so a tick fired twice, by two leaders or
   again after a lost reply, is one run);
2. publishes its message, which carries that time to the worker
   (`current_run().scheduled_at`);
3. moves the schedule on to its next fire time in a fenced script (sched_tick.lua): only
   while this scheduler holds the lease, and only if the entry still has the time it
   fired from.

A crash anywhere before 3 makes the next leader fire the same ticks again, which yields
the same runs; a spare message is dropped by the claim. A run created but not published
(the broker refused) is republished by the reaper, as any run is. Ticks more than
`cron_catch_up` old are skipped and logged.

The time is Redis's (TIME), the clock claim.lua and the lease expire on, so the
schedulers' own clocks play no part (plus `scheduler_clock_offset`, a test hook).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec

from conveyor.broker.publisher import Outgoing
from conveyor.shared import metrics, tracing
from conveyor.shared.batcher import Arg
from conveyor.shared.cron import Spec, tick_run_id
from conveyor.shared.errors import InvalidSchedule
from conveyor.shared.models import RunMessage
from conveyor.shared.schedules import ScheduleRecord, ScheduleStore, decode
from conveyor.shared.store import NewRun

from .lease import Lease, Refused
from .runtime import Runtime

log = logging.getLogger("conveyor.scheduler")

# Schedules fired per round trip; a pass takes rounds until nothing more is due.
BATCH = 1000
# Ticks fired per round: a long catch-up (many schedules, many missed ticks each) goes
# on over several rounds rather than in one huge create and publish.
MAX_TICKS = 5000
# The longest the ticker sleeps: a schedule created or resumed meanwhile, due sooner
# than what it saw, fires at most this late.
MAX_SLEEP = 0.5
# A schedule that cannot be read is looked at again after this long.
BAD_RETRY_MS = 60_000
# Parsed schedules kept, by their stored record.
MAX_SPECS = 100_000

_encoder = msgspec.json.Encoder()


class Tick(msgspec.Struct, frozen=True, gc=False):
    key: str
    record: ScheduleRecord
    fire_ms: int


class Ticker:
    def __init__(self, runtime: Runtime, lease: Lease) -> None:
        self.rt = runtime
        self.lease = lease
        self.schedules = ScheduleStore(runtime.redis, runtime.store.batcher, runtime.keys)
        self.catch_up_ms = int(runtime.settings.cron_catch_up * 1000)
        self.offset_ms = int(runtime.settings.scheduler_clock_offset * 1000)
        self.fired = 0
        self.skipped = 0
        self._specs: dict[bytes, tuple[ScheduleRecord, Spec]] = {}

    async def now_ms(self) -> int:
        return await self.schedules.now_ms() + self.offset_ms

    async def tick(self) -> float:
        """Fire what is due; returns how long to sleep before the next pass (seconds).
        Raises Refused if the lease was lost (nothing is then moved on)."""
        while self.lease.held():
            now = await self.now_ms()
            due: list[Any] = await self.rt.redis.zrangebyscore(
                self.rt.keys.schedules_due, "-inf", now, start=0, num=BATCH, withscores=True
            )
            if due:
                more = await self._fire([(k.decode(), int(score)) for k, score in due], now)
                if more or len(due) == BATCH:
                    continue
            head: list[Any] = await self.rt.redis.zrange(
                self.rt.keys.schedules_due, 0, 0, withscores=True
            )
            if not head:
                return MAX_SLEEP
            # A couple of milliseconds late rather than early: an early wake-up is a pass for nothing.
            return min(max(int(head[0][1]) - now + 2, 1) / 1000, MAX_SLEEP)
        return MAX_SLEEP

    async def _fire(self, due: list[tuple[str, int]], now: int) -> bool:
        """Fire the ticks of these schedules up to `now`, at most MAX_TICKS; True if some
        were left for the next round."""
        raws: list[Any] = await self.rt.redis.hmget(self.rt.keys.schedules, [k for k, _ in due])
        ticks: list[Tick] = []
        moves: list[Arg] = []
        for (key, fire), raw in zip(due, raws, strict=True):
            if len(ticks) >= MAX_TICKS:
                break  # the rest stay due, unmoved
            if raw is None:
                # No record (deleted by hand, or a write of another version): no due entry.
                moves += (key, fire, "")
                continue
            try:
                mine, after = self._walk(key, raw, fire, now, MAX_TICKS - len(ticks))
            except (InvalidSchedule, msgspec.ValidationError, msgspec.DecodeError) as exc:
                # Stored by another version, or its zone left this system's database.
                log.error("schedule %r cannot fire: %s; looking again in a minute", key, exc)
                moves += (key, fire, now + BAD_RETRY_MS)
                continue
            ticks += mine
            moves += (key, fire, after)
        if ticks:
            await self._start(ticks)
        if not self.lease.held():
            raise Refused("lease lost before moving schedules on")
        ok = await self.rt.scripts.call(
            "sched_tick",
            [self.rt.keys.leader, self.rt.keys.schedules_due],
            [self.lease.token, *moves],
        )
        if not ok:
            raise Refused(f"schedule moves refused: epoch {self.lease.epoch} lost the lease")
        self.fired += len(ticks)
        for t in ticks:
            metrics.ticks.add(1, metrics.of(t.record.task_id).attributes)
        return len(ticks) >= MAX_TICKS

    async def _start(self, ticks: Sequence[Tick]) -> None:
        # Each tick is a trace of its own, started by its PRODUCER span.
        tracer = tracing.tracer()
        spans = (
            [
                tracing.start_publish(
                    tracer, t.record.queue, t.record.task_id, [tick_run_id(t.key, t.fire_ms)]
                )
                for t in ticks
            ]
            if tracer is not None
            else []
        )
        try:
            await self._create_and_publish(ticks, [tracing.carrier_of(s) for s in spans])
        except BaseException as exc:
            for span in spans:
                tracing.fail(span, exc)
            raise
        finally:
            for span in spans:
                span.end()

    async def _create_and_publish(
        self, ticks: Sequence[Tick], carriers: Sequence[tracing.Carrier]
    ) -> None:
        runs = [
            NewRun(
                tick_run_id(t.key, t.fire_ms),
                t.record.task_id,
                t.record.queue,
                _encoder.encode(t.record.payload),
                [],
                None,
                0,
                scheduled_at=t.fire_ms,
                ttl_ms=t.record.ttl_ms,
                trace=tracing.pack(carriers[i]) if carriers else "",
            )
            for i, t in enumerate(ticks)
        ]
        await self.rt.store.create(runs)
        if not self.lease.held():
            raise Refused("lease lost before publishing ticks")
        outgoing = [
            Outgoing(
                run.queue,
                _encoder.encode(
                    RunMessage(
                        task=run.task_id,
                        payload=msgspec.Raw(run.payload),
                        id=run.run_id,
                        scheduled_at=run.scheduled_at,
                    )
                ),
                message_id=run.run_id,
                headers=carriers[i] if carriers else None,
            )
            for i, run in enumerate(runs)
        ]
        # The runs exist: the reaper republishes those not published (reap_after past due).
        for queue, exc in (await self.rt.publisher.publish_by_queue(outgoing)).items():
            log.warning("cannot publish ticks to queue %r: %s", queue, exc)

    def _walk(
        self, key: str, raw: bytes, fire: int, now: int, limit: int
    ) -> tuple[list[Tick], int]:
        """The ticks of one schedule from `fire` up to `now` (at most `limit`), and the
        fire time after them."""
        record, spec = self._spec(raw)
        if fire < now - self.catch_up_ms:
            start, fire = fire, spec.next_after(now - self.catch_up_ms - 1)
            self.skipped += 1
            log.warning(
                "schedule %r: ticks from %d to %d are older than the catch-up window "
                "(%.0fs) and were skipped",
                key,
                start,
                fire - 1,
                self.catch_up_ms / 1000,
            )
        ticks: list[Tick] = []
        while fire <= now and len(ticks) < limit:
            ticks.append(Tick(key, record, fire))
            fire = spec.next_after(fire)
        return ticks, fire

    def _spec(self, raw: bytes) -> tuple[ScheduleRecord, Spec]:
        found = self._specs.get(raw)
        if found is None:
            record = decode(raw)
            if len(self._specs) >= MAX_SPECS:
                self._specs.clear()
            found = self._specs[raw] = (record, record.spec())
        return found
