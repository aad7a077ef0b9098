"""The benchmark's tasks, written once per system in that system's own idiom.

Every system gets the same tasks: `noop(tag)` records a stamp and returns; a chain of
three no-op calls (`first`, `second`, `third`, the first and the last recording a stamp);
conveyor runs the chain as one task of three checkpointed steps, the peers as three tasks,
each publishing the next; a fan-out parent `fanout(count)` that starts `count` children
`fanout_child(i)` (each records a stamp and returns i) and collects their results, each
system the way it offers for that (its app module's docstring says how). The worker
processes import these modules; their settings come from the environment the harness
sets (see `settings.py`).
"""
