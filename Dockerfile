# The conveyor worker image used by compose.yaml: the package plus the demo tasks.
FROM python:3.11.9-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY conveyor conveyor
COPY shared shared
COPY broker broker
COPY worker worker
COPY scheduler scheduler
# [otel]: the OpenTelemetry SDK and OTLP exporter, used when OTEL_* asks for traces
RUN pip install --no-cache-dir '.[otel]' && rm -rf /src

# Task modules are imported from the working directory (`conveyor worker examples.video_pipeline`).
WORKDIR /app
COPY examples examples
USER nobody
CMD ["conveyor", "worker", "examples.video_pipeline"]
