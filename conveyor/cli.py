"""The `conveyor` command: run workers, trigger tasks, inspect runs and schedules."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import uvloop
from aiormq.exceptions import AMQPConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor._client import Client
from conveyor._task import registered_tasks
from conveyor._telemetry import configure_tracing, join_environment_trace
from conveyor.shared.errors import ConveyorError, RunNotFound
from conveyor.shared.logs import LogEntry
from conveyor.shared.models import Run, RunStatus
from conveyor.shared.schedules import Schedule


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description="Durable task execution on RabbitMQ and Redis."
    )
    parser.add_argument("--namespace", help="queue and key prefix (default: CONVEYOR_NAMESPACE)")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run a worker for the tasks in the given modules")
    worker.add_argument("modules", nargs="+", metavar="MODULE", help="modules that define tasks")
    worker.add_argument("--concurrency", type=_positive_int, default=100, help="runs at once (100)")
    worker.add_argument(
        "--prefetch",
        type=_positive_int,
        default=None,
        help="deliveries held per queue, at least the concurrency (twice the concurrency)",
    )
    worker.add_argument("--queues", type=_csv, default=None, help="comma-separated queues (all)")
    worker.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    scheduler = sub.add_parser(
        "scheduler", help="run a scheduler replica (leader election, reaper, dead letters)"
    )
    scheduler.add_argument(
        "modules", nargs="*", metavar="MODULE", help="modules that define tasks (for cron)"
    )
    scheduler.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    dead = sub.add_parser("dead", help="dead-lettered messages: list, replay, purge")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True)
    dead_list = dead_sub.add_parser("list", help="dead letters, newest first")
    dead_list.add_argument("--limit", type=_positive_int, default=20)
    dead_list.add_argument("--json", action="store_true")
    replay = dead_sub.add_parser("replay", help="publish dead letters back to their queues")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", default=[], metavar="ID")
    which.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--json", action="store_true")
    purge = dead_sub.add_parser("purge", help="remove every dead letter")
    purge.add_argument("--json", action="store_true")

    trigger = sub.add_parser("trigger", help="trigger a run of a task by id")
    trigger.add_argument("task_id", metavar="TASK_ID")
    trigger.add_argument("--payload", default="{}", help="JSON object of arguments")
    trigger.add_argument("--wait", action="store_true", help="wait for the result")
    trigger.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait")
    trigger.add_argument("--json", action="store_true", help="machine-readable output")

    tokens = sub.add_parser("tokens", help="wait tokens: complete one")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    complete = tokens_sub.add_parser("complete", help="complete a token; its run resumes")
    complete.add_argument("token_id", metavar="TOKEN_ID")
    complete.add_argument("--data", default="null", help="JSON the waiting run receives")
    schedules = sub.add_parser("schedules", help="cron schedules: list, create, pause, ...")
    sched_sub = schedules.add_subparsers(dest="schedules_command", required=True)
    sched_list = sched_sub.add_parser("list", help="every schedule, by key")
    sched_list.add_argument("--json", action="store_true")
    create = sched_sub.add_parser("create", help="create or update a schedule")
    create.add_argument("task_id", metavar="TASK_ID")
    when = create.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="5 fields, or 6 with seconds first")
    when.add_argument("--every", type=float, help="interval in seconds")
    create.add_argument("--timezone", default="UTC", help="IANA name (UTC)")
    create.add_argument("--payload", default="{}", help="JSON object of arguments")
    create.add_argument("--key", default=None, help="the schedule's key (default: derived)")
    create.add_argument("--queue", default=None, help="the task's queue (default: its id)")
    create.add_argument("--json", action="store_true")
    for name, text in (
        ("show", "one schedule"),
        ("delete", "delete a schedule"),
        ("pause", "stop firing until resumed"),
        ("resume", "fire again from the next tick"),
    ):
        one = sched_sub.add_parser(name, help=text)
        one.add_argument("key", metavar="KEY")
        one.add_argument("--json", action="store_true")

    runs = sub.add_parser("runs", help="inspect runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    show = runs_sub.add_parser("show", help="one run with its attempts and steps")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true")
    tree = runs_sub.add_parser("tree", help="a run and the runs it triggered, with statuses")
    tree.add_argument("run_id", metavar="RUN_ID")
    tree.add_argument("--json", action="store_true")
    logs = runs_sub.add_parser("logs", help="what a run's attempts logged")
    logs.add_argument("run_id", metavar="RUN_ID")
    logs.add_argument("--attempt", type=_positive_int, default=None, help="one attempt's only")
    logs.add_argument("--json", action="store_true")
    listing = runs_sub.add_parser("list", help="recent runs, newest first")
    listing.add_argument("--task", default=None)
    listing.add_argument("--status", default=None, type=_status)
    listing.add_argument("--limit", type=_positive_int, default=20)
    listing.add_argument(
        "--cursor", default=None, help="the cursor a previous page printed: the runs older"
    )
    listing.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "scheduler":
            return _scheduler(args)
        if args.command == "dead":
            return uvloop.run(_dead_command(args))
        if args.command == "trigger":
            return _traced("conveyor-cli", lambda: uvloop.run(_client_command(args)))
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


def _import_modules(args: argparse.Namespace) -> bool:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.path.insert(0, "")
    for module in args.modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"conveyor: cannot import task module {module!r}: {exc}", file=sys.stderr)
            return False
    return True


def _traced(service: str, command: Callable[[], int]) -> int:
    """Run a command with the OpenTelemetry SDK set up if OTEL_* asks for it, flushing
    the spans still buffered at the end."""
    shutdown = configure_tracing(service)
    try:
        return command()
    finally:
        if shutdown is not None:
            shutdown()


def _scheduler(args: argparse.Namespace) -> int:
    from conveyor.scheduler import Scheduler

    if not _import_modules(args):
        return 2
    scheduler = Scheduler(namespace=args.namespace)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, scheduler.stop)
        await scheduler.run()

    return _traced("conveyor-scheduler", lambda: _serve(serve()))


async def _dead_command(args: argparse.Namespace) -> int:
    from conveyor.scheduler.dead import DeadLetter, DeadLetters
    from conveyor.scheduler.runtime import Runtime
    from conveyor.shared.settings import Settings

    runtime = Runtime(Settings.from_env(namespace=args.namespace), "conveyor-cli")
    try:
        await runtime.connect()
        dead = DeadLetters(runtime)
        # What waits in the queue is recorded first, so this works with no scheduler running.
        await dead.ingest()
        if args.dead_command == "list":
            records = await dead.recent(args.limit)
            lines = [
                f"{r.id}  {_when(_from_ms(r.at))}  {r.queue or '-':<16} {r.task or '-':<20} "
                f"{r.run_id or '-'}  {r.reason}"
                for r in records
            ]
            _out(args, [_dead_dict(r) for r in records], "\n".join(lines) or "no dead letters")
        elif args.dead_command == "replay":
            if not args.all and not args.ids:
                raise ConveyorError("give the ids of the dead letters to replay, or --all")
            replayed: list[DeadLetter] = await dead.replay(None if args.all else args.ids)
            text = "\n".join(f"replayed {r.id} to queue {r.queue}" for r in replayed)
            _out(args, [r.id for r in replayed], text or "no dead letters")
        else:
            count = await dead.purge()
            _out(args, {"purged": count}, f"purged {count} dead letters")
        return 0
    finally:
        await runtime.close()


def _dead_dict(record: Any) -> Any:
    """A dead letter as `--json` shows it: the body as text where it is UTF-8."""
    data = msgspec.to_builtins(record)
    # Otherwise left base64-encoded, as msgspec writes bytes.
    with contextlib.suppress(UnicodeDecodeError):
        data["body"] = record.body.decode()
    return data


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


# Allocations net of frees before a young-generation collection (CPython's default: 700).
GC_THRESHOLD = 20_000


def _worker(args: argparse.Namespace) -> int:
    from conveyor.worker import Worker

    if not _import_modules(args):
        return 2
    worker = Worker(
        registered_tasks(),
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        queues=args.queues,
        namespace=args.namespace,
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    # Every run allocates many short-lived objects and almost no cycles: with the default
    # thresholds the collector ran about 20 times a second in a drain (3% of the worker's
    # CPU), mostly walking what the imports made. Those are frozen out of its way.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    return _traced("conveyor-worker", lambda: _serve(serve()))


def _serve(main: Coroutine[Any, Any, None]) -> int:
    uvloop.run(main)
    return 0


async def _client_command(args: argparse.Namespace) -> int:
    async with Client(namespace=args.namespace) as client:
        if args.command == "schedules":
            return await _schedules_command(client, args)
        if args.command == "trigger":
            join_environment_trace()
            payload = _payload(args.payload)
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
        if args.command == "tokens":
            try:
                data = msgspec.json.decode(args.data)
            except msgspec.DecodeError as exc:
                raise ConveyorError(f"--data is not valid JSON: {exc}") from exc
            await client.complete_token(args.token_id, data)
            print(f"token {args.token_id} completed")
            return 0
        if args.runs_command == "show":
            run = await client.get_run(args.run_id)
            _out(args, _run_dict(run), _run_text(run))
            return 0
        if args.runs_command == "logs":
            entries = await client.get_logs(args.run_id, attempt=args.attempt)
            _out(args, [msgspec.to_builtins(e) for e in entries], _logs_text(args, entries))
            return 0
        if args.runs_command == "tree":
            nodes = await _tree(client, args.run_id)
            text = "\n".join(
                f"{'  ' * depth}{r.id}  {r.task_id}  {r.status.value}" for depth, r in nodes
            )
            data = [
                {"depth": depth, "id": r.id, "task_id": r.task_id, "status": r.status}
                for depth, r in nodes
            ]
            _out(args, data, text)
            return 0
        page = await client.list_runs(
            task_id=args.task, status=args.status, limit=args.limit, cursor=args.cursor
        )
        lines = [
            f"{r.id}  {r.task_id:<24} {r.status.value:<10} {_when(r.created_at)}" for r in page.runs
        ]
        if page.cursor is None:
            _out(args, [_run_dict(r) for r in page.runs], "\n".join(lines) or "no runs")
        elif args.json:
            # stdout stays the JSON list of runs; the cursor of the next page goes aside.
            _out(args, [_run_dict(r) for r in page.runs], "")
            print(f"next page: --cursor {page.cursor}", file=sys.stderr)
        else:
            print("\n".join([*lines, f"next page: --cursor {page.cursor}"]))
        return 0


async def _tree(client: Client, run_id: str) -> list[tuple[int, Run]]:
    """The run and its descendants, depth first, each with its depth."""
    nodes: list[tuple[int, Run]] = []
    stack: list[tuple[int, str]] = [(0, run_id)]
    while stack:
        depth, current = stack.pop()
        try:
            run = await client.get_run(current)
        except RunNotFound:  # expired before its parent
            continue
        nodes.append((depth, run))
        stack += [(depth + 1, c) for c in reversed(run.children)]
    return nodes


async def _schedules_command(client: Client, args: argparse.Namespace) -> int:
    command = args.schedules_command
    if command == "list":
        found = await client.schedules.list()
        lines = [_schedule_line(s) for s in found]
        _out(args, [msgspec.to_builtins(s) for s in found], "\n".join(lines) or "no schedules")
        return 0
    if command == "delete":
        await client.schedules.delete(args.key)
        _out(args, {"deleted": args.key}, f"deleted {args.key}")
        return 0
    if command == "create":
        schedule = await client.schedules.create(
            args.task_id,
            args.cron,
            every=None if args.every is None else timedelta(seconds=args.every),
            timezone=args.timezone,
            payload=_payload(args.payload),
            key=args.key,
            queue=args.queue,
        )
    elif command == "show":
        schedule = await client.schedules.get(args.key)
    elif command == "pause":
        schedule = await client.schedules.pause(args.key)
    else:
        schedule = await client.schedules.resume(args.key)
    _out(args, msgspec.to_builtins(schedule), _schedule_line(schedule))
    return 0


def _schedule_line(s: Schedule) -> str:
    when = s.cron if s.cron is not None else f"every {s.every}"
    state = "paused" if s.paused else f"next {_when(s.next_at)}"
    return f"{s.key}  {s.task_id:<24} {when} ({s.timezone})  {state}  {_json(s.payload)}"


def _payload(text: str) -> dict[str, Any]:
    try:
        payload = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ConveyorError(f"--payload is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise ConveyorError("--payload must be a JSON object of argument names to values")
    return payload


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
        f"status   {run.status.value}" + (f" ({run.throttled})" if run.throttled else ""),
        f"created  {_when(run.created_at)}",
        f"started  {_when(run.started_at)}",
        f"finished {_when(run.finished_at)}",
        f"payload  {_json(run.payload)}",
    ]
    if run.tags:
        lines.append(f"tags     {', '.join(run.tags)}")
    if run.concurrency_key:
        lines.append(f"key      {run.concurrency_key} (concurrency key)")
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


def _logs_text(args: argparse.Namespace, entries: list[LogEntry]) -> str:
    if not entries:
        which = f"attempt {args.attempt} of run" if args.attempt else "run"
        return f"no logs for {which} {args.run_id}"
    lines = [f"run {args.run_id}"]
    for e in entries:
        lines.append(f"{_when(e.time)}  attempt {e.attempt}  {e.level:<8} {e.logger}: {e.message}")
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
