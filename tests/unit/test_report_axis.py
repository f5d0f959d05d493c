"""The scenario report's charts: one time axis, ticks on round local times."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from cityflux.simulators import report

START_MS = 1_764_370_800_000  # 2025-11-29 07:00 at UTC+8


@pytest.mark.parametrize(
    ("span_min", "step", "labels"),
    [
        (150, 15, ["07:00", "07:15", "07:30"]),  # the rush hour: 2.5 h
        (30, 5, ["07:00", "07:05", "07:10"]),
        (4 * 60, 30, ["07:00", "07:30", "08:00"]),
        (24 * 60, 180, ["09:00", "12:00", "15:00"]),  # 07:00 is not on a 3-hour boundary
    ],
)
def test_ticks_fall_on_round_local_times(span_min: int, step: int, labels: list[str]) -> None:
    assert report._tick_step_min(span_min * 60_000) == step
    figures = {"start_ms": START_MS, "utc_offset_h": 8.0}
    figure, axis = plt.subplots()
    report._time_axis(axis, figures, START_MS + span_min * 60_000)
    figure.canvas.draw()
    shown = [t.get_text() for t in axis.get_xticklabels() if t.get_text()]
    plt.close(figure)
    assert shown[: len(labels)] == labels
    assert len(shown) <= 11


def test_both_panels_share_the_axis() -> None:
    figures = {
        "start_ms": START_MS, "end_ms": START_MS + 3_600_000, "utc_offset_h": 8.0,
        "district_tpi": {"d01": [[START_MS + 60_000, 2.0], [START_MS + 3_660_000, 3.0]]},
        "truth": [{"type": "incident", "start_ms": START_MS + 600_000,
                   "end_ms": START_MS + 1_200_000}],
        "alerts": [{"rule": "traffic_incident", "severity": "major",
                    "started_ns": (START_MS + 700_000) * 10**6, "cleared_ns": 0}],
    }  # fmt: skip
    captured: list[object] = []
    original = report._png
    report._png = lambda figure: captured.append(figure) or original(figure)  # type: ignore[func-returns-value]
    try:
        assert report.timeline_plot(figures).startswith("data:image/png;base64,")
    finally:
        report._png = original
    top, bottom = captured[0].axes  # type: ignore[attr-defined]
    assert top.get_shared_x_axes().joined(top, bottom)
    # the last closed window (a minute after the end) is on the axis too
    assert bottom.get_xlim() == (START_MS / 86_400_000, (START_MS + 3_660_000) / 86_400_000)
