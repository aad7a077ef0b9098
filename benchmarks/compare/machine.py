"""What the results were measured on: machine, services, versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import aio_pika
import redis.asyncio as aioredis

from .apps.settings import AppSettings

PACKAGES = ["conveyor", "celery", "kombu", "dramatiq", "pika", "taskiq", "taskiq-aio-pika"]
PACKAGES += ["taskiq-redis", "aio-pika", "aiormq", "redis", "hiredis", "msgspec", "uvloop"]


async def describe(settings: AppSettings) -> dict[str, Any]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        rabbitmq = _text(props.get("version", "?"))
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        redis_version = str((await r.info("server"))["redis_version"])
    finally:
        await r.aclose()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "rabbitmq": rabbitmq,
        "redis": redis_version,
        "packages": {p: _version(p) for p in PACKAGES},
        "commit": _commit(),
        "load_average_start": round(os.getloadavg()[0], 2),
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
