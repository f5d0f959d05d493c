"""The scenario report: one self-contained HTML file with plots and detection scores.

Plots are drawn with matplotlib (Agg) and embedded as PNG data URIs; the figures the plots
show are embedded too, as JSON in ``<script id="figures">``, so the report can be checked
against the database it came from.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import msgspec

SEVERITY_COLOURS = {"critical": "#b2182b", "major": "#ef8a62", "minor": "#67a9cf",
                    "warning": "#999999"}  # fmt: skip


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _time(ms: float) -> float:
    """Matplotlib's date number (days since 1970-01-01 UTC, its default epoch)."""
    return ms / 86_400_000


TICK_STEPS_MIN = (5, 10, 15, 20, 30, 60, 120, 180, 360)  # round steps of the time axis


def _tick_step_min(span_ms: float, most: int = 10) -> int:
    """The smallest round step (minutes) that puts at most ``most`` ticks on the span."""
    span_min = span_ms / 60_000
    return next((step for step in TICK_STEPS_MIN if span_min / step <= most), TICK_STEPS_MIN[-1])


def _time_axis(axis: Any, figures: dict[str, Any], end_ms: float) -> None:
    """The shared time axis: the run's span, ticks on round local times (HH:00, HH:30...)."""
    tz = dt.timezone(dt.timedelta(hours=figures["utc_offset_h"]))
    step = _tick_step_min(end_ms - figures["start_ms"])
    locator: mdates.DateLocator
    if step < 60:
        locator = mdates.MinuteLocator(byminute=range(0, 60, step), tz=tz)  # type: ignore[no-untyped-call]
    else:
        locator = mdates.HourLocator(byhour=range(0, 24, step // 60), tz=tz)  # type: ignore[no-untyped-call]
    axis.xaxis.set_major_locator(locator)
    axis.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=tz))  # type: ignore[no-untyped-call]
    axis.set_xlim(_time(figures["start_ms"]), _time(end_ms))
    axis.set_xlabel(f"local time (UTC{figures['utc_offset_h']:+g})")


def _end_ms(figures: dict[str, Any]) -> float:
    """The last instant either panel shows: the run's end, or its last closed window."""
    last = [p[0] for points in figures["district_tpi"].values() for p in points[-1:]]
    return float(max([figures["end_ms"], *last]))


def timeline_plot(figures: dict[str, Any]) -> str:
    """Congestion per district above the alerts and the ground truth: two panels on one time
    axis (shared: an alert sits under the congestion it is about)."""
    rules = sorted({a["rule"] for a in figures["alerts"]}) or ["(no alerts)"]
    rows = [f"truth: {t}" for t in sorted({e["type"] for e in figures["truth"]})] + rules
    upper, lower = 4.4, 0.4 * len(rows) + 1.2  # inches: the TPI panel, a row per rule
    figure, (tpi, alerts) = plt.subplots(
        2, 1, sharex=True, figsize=(10, upper + lower),
        gridspec_kw={"height_ratios": [upper, lower], "hspace": 0.25},
    )  # fmt: skip
    _tpi_panel(tpi, figures)
    _alerts_panel(alerts, figures, rows)
    _time_axis(alerts, figures, _end_ms(figures))
    figure.align_ylabels()
    return _png(figure)


def _tpi_panel(axis: Any, figures: dict[str, Any]) -> None:
    for district, points in sorted(figures["district_tpi"].items()):
        if points:
            times = [_time(p[0]) for p in points]
            axis.plot(times, [p[1] for p in points], label=district, linewidth=1.6)
    for event in figures["truth"]:
        if event["type"] in ("incident", "haze", "rain"):
            end = event.get("end_ms") or figures["end_ms"]
            axis.axvspan(_time(event["start_ms"]), _time(end), alpha=0.12,
                         color="red" if event["type"] == "incident" else "grey")  # fmt: skip
    for level in (2, 4, 6, 8):
        axis.axhline(level, color="#cccccc", linewidth=0.6, zorder=0)
    axis.grid(axis="x", color="#dddddd", linewidth=0.6)
    axis.set_ylim(0, 10)
    axis.set_ylabel("TPI (GB/T 33171)")
    axis.set_title("Traffic performance index per district (1-minute windows)")
    axis.legend(loc="upper left", ncols=6, fontsize=8)


def _alerts_panel(axis: Any, figures: dict[str, Any], rows: list[str]) -> None:
    end_ms = figures["end_ms"]
    for event in figures["truth"]:
        y = rows.index(f"truth: {event['type']}")
        start, end = event["start_ms"], event.get("end_ms") or end_ms
        axis.barh(y, (end - start) / 86_400_000, left=_time(start),
                  height=0.6, color="#4d4d4d", alpha=0.35)  # fmt: skip
    for alert in figures["alerts"]:
        y = rows.index(alert["rule"])
        start = alert["started_ns"] / 1e6
        end = (alert["cleared_ns"] / 1e6) if alert["cleared_ns"] else end_ms
        axis.barh(y, max(end - start, 30_000) / 86_400_000,
                  left=_time(start), height=0.6,
                  color=SEVERITY_COLOURS.get(alert["severity"], "#999999"), alpha=0.8)  # fmt: skip
    axis.set_yticks(range(len(rows)), rows, fontsize=8)
    axis.invert_yaxis()
    axis.grid(axis="x", color="#dddddd", linewidth=0.6)
    axis.set_title("Alerts (coloured by severity) against the scenario's ground truth (grey)")


def render(figures: dict[str, Any]) -> str:
    scores = (
        "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(_fmt(s.get(k)))}</td>"
                for k in (
                    "event_type",
                    "events",
                    "detected",
                    "alerts",
                    "matching_alerts",
                    "precision",
                    "recall",
                    "mean_time_to_detect_s",
                    "max_time_to_detect_s",
                )
            )
            + "</tr>"
            for s in figures["scores"]
        )
        or '<tr><td colspan="9">no scored events and no alerts of the scored rules</td></tr>'
    )
    counts = "".join(f"<tr><td>{html.escape(rule)}</td><td>{n}</td></tr>"
                     for rule, n in sorted(figures["alert_counts"].items()))  # fmt: skip
    stored = ", ".join(f"{k}: {v:,}" for k, v in sorted(figures["points"].items()))
    air = _air_quality_table(figures.get("air_quality", {}))
    # script content is raw text: only "</" must not appear in it
    data = msgspec.json.encode(figures).decode().replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>cityflux scenario report: {html.escape(figures["scenario"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1000px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; font-size: 14px; text-align: right; }}
th {{ background: #f0f0f0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>Scenario report: {html.escape(figures["scenario"])}</h1>
<p>{html.escape(figures["description"])}</p>
<p>Simulated {html.escape(figures["start"])} for {figures["duration_s"] / 3600:.2f} h;
{figures["messages"]:,} messages published; points in InfluxDB: {stored}.</p>
<h2>Detection scores</h2>
<table><tr><th>event</th><th>events</th><th>detected</th><th>alerts</th><th>matching</th>
<th>precision</th><th>recall</th><th>mean time to detect (s)</th><th>max (s)</th></tr>
{scores}</table>
<h2>Congestion, alerts and ground truth</h2>
<img id="timeline" alt="TPI per district over time, above the alerts and the ground truth"
 src="{timeline_plot(figures)}">
{air}
<h2>Alerts raised, by rule</h2>
<table><tr><th>rule</th><th>alerts</th></tr>{counts}</table>
<script type="application/json" id="figures">{data}</script>
</body></html>
"""


def _air_quality_table(peaks: dict[str, dict[str, Any]]) -> str:
    """Each district's highest hourly six-pollutant AQI (HJ 633) and its primary pollutants."""
    if not peaks:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(district)}</td><td>{_fmt(peak['aqi'])}</td>"
        f"<td>{_fmt(peak['category'])}</td><td>{html.escape(peak['primary'] or '-')}</td>"
        f"<td>{html.escape(peak['exceeding'] or '-')}</td></tr>"
        for district, peak in sorted(peaks.items())
    )
    return (
        "<h2>Air quality: each district's highest hourly AQI (HJ 633-2012)</h2>\n"
        "<table><tr><th>district</th><th>AQI</th><th>category</th><th>primary pollutants</th>"
        f"<th>IAQI over 100</th></tr>{rows}</table>"
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
