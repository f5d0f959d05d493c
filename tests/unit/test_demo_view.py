"""The demo's live view fits the terminal it is in, and its figures say what they count."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from cityflux.analytics.alerts import Alert
from cityflux.cli.demo_figures import Counted, Points, Published, Reconciliation
from cityflux.cli.demo_view import Frame, SegmentRow, TpiRow, render
from cityflux.cli.simulate import make_simulation

DISTRICTS = ("d01", "d02", "d03", "d04")


def alert(number: int) -> Alert:
    return Alert(
        id=number, rule="detector_stuck", entity=f"det-{number:05d}-lane2", district="d01",
        severity="minor", value=48.0, started_ns=0, updated_ns=0,
        message="speed unchanged for 48 intervals: excluded from the indices",
    )  # fmt: skip


def frame(alerts: int = 40, analytics: bool = True) -> Frame:
    figures = Reconciliation(
        Published(messages=78_616, wills=0, births=616, malformed=0, sent_twice=0),
        Counted(received=78_791, acked=78_791, own=175, landed=78_616, rejected=0,
                written=217_459, spooled=0),
    )  # fmt: skip
    return Frame(
        scenario="rush-hour-incident", clock="08:12", elapsed_s=75.0, rate=512.0,
        devices=616, online=600, figures=figures,
        published_by_district={d: 19_654 for d in DISTRICTS},
        stored={d: {"pole": 9_000, "manhole": 900, "traffic": 21_600} for d in DISTRICTS},
        rejections={"schema": 3, "out_of_range": 2}, analytics=analytics,
        tpi={d: TpiRow(6.4, "heavy", 0.31, 0.42) for d in (*DISTRICTS, "city")},
        segments=[SegmentRow(f"seg-{i:05d}", "forward", 8.1, 15.0, "F") for i in range(5)],
        alerts=[alert(200 - i) for i in range(alerts)],
    )  # fmt: skip


def draw(shown: Frame, width: int, height: int) -> list[str]:
    console = Console(width=width, height=height, file=io.StringIO(), color_system=None)
    console.print(render(shown, console))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return str(text).splitlines()


def test_80x24_shows_the_districts_their_congestion_and_alerts_without_cutting() -> None:
    lines = draw(frame(), 80, 24)
    text = "\n".join(lines)
    assert len(lines) <= 23, text  # the cursor's line below: nothing scrolls or is cut
    assert max(len(line) for line in lines) <= 80
    assert "..." not in text
    assert "districts: messages published, points stored, congestion" in text
    for district in DISTRICTS:
        assert any(line.split()[:1] == [district] and "heavy" in line for line in lines), text
    assert "rejections by reason: out_of_range 2 · schema 3" in text
    assert "devices online 600/616" in text
    shown = [line for line in lines if "det-" in line]
    assert len(shown) >= 5 and f"active alerts (40, {len(shown)} shown)" in text
    assert shown[0].split()[0] == "200"  # ids are not squeezed out
    assert "most congested segments: seg-00000 forward TPI 8.1 LOS F · seg-00001" in text
    assert "segment  direction" not in text  # no room for the table at this height


def test_160x50_adds_the_long_tables_and_more_alerts() -> None:
    lines = draw(frame(), 160, 50)
    text = "\n".join(lines)
    assert len(lines) <= 49
    for title in ("cityflux demo: rush-hour-incident", "per district: messages published",
                  "congestion (GB/T 33171 TPI", "most congested segments",
                  "rejections by reason", "active alerts (40, "):  # fmt: skip
        assert title in text, title
    small = draw(frame(), 80, 24)
    assert sum("det-" in line for line in lines) > sum("det-" in line for line in small)
    assert "messages received (+ cityflux's own)" in text and "78,791 (175)" in text


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 30), (132, 43), (160, 50)])
def test_every_size_fits_with_few_or_many_alerts(width: int, height: int) -> None:
    for alerts in (0, 3, 300):
        assert len(draw(frame(alerts), width, height)) <= height - 1
    lines = draw(frame(analytics=False), width, height)
    assert not any("alerts" in line or "TPI" in line for line in lines)


def test_the_reconciliation_line_says_whether_it_adds_up() -> None:
    published = Published(messages=49_432, wills=29, births=521, malformed=273, sent_twice=458)
    counted = Counted(received=50_003, acked=50_003, own=542, landed=49_188, rejected=273,
                      written=141_888, spooled=0)  # fmt: skip
    figures = Reconciliation(published, counted)
    assert figures.adds_up and figures.unexplained == 0
    assert figures.line() == (
        "published 49,461 = landed 49,188 + rejected 273 (+ 0 duplicates after redelivery)"
    )
    lost = Reconciliation(published, Counted(50_002, 50_002, 542, 49_187, 273, 141_887, 0))
    assert not lost.adds_up and lost.unexplained == -1
    assert "published 49,461 != landed 49,187 + rejected 273" in lost.line()
    redelivered = Reconciliation(published, Counted(50_103, 50_003, 542, 49_188, 273, 0, 0))
    assert redelivered.counted.redelivered == 100 and redelivered.adds_up


def test_points_by_what_they_are() -> None:
    stored = {"pole": 36_000, "manhole": 3_600, "traffic": 86_400, "device_status": 616,
              "traffic_segment": 75_264, "traffic_district": 1_470, "air_quality": 6_960,
              "noise": 6_960, "cityflux_alert": 157, "cityflux_pipeline": 15}  # fmt: skip
    points = Points(written=217_459, stored=stored)
    assert points.readings == 126_616
    assert points.part("analytics") == 90_654 and points.part("alerts") == 157
    assert points.part("health") == 15 and points.part("dead letters") == 0
    assert points.rewritten == 17


def test_births_and_wills_as_the_simulation_sends_them() -> None:
    """The births term (retained births, births on the devices' own connections, births on
    reconnecting) read off the simulator's counts equals what its ticks hold."""
    sim = make_simulation("device-failure", speed=math.inf, duration_s=2_100)
    own = len(sim.faults.own_connection)
    start = sim.births()
    births = sum(retain for _, _, retain in start.messages) + own
    messages, wills = len(start.messages) + own, 0
    for tick in sim.ticks():
        wills += len(tick.disconnect)
        births += len(tick.reconnect)
        messages += len(tick.messages) + len(tick.reconnect)
    published = Published.of(sim, messages, wills)
    assert wills > 0 and own > 0  # the scenario's outages start within the run
    assert published.births == births
    assert published.total == messages + wills
    assert published.malformed == sum(sim.expected.rejections.values()) > 0
    assert published.sent_twice == sim.expected.duplicates > 0
