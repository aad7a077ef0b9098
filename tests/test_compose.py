"""compose.yaml and the Dockerfile, checked without a Docker engine: the worker's command
parses with the real CLI, images are pinned, services wait for healthy dependencies."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from conveyor import Settings, registered_tasks
from conveyor.cli import build_parser
from tests.conftest import ROOT

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def check_worker_command(argv: list[str]) -> None:
    assert argv[0] == "conveyor", argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == "worker"
    for module in args.modules:
        imported = importlib.import_module(module)
        defined = [t for t in registered_tasks().values() if t.fn.__module__ == imported.__name__]
        assert defined, f"{module} defines no tasks for the worker to run"


def test_expected_services(compose: dict[str, Any]) -> None:
    assert {"rabbitmq", "redis", "worker"} <= set(services(compose))


def test_two_scheduler_replicas_beside_the_worker(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    schedulers = [
        s for s in all_services.values() if as_argv(s.get("command", []))[1:2] == ["scheduler"]
    ]
    assert len(schedulers) == 2
    for scheduler in schedulers:
        argv = as_argv(scheduler["command"])
        assert argv[0] == "conveyor"
        args = build_parser().parse_args(argv[1:])
        for module in args.modules:
            importlib.import_module(module)
        # The same settings as the worker: it republishes to the worker's queues.
        assert scheduler["environment"] == all_services["worker"]["environment"]
        assert set(scheduler["depends_on"]) == {"rabbitmq", "redis"}


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        image = service.get("image")
        if "build" in service:
            continue  # built here; its base image is checked in the Dockerfile
        assert image, f"service {name} has neither image nor build"
        repository, _, tag = image.rpartition(":")
        assert repository and re.match(r"\d+\.\d+\.\d+", tag), f"{name}: pin {image} to a version"
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert bases, "the Dockerfile has no FROM line"
    for base in bases:
        assert re.search(r":\d+\.\d+\.\d+", base), f"Dockerfile: pin {base} to a version"


def test_rabbitmq_has_the_management_ui(compose: dict[str, Any]) -> None:
    rabbit = services(compose)["rabbitmq"]
    assert "management" in rabbit["image"]
    assert any(str(p).endswith(":15672") for p in rabbit.get("ports", []))


def test_redis_keeps_run_state(compose: dict[str, Any]) -> None:
    argv = as_argv(services(compose)["redis"]["command"])
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "redis-server"
    assert pairs.get("--appendonly") == "yes"
    assert pairs.get("--maxmemory-policy") == "noeviction"


def test_dependencies_wait_until_healthy(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    for name in ("rabbitmq", "redis"):
        test = all_services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} needs a healthcheck"
    for name, service in all_services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use depends_on with conditions"
        for dependency, rule in depends.items():
            assert rule.get("condition") == "service_healthy", f"{name} -> {dependency}"
            assert all_services[dependency].get("healthcheck"), dependency
    assert set(all_services["worker"]["depends_on"]) == {"rabbitmq", "redis"}


def test_worker_command_matches_the_cli(compose: dict[str, Any]) -> None:
    check_worker_command(as_argv(services(compose)["worker"]["command"]))
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert cmd, "the Dockerfile needs an exec-form CMD"
    check_worker_command(yaml.safe_load(cmd.group(1)))


def test_worker_environment_is_valid_settings(compose: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in services(compose)["worker"]["environment"].items()}
    for key in env:
        if key.startswith("CONVEYOR_"):
            field = key.removeprefix("CONVEYOR_").lower()
            assert field in Settings.__struct_fields__, f"{key} is not a conveyor setting"
    settings = Settings.from_env(env)
    assert "@rabbitmq:" in settings.amqp_url and "//redis:" in settings.redis_url


def test_worker_and_schedulers_export_traces_to_jaeger(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    jaeger = all_services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {str(p).rsplit(":", 1)[-1] for p in jaeger["ports"]} >= {"16686", "4318"}
    for name, service in all_services.items():
        if as_argv(service.get("command", []))[1:2] in (["worker"], ["scheduler"]):
            env = service["environment"]
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
    assert "'.[otel]'" in DOCKERFILE.read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file() -> None:
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
