"""The `conveyor` command as a user runs it: a subprocess (`python -m conveyor`) with
CONVEYOR_* variables pointing at the test's namespace, against a running worker."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest

from conveyor import Client, ConfigurationError, RunFailed, RunStatus, Settings
from conveyor.cli import build_parser, main
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import ROOT


class Result(msgspec.Struct):
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return msgspec.json.decode(self.out)


async def conveyor(settings: Settings, *args: str, env: Mapping[str, str] = {}) -> Result:
    """Run the CLI without blocking the event loop (the in-process worker runs on it)."""
    full_env = {
        **os.environ,
        "CONVEYOR_AMQP_URL": settings.amqp_url,
        "CONVEYOR_REDIS_URL": settings.redis_url,
        "CONVEYOR_NAMESPACE": settings.namespace,
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor",
        *args,
        env=full_env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode().strip(), err.decode().strip())


async def test_trigger_and_wait(settings: Settings, client: Client, worker: Worker) -> None:
    human, as_json, failed, failed_json = await asyncio.gather(
        conveyor(settings, "trigger", "echo", "--payload", '{"value": "ab", "times": 2}', "--wait"),
        conveyor(settings, "trigger", "echo", "--payload", '{"value": "x"}', "--wait", "--json"),
        conveyor(settings, "trigger", "fatal", "--wait", "--timeout", "20"),
        conveyor(settings, "trigger", "fatal", "--wait", "--json"),
    )
    assert (human.code, human.out) == (0, '"abab"'), human.err
    data = as_json.json()
    assert data["status"] == "COMPLETED" and data["output"] == "x"
    assert (await client.get_run(data["id"])).output == "x"

    # A run that fails: exit status 1 and the run, with its error, on stdout.
    assert failed.code == 1, failed.err
    assert "status   FAILED" in failed.out
    assert "error    NonRetryableError: this cannot work" in failed.out
    assert failed_json.code == 1
    run = msgspec.json.decode(failed_json.out)
    assert run["status"] == "FAILED" and run["task_id"] == "fatal"
    assert run["error"] == "NonRetryableError: this cannot work"


async def test_trigger_show_and_list(settings: Settings, client: Client, worker: Worker) -> None:
    triggered, as_json = await asyncio.gather(
        conveyor(settings, "trigger", "echo", "--payload", '{"value": "hi"}'),
        conveyor(settings, "trigger", "echo", "--payload", '{"value": "yo"}', "--json"),
    )
    assert triggered.code == 0, triggered.err
    run_id = triggered.out  # human output of a trigger is the run id alone
    other_id = as_json.json()["id"]
    assert await client.handle(run_id).result(timeout=10) == "hi"
    assert await client.handle(other_id).result(timeout=10) == "yo"
    last = await tasks.echo.trigger("last")  # certainly the newest
    assert await last.result(timeout=10) == "last"
    failed = await tasks.fatal.trigger()
    with pytest.raises(RunFailed):
        await failed.result(timeout=10)

    show, show_json, listed, listed_human, failed_list, other_ns = await asyncio.gather(
        conveyor(settings, "runs", "show", run_id),
        conveyor(settings, "runs", "show", run_id, "--json"),
        conveyor(
            settings, *shlex.split("runs list --task echo --status completed --limit 1 --json")
        ),
        conveyor(settings, "runs", "list", "--task", "echo"),
        conveyor(settings, "runs", "list", "--status", "FAILED", "--json"),
        # --namespace wins over CONVEYOR_NAMESPACE
        conveyor(
            settings,
            *shlex.split(f"--namespace {settings.namespace} runs list --json"),
            env={"CONVEYOR_NAMESPACE": "elsewhere"},
        ),
    )
    assert show.code == 0, show.err
    for line in (
        f"run      {run_id}",
        "task     echo (queue echo)",
        "status   COMPLETED",
        'payload  {"value":"hi"}',
        'output   "hi"',
        "steps    -",
    ):
        assert line in show.out.splitlines(), (line, show.out)
    assert "attempt 1: COMPLETED on " in show.out

    shown = show_json.json()
    assert shown["id"] == run_id and shown["status"] == "COMPLETED" and shown["output"] == "hi"
    assert shown["payload"] == {"value": "hi"}
    assert [a["status"] for a in shown["attempts"]] == ["COMPLETED"]

    assert [r["id"] for r in listed.json()] == [last.id]  # newest first, limited to one
    lines = [line.split() for line in listed_human.out.splitlines()]
    assert lines[0][0] == last.id
    assert sorted(line[0] for line in lines) == sorted([last.id, run_id, other_id])
    assert all(line[1:3] == ["echo", "COMPLETED"] for line in lines)
    assert [r["id"] for r in failed_list.json()] == [failed.id]
    assert {r["id"] for r in other_ns.json()} == {run_id, other_id, last.id, failed.id}


async def test_clear_errors(settings: Settings, client: Client) -> None:
    cases = {
        "not json": (["trigger", "echo", "--payload", "{value: 1}"], {}),
        "not an object": (["trigger", "echo", "--payload", "[1, 2]"], {}),
        "unknown run": (["runs", "show", "run_missing"], {}),
        "too large": (
            ["trigger", "echo", "--payload", '{"value": "' + "x" * 100 + '"}'],
            {"CONVEYOR_MAX_PAYLOAD_BYTES": "64"},
        ),
        "bad variable": (["runs", "list"], {"CONVEYOR_LEASE_TTL": "soon"}),
    }
    results = await asyncio.gather(
        *(conveyor(settings, *args, env=env) for args, env in cases.values())
    )
    got = dict(zip(cases, results, strict=True))
    expected = {
        "not json": (1, "conveyor: --payload is not valid JSON"),
        "not an object": (1, "conveyor: --payload must be a JSON object"),
        "unknown run": (1, "conveyor: no run 'run_missing' in this namespace"),
        "too large": (1, "over the limit of 64 bytes"),
        "bad variable": (1, "conveyor: CONVEYOR_LEASE_TTL='soon' is not valid"),
    }
    for name, (code, message) in expected.items():
        result = got[name]
        assert result.code == code, (name, result)
        assert message in result.err, (name, result.err)
        assert "Traceback" not in result.err, (name, result.err)
    assert (await client.list_runs()).runs == [], "no refused trigger created a run"


@pytest.mark.parametrize(
    ("variable", "value", "detail"),
    [
        ("CONVEYOR_LEASE_TTL", "abc", "Expected `float`, got `str`"),
        ("CONVEYOR_MAX_PAYLOAD_BYTES", "1.5", "Expected `int`, got `str`"),
        ("CONVEYOR_MAX_PAYLOAD_BYTES", "-1", "max_payload_bytes must be positive"),
        ("CONVEYOR_DELIVERY_LIMIT", "0", "delivery_limit must be positive"),
        ("CONVEYOR_SHUTDOWN_GRACE", "-2", "shutdown_grace must be zero or positive"),
        ("CONVEYOR_NAMESPACE", "has space", "namespace 'has space' is not valid"),
        ("CONVEYOR_NAMESPACE", "{braces}", "namespace '{braces}' is not valid"),
    ],
)
def test_settings_from_env_names_the_bad_variable(variable: str, value: str, detail: str) -> None:
    env = {"CONVEYOR_LEASE_TTL": "3", variable: value}
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env)
    assert str(error.value).startswith(f"{variable}={value!r} is not valid: ")
    assert detail in str(error.value)


def test_settings_from_env_reads_and_overrides() -> None:
    env = {
        "CONVEYOR_AMQP_URL": "amqp://u:p@rabbit:5672/vh",
        "CONVEYOR_NAMESPACE": "prod",
        "CONVEYOR_MAX_PAYLOAD_BYTES": "2048",
        "CONVEYOR_LEASE_TTL": "2.5",
        "CONVEYOR_REDIS_URL": "",  # empty means unset
        "OTHER": "ignored",
    }
    settings = Settings.from_env(env, namespace="override", redis_url=None)
    assert settings.amqp_url == "amqp://u:p@rabbit:5672/vh"
    assert settings.redis_url == Settings().redis_url
    assert settings.namespace == "override"
    assert (settings.max_payload_bytes, settings.lease_ttl) == (2048, 2.5)
    assert Settings.from_env({}) == Settings()
    with pytest.raises(ConfigurationError, match="unknown settings: colour"):
        Settings.from_env({}, colour="blue")


def test_argument_errors_and_empty_list(
    settings: Settings, client: Client, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """In process (main() is what the console script calls), to keep the suite fast."""
    args = build_parser().parse_args(["runs", "list", "--status", "timed_out"])
    assert args.status is RunStatus.TIMED_OUT
    for argv, message in (
        (["runs", "list", "--status", "bogus"], "unknown status 'bogus'; use one of QUEUED,"),
        (["runs", "list", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["trigger"], "the following arguments are required: TASK_ID"),
        (["worker", "--concurrency", "0", "tests.tasks"], "must be at least 1, got 0"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("CONVEYOR_NAMESPACE", settings.namespace)
    assert main(["runs", "list", "--task", "no-such-task"]) == 0
    assert capsys.readouterr().out == "no runs\n"


def test_unreachable_services_get_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # 127.0.0.1:1 refuses at once: nothing listens on port 1.
    monkeypatch.setenv("CONVEYOR_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["runs", "list"]) == 1
    err = capsys.readouterr().err
    assert "conveyor: cannot reach RabbitMQ or Redis" in err
    assert "CONVEYOR_REDIS_URL" in err
    assert "Traceback" not in err
