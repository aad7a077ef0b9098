"""benchmarks/results/latest.md, the chart and the headline, from one run's figures.

Every figure is the median over the repeats with its spread (min-max); every ratio is
taken between medians of the same run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PEERS = ("celery", "dramatiq", "taskiq")
FANOUT_HOW = {
    "conveyor": "`batch_trigger_and_wait()` in the parent task, which is suspended (no slot "
    "held) and replayed once the last child ended",
    "celery": "a chord (group of children, callback), Redis result backend",
    "dramatiq": "a group, `get_results(block=True)` in the parent actor (it holds one of the "
    "8 threads), Redis Results backend",
    "taskiq": "`kiq()` of every child at once, then `wait_result()` on each in turn (10 ms "
    "polls), Redis result backend",
}
Key = tuple[str, str, str]  # scenario, system, variant


class Figures:
    """The repeats of one run, grouped by (scenario, system, variant)."""

    def __init__(self, results: Iterable[Mapping[str, Any]]) -> None:
        self.values: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.methods: dict[Key, str] = {}
        for r in results:
            key = (r["scenario"], r["system"], r["variant"])
            for name, value in r["figures"].items():
                self.values[key][name].append(value)
            self.methods[key] = r.get("method", "")

    def get(self, scenario: str, system: str, variant: str, name: str) -> float | None:
        values = self.values.get((scenario, system, variant), {}).get(name)
        return statistics.median(values) if values else None

    def cell(self, scenario: str, system: str, variant: str, name: str, fmt: str) -> str:
        values = self.values.get((scenario, system, variant), {}).get(name)
        if not values:
            return "-"
        text = format(statistics.median(values), fmt)
        if len(values) > 1:
            text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
        return text

    def keys(self, scenario: str) -> list[Key]:
        return [k for k in self.values if k[0] == scenario]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _best(values: Mapping[str, float | None], highest: bool = True) -> tuple[str, float | None]:
    known = {k: v for k, v in values.items() if v is not None}
    if not known:
        return "-", None
    name = (max if highest else min)(known, key=lambda k: known[k])
    return name, known[name]


def targets(f: Figures) -> list[tuple[str, str, str, bool | None]]:
    """(target, how it came out, ratio, met) for each target of the issue."""
    rows: list[tuple[str, str, str, bool | None]] = []

    def add(
        target: str, detail: str, ratio: float | None, needed: float, lower: bool = False
    ) -> None:
        met = None if ratio is None else (ratio <= needed if lower else ratio >= needed)
        rows.append((target, detail, "-" if ratio is None else f"{ratio:.2f}x", met))

    ours = f.get("drain", "conveyor", "1 worker", "tasks_per_s")
    for peer, needed in (("celery", 1.5), ("dramatiq", 1.0)):
        theirs = f.get("drain", peer, "1 worker", "tasks_per_s")
        add(
            f"drain, 1 worker: conveyor >= {needed}x {peer}",
            f"{_n(ours)} vs {_n(theirs)} tasks/s",
            _ratio(ours, theirs),
            needed,
        )
    theirs = f.get("drain", "taskiq", "1 worker", "tasks_per_s")
    add(
        "drain, 1 worker: conveyor vs taskiq (no target)",
        f"{_n(ours)} vs {_n(theirs)} tasks/s",
        _ratio(ours, theirs),
        0.0,
    )
    # The reference figure for Celery is prefork with 2 pool processes.
    theirs = f.get("drain", "celery", "2 workers", "tasks_per_s")
    if theirs is not None:
        add(
            "drain: conveyor, 1 worker >= 1.5x celery with 2 pool processes",
            f"{_n(ours)} vs {_n(theirs)} tasks/s",
            _ratio(ours, theirs),
            1.5,
        )
    for peer in PEERS:
        theirs = f.get("drain", peer, "1 worker, result backend", "tasks_per_s")
        if theirs is not None:
            add(
                f"drain, 1 worker: conveyor vs {peer} with its Redis result backend (no target)",
                f"{_n(ours)} vs {_n(theirs)} tasks/s",
                _ratio(ours, theirs),
                0.0,
            )
    enqueue = {p: f.get("drain", p, "1 worker", "enqueue_per_s") for p in PEERS}
    best_peer, best_enqueue = _best(enqueue)
    raw_publish = f.get("raw-amqp", "aio-pika", "quorum", "publish_per_s")
    for variant, method in (("1 worker", "batch_trigger"), ("2 workers", "trigger")):
        rate = f.get("drain", "conveyor", variant, "enqueue_per_s")
        if rate is None:
            continue
        add(
            f"enqueue: conveyor {method}() >= 1.5x the best peer ({best_peer})",
            f"{_n(rate)} vs {_n(best_enqueue)} tasks/s",
            _ratio(rate, best_enqueue),
            1.5,
        )
        add(
            f"enqueue: conveyor {method}() >= 60% of raw confirmed publishes (quorum)",
            f"{_n(rate)} vs {_n(raw_publish)} msgs/s",
            _ratio(rate, raw_publish),
            0.6,
        )
    for pct in ("p50", "p99"):
        name = f"{pct}_ms"
        ours_ms = f.get("latency", "conveyor", "quorum", name)
        peers = {p: _latency(f, p, name) for p in PEERS}
        best, best_ms = _best(peers, highest=False)
        add(
            f"latency {pct}: conveyor <= the best peer ({best})",
            f"{_ms(ours_ms)} vs {_ms(best_ms)}",
            _ratio(ours_ms, best_ms),
            1.0,
            lower=True,
        )
        same_queue = {
            p: _latency(f, p, name) for p in PEERS if (_queue_types(f).get(p) == "quorum")
        }
        best_q, best_q_ms = _best(same_queue, highest=False)
        if best_q_ms is not None and best_q != best:
            add(
                f"latency {pct}: conveyor vs the best peer on a quorum queue ({best_q}) (no target)",
                f"{_ms(ours_ms)} vs {_ms(best_q_ms)}",
                _ratio(ours_ms, best_q_ms),
                1.0,
                lower=True,
            )
        raw_ms = f.get("latency", "aio-pika", "quorum", name)
        add(
            f"latency {pct}: conveyor <= 2x raw aio-pika on a quorum queue",
            f"{_ms(ours_ms)} vs {_ms(raw_ms)}",
            _ratio(ours_ms, raw_ms),
            2.0,
            lower=True,
        )
    chains = {p: f.get("chain", p, "1 worker", "chains_per_s") for p in PEERS}
    best, best_chains = _best(chains)
    ours_chains = f.get("chain", "conveyor", "1 worker", "chains_per_s")
    add(
        f"3 checkpointed steps: conveyor >= the best peer's 3 chained tasks ({best})",
        f"{_n(ours_chains)} vs {_n(best_chains)} runs/s",
        _ratio(ours_chains, best_chains),
        1.0,
    )
    fanouts = {p: f.get("fanout", p, "1 worker", "children_per_s") for p in PEERS}
    best, best_fanout = _best(fanouts)
    ours_fanout = f.get("fanout", "conveyor", "1 worker", "children_per_s")
    add(
        f"fan-out: conveyor >= 3x the best peer ({best})",
        f"{_n(ours_fanout)} vs {_n(best_fanout)} children/s",
        _ratio(ours_fanout, best_fanout),
        3.0,
    )
    return rows


def _latency(f: Figures, system: str, name: str) -> float | None:
    for key in f.keys("latency"):
        if key[1] == system:
            return f.get(*key, name)
    return None


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def headline(data: Mapping[str, Any]) -> str:
    lines = ["Targets (ratios of medians from this run):"]
    for target, detail, ratio, met in targets(Figures(data["results"])):
        mark = {True: "met", False: "MISSED", None: ""}[met] if "no target" not in target else ""
        lines.append(f"  {ratio:>7}  {mark:6}  {target}: {detail}")
    return "\n".join(lines)


def markdown(data: Mapping[str, Any], chart: str, analysis: Path | None = None) -> str:
    """The results file; `analysis` (hand-written: where the time goes, from profiles) is
    included as it is."""
    m, plan = data["machine"], data["plan"]
    f = Figures(data["results"])
    sizes = plan["sizes"]
    systems = plan["systems"]
    out = [
        "# conveyor side by side with Celery, Dramatiq and taskiq",
        "",
        f"Written by `python -m benchmarks compare` on {m['date']}, commit {m['commit']}.",
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}; "
        f"RabbitMQ {m['rabbitmq']} and Redis {m['redis']} on the same machine; "
        f"Python {m['python']}. Load average {m['load_average_start']} at the start, "
        f"{m['load_average_end']} at the end; the run took {m['duration_s']} s.",
        "",
        f"Each figure is the median of {sizes['repeats']} repeat(s)"
        + (" with the spread (min-max) in brackets" if sizes["repeats"] > 1 else "")
        + "; the systems ran one after another within each repeat (A B C D, A B C D, ...). "
        "How each figure is measured and each system's settings: benchmarks/README.md.",
        "",
        f"![drain rate and latency per system]({chart})",
        "",
        "## Targets",
        "",
        "| target | figures | ratio | met |",
        "|---|---|---|---|",
    ]
    for target, detail, ratio, met in targets(f):
        shown = "" if "no target" in target else {True: "yes", False: "**no**", None: "-"}[met]
        out.append(f"| {target} | {detail} | {ratio} | {shown} |")

    raw_consume = _raw_by_queue_type(f, "consume_per_s")
    out += [
        "",
        f"## Drain: {sizes['drain']:,} no-op tasks enqueued, then drained",
        "",
        "Tasks/s from the first task's start to the last one's; the last column is the "
        "one-worker figure as a share of raw aio-pika consumes on the same queue type.",
        "",
        "| system | queue | 1 worker | 2 workers | 1 worker, Redis result backend | share of raw consume |",
        "|---|---|---|---|---|---|",
    ]
    queue_types = _queue_types(f)
    for system in systems:
        qt = queue_types.get(system, "?")
        one = f.get("drain", system, "1 worker", "tasks_per_s")
        share = _ratio(one, raw_consume.get(qt))
        backend = (
            "always (run state)"
            if system == "conveyor"
            else f.cell("drain", system, "1 worker, result backend", "tasks_per_s", ",.0f")
        )
        out.append(
            f"| {system} | {qt} | {f.cell('drain', system, '1 worker', 'tasks_per_s', ',.0f')} "
            f"| {f.cell('drain', system, '2 workers', 'tasks_per_s', ',.0f')} | {backend} "
            f"| {'-' if share is None else f'{share:.0%}'} |"
        )

    raw_publish = _raw_by_queue_type(f, "publish_per_s")
    out += [
        "",
        f"## Enqueue: the {sizes['drain']:,} tasks of each drain, no worker running",
        "",
        "| system | how | tasks/s | share of raw confirmed publishes |",
        "|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(systems)}
    for key in sorted(f.keys("drain"), key=lambda k: (order.get(k[1], 99), k[2])):
        _, system, variant = key
        if "backend" in variant:
            continue
        if system != "conveyor" and variant != "1 worker":
            continue  # a peer enqueues the same way for every drain
        rate = f.get("drain", system, variant, "enqueue_per_s")
        share = _ratio(rate, raw_publish.get(queue_types.get(system, "")))
        out.append(
            f"| {system} | {_method(f.methods[key])} "
            f"| {f.cell('drain', system, variant, 'enqueue_per_s', ',.0f')} "
            f"| {'-' if share is None else f'{share:.0%}'} |"
        )

    out += [
        "",
        f"## Latency: {sizes['latency']:,} tasks at a steady {sizes['rate']:.0f}/s, "
        "trigger-to-start",
        "",
        "From the start of the trigger call to the start of the task function, one worker.",
        "",
        "| system | queue | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for key in f.keys("latency"):
        _, system, variant = key
        cells = " | ".join(f.cell(*key, n, ".2f") for n in ("p50_ms", "p95_ms", "p99_ms"))
        label = "raw aio-pika" if system == "aio-pika" else system
        out.append(f"| {label} | {variant} | {cells} |")

    out += [
        "",
        f"## Three steps: {sizes['chains']:,} runs, one worker",
        "",
        "conveyor: one task calling three checkpointed steps. Peers: three tasks, each "
        "enqueueing the next. Runs/s from the first run's first call to the last run's last.",
        "",
        "| system | runs/s |",
        "|---|---|",
    ]
    for system in systems:
        out.append(f"| {system} | {f.cell('chain', system, '1 worker', 'chains_per_s', ',.0f')} |")

    out += [
        "",
        f"## Fan-out: one parent, {sizes['fanout']:,} children, results collected, one worker",
        "",
        "Children/s from the parent's start to the moment it holds every child's result; "
        "the last column is that moment minus the last child's start.",
        "",
        "| system | how the parent collects | children/s | last child to all results, ms |",
        "|---|---|---|---|",
    ]
    for system in systems:
        out.append(
            f"| {system} | {FANOUT_HOW.get(system, '-')} "
            f"| {f.cell('fanout', system, '1 worker', 'children_per_s', ',.0f')} "
            f"| {f.cell('fanout', system, '1 worker', 'collect_ms', ',.1f')} |"
        )

    out += [
        "",
        "## Raw limits",
        "",
        "| what | classic | quorum |",
        "|---|---|---|",
        f"| aio-pika confirmed publishes/s ({sizes['raw_messages']:,} persistent, 500 in flight) "
        f"| {f.cell('raw-amqp', 'aio-pika', 'classic', 'publish_per_s', ',.0f')} "
        f"| {f.cell('raw-amqp', 'aio-pika', 'quorum', 'publish_per_s', ',.0f')} |",
        f"| aio-pika consumes/s (prefetch 100, each acked) "
        f"| {f.cell('raw-amqp', 'aio-pika', 'classic', 'consume_per_s', ',.0f')} "
        f"| {f.cell('raw-amqp', 'aio-pika', 'quorum', 'consume_per_s', ',.0f')} |",
        "",
        f"redis-py pipelined HSET (pipelines of 1,000): "
        f"{f.cell('raw-redis', 'redis-py', 'pipelined HSET', 'hset_per_s', ',.0f')} ops/s.",
    ]
    if analysis is not None and analysis.exists():
        out += ["", analysis.read_text().strip()]
    out += ["", "## Versions", "", "| package | version |", "|---|---|"]
    out += [f"| {p} | {v} |" for p, v in m["packages"].items()]
    return "\n".join(out) + "\n"


def _raw_by_queue_type(f: Figures, name: str) -> dict[str, float | None]:
    return {t: f.get("raw-amqp", "aio-pika", t, name) for t in ("classic", "quorum")}


def _queue_types(f: Figures) -> dict[str, str]:
    return {key[1]: key[2] for key in f.keys("latency") if key[1] != "aio-pika"}


def _method(method: str) -> str:
    return {
        "batch_trigger": "`batch_trigger()`, 500 per call",
        "trigger": "`trigger()`, 256 concurrent calls",
        "threads": "one call at a time in each of 8 threads",
        "lanes": "`kiq()`, 256 concurrent calls",
    }.get(method, method)


def chart(data: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = Figures(data["results"])
    systems = data["plan"]["systems"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    variants = ["1 worker", "2 workers", "1 worker, result backend"]
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        medians, low, high = [], [], []
        for system in systems:
            values = f.values.get(("drain", system, variant), {}).get("tasks_per_s", [])
            mid = statistics.median(values) if values else 0.0
            medians.append(mid)
            low.append(mid - min(values) if values else 0.0)
            high.append(max(values) - mid if values else 0.0)
        xs = [x + (i - 1) * width for x in range(len(systems))]
        label = variant + (" (conveyor: always)" if "backend" in variant else "")
        left.bar(xs, medians, width, yerr=[low, high], capsize=3, label=label)
    left.set_xticks(range(len(systems)), systems)
    left.set_ylabel("no-op tasks/s")
    left.set_title("Drain")
    left.legend(fontsize=8)

    labels, p50, p99 = [], [], []
    for key in f.keys("latency"):
        labels.append(f"raw {key[2]}" if key[1] == "aio-pika" else key[1])
        p50.append(f.get(*key, "p50_ms") or 0.0)
        p99.append(f.get(*key, "p99_ms") or 0.0)
    positions = range(len(labels))
    right.bar([x - 0.2 for x in positions], p50, 0.4, label="p50")
    right.bar([x + 0.2 for x in positions], p99, 0.4, label="p99")
    right.set_xticks(list(positions), labels, rotation=20)
    right.set_ylabel("ms, trigger to start")
    right.set_title(f"Latency at {data['plan']['sizes']['rate']:.0f} tasks/s")
    right.legend(fontsize=8)
    fig.suptitle(f"{data['machine']['date']}, {data['machine']['cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
