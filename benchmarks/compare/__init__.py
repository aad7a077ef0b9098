"""Side-by-side comparison of conveyor with Celery, Dramatiq and taskiq, and with the raw
limits of aio-pika and redis-py, on the same RabbitMQ and Redis (see benchmarks/README.md).

    python -m benchmarks compare [--quick] [--repeats 3] [--out benchmarks/results]
"""
