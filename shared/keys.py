"""The Redis key layout. Every key starts with the namespace; a run's keys share the
hash tag ``{run_id}`` so that scripts over one run stay on one Redis Cluster slot."""

from __future__ import annotations


class Keys:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.cancel_channel = f"{namespace}:cancel"
        # Every script that ends a run publishes its id here (the channel derived in Lua
        # from the run's key, so no script takes it as an argument); result() waits on it.
        self.ended_channel = f"{namespace}:ended"
        # The scheduler's keys share the hash tag {sched}: its fenced scripts check the
        # leader lease and write beside it on one slot.
        self.leader = f"{namespace}:{{sched}}:leader"
        self.leader_epoch = f"{namespace}:{{sched}}:epoch"
        # run id -> epoch ms by which the run should have moved at the latest (the reaper's)
        self.due = f"{namespace}:{{sched}}:due"
        self.dead = f"{namespace}:{{sched}}:dead"
        self.dead_index = f"{namespace}:{{sched}}:dead:index"
        # schedule key -> its record (shared/schedules.py); key -> next fire time, epoch ms,
        # for the schedules that are not paused (the cron ticker's due index)
        self.schedules = f"{namespace}:{{sched}}:schedules"
        self.schedules_due = f"{namespace}:{{sched}}:schedules:due"

    def run(self, run_id: str) -> str:
        return f"{self.namespace}:{{{run_id}}}:run"

    def steps(self, run_id: str) -> str:
        return f"{self.namespace}:{{{run_id}}}:steps"

    def four(self, run_id: str) -> tuple[str, str, str, str]:
        """run, steps, waits and children of a run, in one formatting: claim and finish
        send them every run."""
        tag = f"{self.namespace}:{{{run_id}}}:"
        return (tag + "run", tag + "steps", tag + "waits", tag + "children")

    def waits(self, run_id: str) -> str:
        """step key -> what the step waits for (a child run, a timer), while it waits."""
        return f"{self.namespace}:{{{run_id}}}:waits"

    def children(self, run_id: str) -> str:
        """The runs a run triggered, in order."""
        return f"{self.namespace}:{{{run_id}}}:children"

    def logs(self, run_id: str) -> str:
        """The log records of a run's attempts (shared/logs.py)."""
        return f"{self.namespace}:{{{run_id}}}:logs"

    def token(self, token_id: str) -> str:
        """A wait token: who waits for it, its expiry, and its data once completed."""
        return f"{self.namespace}:{{{token_id}}}:token"

    def rate(self, name: str) -> str:
        """A rate limit's state (shared/lua/rate_take.lua), in a slot of its own."""
        return f"{self.namespace}:{{rate:{name}}}"

    def slots(self, name: str) -> list[str]:
        """A concurrency limit's keys (shared/lua/slots.lua), sharing one slot."""
        tag = f"{self.namespace}:{{slots:{name}}}:"
        return [tag + part for part in ("holders", "owners", "counts", "parked", "meta")]

    def runs_bucket(self, start_ms: int) -> str:
        """The runs index's bucket of the runs created from `start_ms` (shared/runs_index.py),
        each bucket in a slot of its own."""
        return f"{self.namespace}:{{runs:{start_ms}}}"

    def runs_task_bucket(self, task_id: str, start_ms: int) -> str:
        """The same bucket for one task's runs, in a slot of its own too."""
        return f"{self.namespace}:{{runs:{start_ms}:{task_id}}}"

    def idempotency(self, task_id: str, key: str) -> str:
        return f"{self.namespace}:idem:{task_id}:{key}"

    def pattern(self) -> str:
        """Matches every key of the namespace (used by cleanup in tests and tools)."""
        return f"{self.namespace}:*"
