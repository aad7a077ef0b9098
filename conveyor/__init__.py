"""conveyor: durable task execution for Python on RabbitMQ and Redis."""

import os as _os

# In a source checkout conveyor.shared, .broker, .worker and .scheduler are the folders
# beside this one (pyproject maps them); when the checkout's root is on sys.path, e.g.
# when running from it, this makes them importable as they are once installed.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "shared")) and _os.path.isfile(
    _os.path.join(_root, "shared", "store.py")
):
    __path__.append(_root)

from conveyor._client import Client, RunHandle
from conveyor._step import run_step, step
from conveyor._task import BoundTask, Task, registered_tasks, task
from conveyor._tokens import Token, create_token, wait_for_token
from conveyor._waits import Result, sleep, sleep_until
from conveyor.shared.context import RunInfo, current_run
from conveyor.shared.cron import Cron
from conveyor.shared.errors import (
    ConfigurationError,
    ConveyorError,
    InvalidArguments,
    InvalidListing,
    InvalidOption,
    InvalidSchedule,
    InvalidWait,
    NonRetryableError,
    PayloadTooLarge,
    PublishFailed,
    RateLimited,
    ResultTimeout,
    RunFailed,
    RunNotFound,
    ScheduleNotFound,
    StepResultNotSerializable,
    TaskDefinitionError,
    TokenNotFound,
    TokenNotPending,
    TokenTimeout,
    TriggerError,
    TriggerIncomplete,
)
from conveyor.shared.limits import Concurrency, RateLimit
from conveyor.shared.logs import LogEntry
from conveyor.shared.models import AttemptInfo, Run, RunPage, RunStatus
from conveyor.shared.retry import Retry
from conveyor.shared.schedules import Schedule
from conveyor.shared.settings import Settings

__all__ = [
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
