"""Traffic: per segment speed, flow, occupancy, TTI, TPI and level of service over time."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import timeseries

from cityflux.dashboards import panels
from cityflux.dashboards.common import alert_annotations, frame
from cityflux.dashboards.influxql import Query

UID = "cityflux-traffic"

SEGMENTS = """FROM "traffic_segment" WHERE "district" =~ /^$district$/ \
AND "segment" =~ /^$segment$/ AND "window" = '1m' AND $timeFilter"""
BY_LINK = 'GROUP BY time($__interval), "segment", "direction" fill(none)'
LINK = "$tag_segment $tag_direction"
# HCM level of service as colours: A-B free, C-D stable, E at capacity, F breakdown
LOS_COLORS = {
    "A": "green",
    "B": "#9ac48a",
    "C": "yellow",
    "D": "orange",
    "E": "red",
    "F": "dark-red",
}


def series(
    title: str,
    field: str,
    unit: str,
    description: str = "",
    steps: list[tuple[float | None, str]] | None = None,
) -> timeseries.Panel:
    """One index of the chosen segments over time, a line per segment and direction."""
    return panels.time_series(
        title,
        Query(f'SELECT mean("{field}") {SEGMENTS} {BY_LINK}').alias(LINK),
        unit=unit,
        description=description,
        steps=steps,
    )


def build() -> dash.Dashboard:
    return (
        frame(UID, "cityflux: traffic", "Per-segment indices from the 1-minute windows")
        .with_variable(panels.district_variable("traffic_segment"))
        .with_variable(
            panels.tag_variable(
                "segment",
                "Segment",
                'SHOW TAG VALUES FROM "traffic_segment" WITH KEY = "segment" '
                'WHERE "district" =~ /^$district$/',
                include_all=False,
                multi=True,
            )
        )
        .annotation(
            alert_annotations(
                "traffic_incident|segment_severe_congestion|detector_stuck", district=True
            )
        )
        .with_panel(series("Speed (space-mean)", "speed_kmh", "velocitykmh"))
        .with_panel(series("Flow", "flow_vph", "short", "vehicles per hour, all lanes"))
        .with_panel(series("Occupancy", "occupancy_pct", "percent"))
        .with_panel(
            series(
                "Travel time index",
                "tti",
                "short",
                "travel time / free-flow travel time",
                [(None, "green"), (1.5, "yellow"), (2.0, "red")],
            )
        )
        .with_panel(series("TPI (GB/T 33171)", "tpi", "short", steps=panels.TPI_STEPS))
        .with_panel(series("Density", "density_vpkm", "short", "vehicles per km, all lanes"))
        .with_panel(
            panels.states(
                "Level of service (HCM)",
                Query(f'SELECT last("los") {SEGMENTS} {BY_LINK}').alias(LINK),
                colors=LOS_COLORS,
            )
        )
        .with_panel(
            panels.grid(
                "Segments now (district)",
                Query(
                    'SELECT last("tpi") AS "TPI", "level", "los", "speed_kmh", "flow_vph", '
                    '"occupancy_pct", "tti" FROM "traffic_segment" WHERE "district" =~ '
                    """/^$district$/ AND "window" = '5m' AND $timeFilter """
                    'GROUP BY "segment", "direction"'
                ).table(),
                width=24,
                height=10,
                sort_by="TPI",
                time_from="15m",
            )
        )
    )
