"""The benchmark's tasks, written once per system in that system's own idiom.

Every system gets the same three tasks: `noop(tag)` records a stamp and returns; a chain
of three no-op calls (`first`, `second`, `third`, the first and the last recording a
stamp); conveyor runs the chain as one task of three checkpointed steps, the peers as
three tasks, each publishing the next. The worker processes import these modules; their
settings come from the environment the harness sets (see `settings.py`).
"""
