"""City overview: how congested the city and each district are, where, and what is alerting."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash

from cityflux.dashboards import panels
from cityflux.dashboards.common import (
    ALERT_COLUMNS,
    active_alerts,
    alert_annotations,
    frame,
    severity_stat,
)
from cityflux.dashboards.influxql import Query

UID = "cityflux-overview"

# the 5-minute sliding window: steadier than the 1-minute one for a wall display
# The city's TPI from the district rows (VKT-weighted: sum of TPI x VKT over sum of VKT), the
# same as the engine's "city" row, and there also when workers each hold some districts and no
# one writes a city row (docs/scale.md)
CITY_TPI = """SELECT sum("tpi_vkt") / sum("vkt") AS "tpi" FROM "traffic_district" \
WHERE "district" != 'city' AND "window" = '5m' AND $timeFilter"""
# The city's share of congested road length and its CV of segment TPI, from the district rows
# in the same way (sums of the districts' lengths, and of their segment TPIs and squares)
CITY_CONGESTED = """SELECT sum("congested_km") / sum("length_km") AS "congested_share" \
FROM "traffic_district" WHERE "district" != 'city' AND "window" = '5m' AND $timeFilter"""
_N = 'sum("segments_with_data")'
CITY_CV = f"""SELECT sqrt(sum("tpi_sq_sum") / {_N} - pow(sum("tpi_sum") / {_N}, 2)) \
/ (sum("tpi_sum") / {_N}) AS "cv" FROM "traffic_district" WHERE "district" != 'city' \
AND "window" = '5m' AND $timeFilter"""
DISTRICTS = """FROM "traffic_district" WHERE "district" != 'city' AND "window" = '5m' \
AND $timeFilter"""


def build() -> dash.Dashboard:
    return (
        frame(UID, "cityflux: city overview", "Congestion (GB/T 33171 TPI) and alerts, city-wide")
        .annotation(alert_annotations("traffic_incident|district_congestion"))
        .with_panel(
            panels.dial(
                "City TPI",
                Query(f"{CITY_TPI} GROUP BY time(1m) fill(none)"),
                steps=panels.TPI_STEPS,
                maximum=10,
                description="Traffic performance index, 0-10, VKT-weighted",
            )
        )
        .with_panel(
            panels.dial(
                "District TPI",
                Query(f'SELECT last("tpi") {DISTRICTS} GROUP BY "district"').alias("$tag_district"),
                steps=panels.TPI_STEPS,
                maximum=10,
                width=10,
            )
        )
        .with_panel(
            panels.single_stat(
                "Congested road length",
                Query(f"{CITY_CONGESTED} GROUP BY time(1m) fill(none)"),
                unit="percentunit",
                width=4,
                height=4,
                steps=[(None, "green"), (0.1, "yellow"), (0.2, "red")],
                description="Share of road length with data at congestion level 4-5",
            )
        )
        .with_panel(severity_stat("Active alerts now", 4, 4))
        .with_panel(
            panels.time_series(
                "TPI trend",
                Query(f"{CITY_TPI} GROUP BY time($__interval) fill(none)").alias("city"),
                Query(
                    f'SELECT mean("tpi") {DISTRICTS} GROUP BY time($__interval), "district" '
                    "fill(none)"
                )
                .ref_id("B")
                .alias("$tag_district"),
                width=24,
                steps=panels.TPI_STEPS,
            )
        )
        .with_panel(
            panels.city_map(
                "Congestion and alerts",
                Query(
                    'SELECT last("level") AS "level", "lat", "lon", "tpi", "speed_kmh" '
                    """FROM "traffic_segment" WHERE "window" = '5m' AND $timeFilter """
                    'GROUP BY "segment", "direction"'
                ).table(),
                Query(
                    active_alerts(f'"lat", "lon", {ALERT_COLUMNS}, "message"') + ' AND "lat" > -90'
                )
                .ref_id("B")
                .table(),
                layers=[
                    panels.points_layer("Segments (congestion level)", "A", "level"),
                    panels.points_layer("Active alerts", "B", None, "red"),
                ],
                steps=panels.LEVEL_STEPS,
                time_from="15m",  # where things stand now; last() over hours costs on a big city
                description="Road segments coloured by GB/T 33171 level (1 smooth - 5 severe); "
                "red: entities with an active alert",
            )
        )
        .with_panel(
            panels.time_series(
                "District variation (CV of segment TPI)",
                Query(
                    f'SELECT mean("cv") {DISTRICTS} GROUP BY time($__interval), "district" '
                    "fill(none)"
                ).alias("$tag_district"),
                Query(f"{CITY_CV} GROUP BY time(1m) fill(none)").ref_id("B").alias("city"),
                description="Coefficient of variation of segment TPI: how uneven congestion is",
            )
        )
        .with_panel(
            panels.grid(
                "Alerting now (time: active since)",
                Query(active_alerts(f'{ALERT_COLUMNS}, "message", "value"')).table(),
                sort_by="Time",
            )
        )
    )
