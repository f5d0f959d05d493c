"""Manholes: the status of every cover and the water levels over time."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash

from cityflux.dashboards import panels
from cityflux.dashboards.common import WHERE_DISTRICT, district_frame
from cityflux.dashboards.influxql import Query

UID = "cityflux-manholes"


def build() -> dash.Dashboard:
    return (
        district_frame(
            UID,
            "cityflux: manholes",
            "Covers, water levels, gas and batteries",
            "manhole",
            "manhole_.*",
        )
        .with_panel(
            panels.time_series(
                "Water level (highest manhole per district)",
                Query(
                    f'SELECT max("water_level_cm") FROM "manhole" {WHERE_DISTRICT} '
                    'GROUP BY time($__interval), "district" fill(none)'
                ).alias("$tag_district"),
                unit="lengthcm",
                width=24,
            )
        )
        .with_panel(
            panels.time_series(
                "Covers reported open",
                Query(
                    'SELECT count("cover_open") FROM "manhole" WHERE "cover_open" = true AND '
                    '"district" =~ /^$district$/ AND $timeFilter GROUP BY time($__interval), '
                    '"device_id" fill(none)'
                ).alias("$tag_device_id"),
                width=12,
                height=6,
                description="Readings per interval with the cover open",
            )
        )
        .with_panel(
            panels.time_series(
                "Gas (highest per district)",
                Query(
                    'SELECT max("ch4_pct_lel") AS "CH4 %LEL", max("h2s_ppm") AS "H2S ppm" '
                    f'FROM "manhole" {WHERE_DISTRICT} GROUP BY time($__interval), "district" '
                    "fill(none)"
                ).alias("$tag_district $col"),
                width=12,
                height=6,
            )
        )
        .with_panel(
            panels.grid(
                "Status (time: last seen)",
                Query(
                    'SELECT last("water_level_cm") AS "water cm", "cover_open" AS "open", '
                    '"tilt_deg" AS "tilt °", "ch4_pct_lel" AS "CH4 %LEL", "h2s_ppm" AS '
                    '"H2S ppm", "battery_pct" AS "battery %" FROM "manhole" '
                    f'{WHERE_DISTRICT} GROUP BY "device_id", "district"'
                ).table(),
                width=24,
                height=12,
                sort_by="water cm",
                # manholes report every 5 minutes; one silent longer has a manhole_silent alert
                time_from="1h",
            )
        )
    )
