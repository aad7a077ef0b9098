"""Trace context and spans of runs, on the OpenTelemetry API alone.

The context (W3C traceparent, tracestate and baggage) rides in the AMQP headers of every
message of a run, and in the run's hash (field `trace`) for the messages rebuilt from it
(the reaper's, a parent's wake-up, a concurrency limit's wake). Spans follow the messaging
semantic conventions: a PRODUCER span per trigger call (`publish {queue}`), a CONSUMER
span per attempt (`process {queue}`) whose parent is the trigger, an INTERNAL span per
step and per wait.

Nothing is recorded unless the application (or `conveyor worker`/`scheduler`, see
conveyor/_telemetry.py) installed a tracer provider: `tracer()` is then None and the hot
paths make no span, no context and no header dict. Context already in a message or a run
is still passed on, which costs nothing when there is none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .errors import describe

TRACEPARENT = "traceparent"
TRACE_HEADERS = (TRACEPARENT, "tracestate", "baggage")
# The traceparent of the attempt that published a retry or resume: the next attempt's span
# links to it.
PREVIOUS_ATTEMPT_HEADER = "x-conveyor-previous-attempt"

Carrier = dict[str, str]

_SCOPE = "conveyor"
_carrier_encoder = msgspec.json.Encoder()
_carrier_decoder = msgspec.json.Decoder(dict[str, str])
_tracecontext = TraceContextTextMapPropagator()
# The provider last looked at and its tracer (None: no SDK, nothing is recorded).
_cached: tuple[object, Tracer | None] = (None, None)


# While no provider is set, get_tracer_provider() looks for one named in os.environ on
# every call: about 1% of a no-op run. The API's global says that none is set without it;
# were it renamed, every call asks get_tracer_provider() again.
_FROM_ENV = OTEL_PYTHON_TRACER_PROVIDER in os.environ
_ASK = object()


def tracer() -> Tracer | None:
    """conveyor's tracer, or None while no tracer provider is installed (the API's proxy
    and no-op providers record nothing). One identity check per call once cached."""
    global _cached
    found = getattr(trace, "_TRACER_PROVIDER", _ASK)
    if found is None and not _FROM_ENV:
        return None
    provider = found if isinstance(found, trace.TracerProvider) else trace.get_tracer_provider()
    if provider is _cached[0]:
        return _cached[1]
    real = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    _cached = (provider, provider.get_tracer(_SCOPE) if real else None)
    return _cached[1]


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads AMQP header values, which pamqp decodes to str (or bytes when not UTF-8)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [str(k) for k in carrier]


_getter = _HeaderGetter()


def forward(headers: Mapping[str, Any]) -> Carrier | None:
    """The trace headers of a delivered message, to pass on to the messages it leads to."""
    if TRACEPARENT not in headers and "baggage" not in headers:
        return None
    carrier = {}
    for name in TRACE_HEADERS:
        got = _getter.get(headers, name)
        if got:
            carrier[name] = got[0]
    return carrier or None


def current_carrier() -> Carrier | None:
    """The caller's context as headers when it has a valid span (context that an
    application without an SDK extracted and passes on), else None."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: Carrier = {}
    propagate.inject(carrier)
    return carrier


def carrier_of(span: Span) -> Carrier:
    """Headers that make `span` the parent of what receives them (baggage: the caller's)."""
    carrier: Carrier = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def pack(carrier: Carrier | None) -> str:
    """A carrier as the run hash keeps it ('' for none)."""
    return _carrier_encoder.encode(carrier).decode() if carrier else ""


def unpack(packed: bytes | str | None) -> Carrier | None:
    """The carrier kept in a run hash, or None; a damaged one is ignored."""
    if not packed:
        return None
    try:
        return _carrier_decoder.decode(packed) or None
    except msgspec.DecodeError:
        return None


def woken_headers(trace: bytes, last_attempt: bytes) -> Carrier | None:
    """The headers of a suspended run's wake-up: its trigger's context and a link to the
    attempt that suspended (both kept in its hash)."""
    carrier = unpack(trace)
    if last_attempt:
        carrier = {**(carrier or {}), PREVIOUS_ATTEMPT_HEADER: last_attempt.decode()}
    return carrier


def _messaging(operation: str, kind: str, queue: str) -> dict[str, Any]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": operation,
        "messaging.operation.type": kind,
        "messaging.destination.name": queue,
        "messaging.rabbitmq.destination.routing_key": queue,
    }


def start_publish(tracer: Tracer, queue: str, task_id: str, run_ids: Sequence[str]) -> Span:
    """The PRODUCER span of one trigger call, in the caller's current trace. A batch gets
    one span (the semantic conventions' single "send" span of a batch), whose context all
    its messages carry, so every run of the batch is its child."""
    attributes = _messaging("publish", "send", queue)
    attributes["conveyor.task.id"] = task_id
    if len(run_ids) == 1:
        attributes["messaging.message.id"] = run_ids[0]
        attributes["conveyor.run.id"] = run_ids[0]
    else:
        attributes["messaging.batch.message_count"] = len(run_ids)
    return tracer.start_span(f"publish {queue}", kind=SpanKind.PRODUCER, attributes=attributes)


@contextlib.contextmanager
def publishing(queue: str, task_id: str, run_ids: Sequence[str]) -> Iterator[Carrier | None]:
    """The headers for a trigger's messages: under its PRODUCER span when tracing is on
    (ended, with the error if the trigger failed), else the caller's context, if any."""
    tracer_ = tracer()
    if tracer_ is None:
        yield current_carrier()
        return
    span = start_publish(tracer_, queue, task_id, run_ids)
    try:
        yield carrier_of(span)
    except BaseException as exc:
        fail(span, exc)
        raise
    finally:
        span.end()


def fail(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, describe(exc)))


class AttemptSpan:
    """The CONSUMER span of one attempt, current while the attempt runs. Its parent is the
    trigger's context from the message; it links to the attempt that published the
    message (a retry, a resume) when that one was traced."""

    __slots__ = ("headers", "span", "token")

    def __init__(
        self,
        tracer: Tracer,
        headers: Mapping[str, Any],
        run_id: str,
        task_id: str,
        queue: str,
        attempt: int,
    ) -> None:
        # Each attempt's span costs a worker about a third of a no-op run here (the SDK's
        # share is most of it): no extraction for a message without context.
        traced = TRACEPARENT in headers or "baggage" in headers
        parent = propagate.extract(headers, getter=_getter) if traced else None
        links = []
        previous = _getter.get(headers, PREVIOUS_ATTEMPT_HEADER) if traced else None
        if previous:
            linked = _tracecontext.extract({TRACEPARENT: previous[0]})
            span_context = trace.get_current_span(linked).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        attributes = _messaging("process", "process", queue)
        attributes.update(
            {
                "messaging.message.id": run_id,
                "conveyor.run.id": run_id,
                "conveyor.task.id": task_id,
                "conveyor.attempt": attempt,
                "conveyor.queue": queue,
            }
        )
        self.span = tracer.start_span(
            f"process {queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        self.token = otel_context.attach(trace.set_span_in_context(self.span, parent))
        self.headers = headers

    def traceparent(self) -> str:
        own = self.span.get_span_context()
        return f"00-{own.trace_id:032x}-{own.span_id:016x}-{own.trace_flags:02x}"

    def next_headers(self) -> Carrier:
        """Headers of a retry or resume this attempt publishes: the trigger's context (for
        a run that came without one, this attempt's, so later attempts join its trace)
        and a link to this attempt."""
        carrier = forward(self.headers) or carrier_of(self.span)
        return {**carrier, PREVIOUS_ATTEMPT_HEADER: self.traceparent()}

    def ended(self, attempt_status: str, error: str, traceback: str) -> None:
        """Record how the attempt ended (unless it completed, the common case); a failure
        as the exception with its stack trace and status ERROR."""
        if attempt_status != "COMPLETED":
            self.span.set_attribute("conveyor.attempt.status", attempt_status)
        if traceback:
            kind, _, message = error.partition(": ")
            self.span.add_event(
                "exception",
                {
                    "exception.type": kind,
                    "exception.message": message,
                    "exception.stacktrace": traceback,
                },
            )
            self.span.set_status(Status(StatusCode.ERROR, error))

    def end(self) -> None:
        otel_context.detach(self.token)
        self.span.end()


class InternalSpan:
    """A step's or a wait's span, current while it runs."""

    __slots__ = ("span", "token")

    def __init__(self, tracer: Tracer, name: str, attributes: dict[str, Any]) -> None:
        self.span = tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes)
        self.token = otel_context.attach(trace.set_span_in_context(self.span))

    def fail(self, exc: BaseException) -> None:
        fail(self.span, exc)

    def end(self) -> None:
        otel_context.detach(self.token)
        self.span.end()


def replayed(tracer: Tracer, name: str, attributes: dict[str, Any]) -> None:
    """A span for a step or wait whose saved result was returned."""
    attributes["conveyor.step.replayed"] = True
    tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes).end()
