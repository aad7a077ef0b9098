"""`python -m benchmarks compare ...` or `python -m benchmarks throughput ...`."""

import sys

USAGE = (
    "usage: python -m benchmarks compare|throughput|ladder|schedules|limits|tracing|results [options]"
    "  (--help after any)"
)


def main() -> int:
    command, *rest = sys.argv[1:] or [""]
    if command == "compare":
        from benchmarks.compare.cli import main as compare

        return compare(rest)
    if command == "ladder":
        from benchmarks.ladder import main as ladder

        return ladder(rest)
    if command == "limits":
        from benchmarks.limits import main as limits

        return limits(rest)
    if command == "results":
        from benchmarks.results import main as results

        return results(rest)
    if command == "schedules":
        from benchmarks.schedules import main as schedules

        return schedules(rest)
    if command == "tracing":
        from benchmarks.tracing import main as tracing

        return tracing(rest)
    if command == "throughput":
        from benchmarks.throughput import main as throughput

        return throughput(rest)
    print(USAGE, file=sys.stderr)
    return 2


sys.exit(main())
