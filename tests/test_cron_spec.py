"""Cron schedules as declared (shared/cron.py): what is refused, and the fire times of
5- and 6-field expressions, intervals and DST changes. Pure: no services."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from conveyor import Cron, InvalidSchedule, TaskDefinitionError, task
from conveyor.shared.cron import spec, tick_run_id


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def fires(
    expression: str, start: datetime, until: datetime, timezone: str = "UTC"
) -> list[datetime]:
    s = spec(expression, timezone, None)
    out, at = [], ms(start)
    while True:
        at = s.next_after(at)
        if at > ms(until):
            return out
        out.append(datetime.fromtimestamp(at / 1000, ZoneInfo(timezone)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"expression": "61 * * * *"}, "expression"),
        ({"expression": "* * *"}, "expression"),
        ({"expression": "0 0 30 2 *"}, "expression"),  # never fires
        ({"expression": "* * * * * * *"}, "expression"),  # 7 fields
        ({"expression": "0 9 * * 1-5", "timezone": "Europe/Pariss"}, "timezone"),
        ({"expression": None}, "expression"),
        ({"expression": "* * * * *", "every": timedelta(minutes=1)}, "expression"),
        ({"every": timedelta(milliseconds=500)}, "every"),
        ({"every": timedelta(minutes=1), "timezone": "Europe/Paris"}, "timezone"),
        ({"expression": "* * * * *", "key": "has space"}, "key"),
    ],
)
def test_bad_schedules_are_refused_when_declared(kwargs: dict[str, object], field: str) -> None:
    expression = kwargs.pop("expression", None)
    with pytest.raises(InvalidSchedule) as caught:
        Cron(expression, **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert field in str(caught.value)


def test_the_decorator_refuses_bad_expressions_and_payloads() -> None:
    with pytest.raises(InvalidSchedule, match="'\\*/5 \\* \\* \\*'"):

        @task(id="cron-bad", cron="*/5 * * *")
        async def bad() -> None: ...

    with pytest.raises(TaskDefinitionError, match="payload"):

        @task(id="cron-bad-payload", cron=Cron("* * * * *", payload={"n": "x"}))
        async def typed(n: int) -> None: ...


def test_the_decorator_takes_strings_crons_and_every() -> None:
    @task(
        id="cron-many",
        cron=["*/5 * * * *", Cron("0 9 * * 1-5", timezone="Europe/Paris", payload={"n": 2})],
        every=timedelta(seconds=30),
    )
    async def many(n: int = 1) -> None: ...

    assert [c.expression for c in many.cron] == ["*/5 * * * *", "0 9 * * 1-5", None]
    assert many.cron[2].every == timedelta(seconds=30)


def test_five_fields_in_a_time_zone() -> None:
    paris = ZoneInfo("Europe/Paris")
    got = fires(
        "0 9 * * 1-5",
        datetime(2026, 6, 5, 12, tzinfo=paris),
        datetime(2026, 6, 10, tzinfo=paris),
        "Europe/Paris",
    )
    assert got == [datetime(2026, 6, d, 9, tzinfo=paris) for d in (8, 9)]


def test_six_fields_put_seconds_first() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    got = fires("*/20 * * * * *", start, start + timedelta(minutes=1))
    assert got == [start + timedelta(seconds=s) for s in (20, 40, 60)]


def test_every_fires_at_multiples_of_the_interval() -> None:
    s = spec(None, "UTC", timedelta(minutes=5))
    start = ms(datetime(2026, 1, 1, 10, 3, 7, tzinfo=UTC))
    first = s.next_after(start)
    assert first == ms(datetime(2026, 1, 1, 10, 5, tzinfo=UTC))
    assert s.next_after(first) == first + 300_000


def test_a_time_in_a_dst_gap_fires_once() -> None:
    # Europe/Paris skips 02:00-03:00 on 29 March 2026: the 02:30 tick fires once, at 03:00.
    paris = ZoneInfo("Europe/Paris")
    got = fires(
        "30 2 * * *",
        datetime(2026, 3, 28, 12, tzinfo=paris),
        datetime(2026, 3, 31, tzinfo=paris),
        "Europe/Paris",
    )
    assert [(d.day, d.hour, d.minute) for d in got] == [(29, 3, 0), (30, 2, 30)]


def test_a_time_in_a_repeated_hour_fires_once() -> None:
    # 02:00-03:00 happens twice on 25 October 2026 in Paris: 02:30 fires the first time only.
    paris = ZoneInfo("Europe/Paris")
    got = fires(
        "30 2 * * *",
        datetime(2026, 10, 24, 12, tzinfo=paris),
        datetime(2026, 10, 27, tzinfo=paris),
        "Europe/Paris",
    )
    assert [(d.day, d.hour, d.minute, d.utcoffset()) for d in got] == [
        (25, 2, 30, timedelta(hours=2)),
        (26, 2, 30, timedelta(hours=1)),
    ]
    # Every 20 minutes: each local time of the repeated hour fires once; all instants differ.
    many = fires(
        "*/20 * * * *",
        datetime(2026, 10, 25, 1, 30, tzinfo=paris),
        datetime(2026, 10, 25, 4, tzinfo=paris),
        "Europe/Paris",
    )
    walls = [d.replace(tzinfo=None) for d in many]
    assert walls == sorted(set(walls))
    assert len({ms(d) for d in many}) == len(many)


def test_a_tick_run_id_is_the_schedule_and_the_scheduled_time() -> None:
    assert tick_run_id("nightly", 1_700_000_000_000) == "cron:nightly:1700000000000"
