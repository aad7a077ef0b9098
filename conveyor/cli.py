"""The `conveyor` command: run workers, trigger tasks, inspect runs."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
import uvloop
from aiormq.exceptions import AMQPConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor._client import Client
from conveyor._task import registered_tasks
from conveyor.shared.errors import ConveyorError
from conveyor.shared.models import Run, RunStatus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description="Durable task execution on RabbitMQ and Redis."
    )
    parser.add_argument("--namespace", help="queue and key prefix (default: CONVEYOR_NAMESPACE)")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run a worker for the tasks in the given modules")
    worker.add_argument("modules", nargs="+", metavar="MODULE", help="modules that define tasks")
    worker.add_argument("--concurrency", type=_positive_int, default=100, help="runs at once (100)")
    worker.add_argument("--queues", type=_csv, default=None, help="comma-separated queues (all)")
    worker.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    trigger = sub.add_parser("trigger", help="trigger a run of a task by id")
    trigger.add_argument("task_id", metavar="TASK_ID")
    trigger.add_argument("--payload", default="{}", help="JSON object of arguments")
    trigger.add_argument("--wait", action="store_true", help="wait for the result")
    trigger.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait")
    trigger.add_argument("--json", action="store_true", help="machine-readable output")

    runs = sub.add_parser("runs", help="inspect runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    show = runs_sub.add_parser("show", help="one run with its attempts and steps")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true")
    listing = runs_sub.add_parser("list", help="recent runs, newest first")
    listing.add_argument("--task", default=None)
    listing.add_argument("--status", default=None, type=_status)
    listing.add_argument("--limit", type=_positive_int, default=20)
    listing.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "worker":
            return _worker(args)
        return uvloop.run(_client_command(args))
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 1
    except (AMQPConnectionError, RedisConnectionError, OSError) as exc:
        print(
            f"conveyor: cannot reach RabbitMQ or Redis ({exc}); check that they run and that "
            "CONVEYOR_AMQP_URL and CONVEYOR_REDIS_URL point at them",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


def _worker(args: argparse.Namespace) -> int:
    from conveyor.worker import Worker

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.path.insert(0, "")
    for module in args.modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"conveyor: cannot import task module {module!r}: {exc}", file=sys.stderr)
            return 2
    worker = Worker(
        registered_tasks(),
        concurrency=args.concurrency,
        queues=args.queues,
        namespace=args.namespace,
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    uvloop.run(serve())
    return 0


async def _client_command(args: argparse.Namespace) -> int:
    async with Client(namespace=args.namespace) as client:
        if args.command == "trigger":
            try:
                payload = msgspec.json.decode(args.payload)
            except msgspec.DecodeError as exc:
                raise ConveyorError(f"--payload is not valid JSON: {exc}") from exc
            if not isinstance(payload, dict):
                raise ConveyorError("--payload must be a JSON object of argument names to values")
            handle = await client.trigger(args.task_id, payload)
            if not args.wait:
                _out(args, {"id": handle.id}, handle.id)
                return 0
            try:
                output = await handle.result(timeout=args.timeout)
            except ConveyorError:
                run = await client.get_run(handle.id)
                _out(args, _run_dict(run), _run_text(run))
                return 1
            _out(args, {"id": handle.id, "status": "COMPLETED", "output": output}, _json(output))
            return 0
        if args.runs_command == "show":
            run = await client.get_run(args.run_id)
            _out(args, _run_dict(run), _run_text(run))
            return 0
        runs = await client.list_runs(task_id=args.task, status=args.status, limit=args.limit)
        lines = [
            f"{r.id}  {r.task_id:<24} {r.status.value:<10} {_when(r.created_at)}" for r in runs
        ]
        _out(args, [_run_dict(r) for r in runs], "\n".join(lines) or "no runs")
        return 0


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(_json(data) if args.json else text)


def _json(data: Any) -> str:
    return msgspec.json.encode(data).decode()


def _run_dict(run: Run) -> Any:
    return msgspec.to_builtins(run)


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value else "-"


def _run_text(run: Run) -> str:
    lines = [
        f"run      {run.id}",
        f"task     {run.task_id} (queue {run.queue})",
        f"status   {run.status.value}",
        f"created  {_when(run.created_at)}",
        f"started  {_when(run.started_at)}",
        f"finished {_when(run.finished_at)}",
        f"payload  {_json(run.payload)}",
    ]
    if run.tags:
        lines.append(f"tags     {', '.join(run.tags)}")
    if run.status is RunStatus.COMPLETED:
        lines.append(f"output   {_json(run.output)}")
    if run.error:
        lines.append(f"error    {run.error}")
    lines.append(f"steps    {', '.join(run.steps) or '-'}")
    for a in run.attempts:
        lines.append(f"attempt {a.number}: {a.status} on {a.worker} at {_when(a.started_at)}")
        if a.error:
            lines.append(f"    {a.error}")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _csv(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one queue name")
    return items


def _status(text: str) -> RunStatus:
    try:
        return RunStatus(text.upper())
    except ValueError:
        choices = ", ".join(s.value for s in RunStatus)
        raise argparse.ArgumentTypeError(f"unknown status {text!r}; use one of {choices}") from None
