"""The OpenTelemetry SDK for conveyor's own commands, set up from the standard OTEL_*
variables. The library itself uses only the API (shared/tracing.py); this module is the
one place that imports the SDK, and only when tracing is asked for.

Tracing is on when OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_TRACES_EXPORTER is set, unless OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none.
The SDK reads the rest itself (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*,
OTEL_EXPORTER_OTLP_HEADERS, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace

from conveyor.shared.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def wanted(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for (none: tracing stays off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None:
        return ["otlp"] if any(env.get(e) for e in _ENDPOINTS) else []
    return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]


def configure_tracing(default_service: str) -> Callable[[], None] | None:
    """Install a TracerProvider exporting in batches, when the environment asks for it
    and the application has not installed one; returns its shutdown (which flushes what
    is still buffered), else None."""
    env = os.environ
    exporters = wanted(env)
    if not exporters or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise ConfigurationError(
            f"OTEL_* variables ask for traces but the OpenTelemetry SDK is not installed "
            f"({exc}): pip install 'conveyor[otel]'"
        ) from exc
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": default_service})
    )
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            exporter = _otlp(env)
        elif name == "console":
            exporter = ConsoleSpanExporter()
        else:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r}: conveyor knows "
                "otlp, console and none"
            )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _otlp(env: Mapping[str, str]) -> SpanExporter:
    protocol = env.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol not in ("", "http/protobuf"):
        raise ConfigurationError(
            f"OTLP protocol {protocol!r}: conveyor exports OTLP over HTTP only; set "
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and the collector's HTTP port (4318)"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigurationError(
            f"the OTLP exporter is not installed ({exc}): pip install 'conveyor[otel]'"
        ) from exc
    return OTLPSpanExporter()


def join_environment_trace() -> None:
    """Make the trace context in TRACEPARENT, TRACESTATE and BAGGAGE (OpenTelemetry's
    environment carriers) current, so `conveyor trigger` joins the trace of the script
    or job that runs it."""
    from opentelemetry import context, propagate

    carrier = {
        name.lower(): os.environ[name]
        for name in ("TRACEPARENT", "TRACESTATE", "BAGGAGE")
        if os.environ.get(name)
    }
    if carrier:
        context.attach(propagate.extract(carrier))
