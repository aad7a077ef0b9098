"""The scheduler process: a leader elected by a fenced Redis lease, and its duties.

lease.py     the leader lease and its fencing token
reaper.py    republishes runs that nothing moves any more (the due index)
cron.py      fires cron ticks exactly once each (the schedules' due index)
declared.py  registers the schedules that @task(cron=..., every=...) declares
dead.py      dead letters: recorded, their runs ended, listed, replayed, purged
runtime.py   the connections the scheduler and the `conveyor dead` commands share
process.py   the process: keeps or seeks the lease, runs the duties while it leads
"""

from .process import Scheduler

__all__ = ["Scheduler"]
