"""The worker process: consume, execute, checkpoint, retry, hand back on shutdown."""

from .worker import Worker

__all__ = ["Worker"]
