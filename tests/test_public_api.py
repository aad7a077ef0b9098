"""The public names of `conveyor` are pinned: adding or removing one is a deliberate change
to this list (and to the docs), never an accident of an import."""

from __future__ import annotations

import inspect

import conveyor

PUBLIC = [
    "AttemptInfo",
    "BoundTask",
    "Client",
    "Concurrency",
    "ConfigurationError",
    "ConveyorError",
    "Cron",
    "InvalidArguments",
    "InvalidListing",
    "InvalidOption",
    "InvalidSchedule",
    "InvalidWait",
    "LogEntry",
    "NonRetryableError",
    "PayloadTooLarge",
    "PublishFailed",
    "RateLimit",
    "RateLimited",
    "Result",
    "ResultTimeout",
    "Retry",
    "Run",
    "RunFailed",
    "RunHandle",
    "RunInfo",
    "RunNotFound",
    "RunPage",
    "RunStatus",
    "Schedule",
    "ScheduleNotFound",
    "Settings",
    "StepResultNotSerializable",
    "Task",
    "TaskDefinitionError",
    "Token",
    "TokenNotFound",
    "TokenNotPending",
    "TokenTimeout",
    "TriggerError",
    "TriggerIncomplete",
    "create_token",
    "current_run",
    "registered_tasks",
    "run_step",
    "sleep",
    "sleep_until",
    "step",
    "task",
    "wait_for_token",
]

# The names the API section promises; the docs and examples use exactly these.
PROMISED = [
    "task",
    "step",
    "run_step",
    "Retry",
    "NonRetryableError",
    "RunFailed",
    "Client",
    "current_run",
    # child runs and waits (issue 9)
    "sleep",
    "sleep_until",
    "create_token",
    "wait_for_token",
    "TokenTimeout",
    "Result",
    # limits (issue 10)
    "RateLimit",
    "RateLimited",
    "Concurrency",
]


def test_all_is_pinned() -> None:
    assert conveyor.__all__ == PUBLIC
    assert len(set(conveyor.__all__)) == len(conveyor.__all__)
    assert set(PROMISED) <= set(conveyor.__all__)


def test_every_public_attribute_is_exported() -> None:
    # Like temporalio's test_workflow_exports: whatever the package shows without an
    # underscore (submodules aside) is in __all__, and everything in __all__ exists.
    shown = {
        name
        for name, value in vars(conveyor).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert shown == set(conveyor.__all__)
    for name in conveyor.__all__:
        assert getattr(conveyor, name).__module__.startswith("conveyor"), name


def test_star_import_gives_exactly_all() -> None:
    scope: dict[str, object] = {}
    exec("from conveyor import *", scope)
    assert sorted(k for k in scope if k != "__builtins__") == sorted(PUBLIC)


def test_error_hierarchy() -> None:
    # Callers catch these by base class; the tree is part of the API (shared/errors.py).
    c = conveyor
    assert all(
        issubclass(getattr(c, name), c.ConveyorError)
        for name in PUBLIC
        if name.endswith("Error") or name in ("RunFailed", "RunNotFound", "PayloadTooLarge")
    )
    for child in (
        c.InvalidArguments,
        c.InvalidOption,
        c.PayloadTooLarge,
        c.PublishFailed,
        c.TriggerIncomplete,
    ):
        assert issubclass(child, c.TriggerError)
    assert issubclass(c.StepResultNotSerializable, c.NonRetryableError)
    assert issubclass(c.InvalidSchedule, c.ConfigurationError)
    assert issubclass(c.ScheduleNotFound, c.ConveyorError)
    assert issubclass(c.ResultTimeout, TimeoutError)
    assert issubclass(c.TokenTimeout, TimeoutError)
