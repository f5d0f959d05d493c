"""Smart poles: air quality (HJ 633 AQI and IAQI, PM), noise against GB 3096 limits, lamps."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash

from cityflux.dashboards import panels
from cityflux.dashboards.common import WHERE_DISTRICT, district_frame
from cityflux.dashboards.influxql import Query

UID = "cityflux-poles"

BY_DISTRICT = 'GROUP BY time($__interval), "district" fill(none)'


def build() -> dash.Dashboard:
    return (
        district_frame(
            UID,
            "cityflux: smart poles",
            "Air quality, noise and street lighting",
            "pole",
            "air_quality_heavy|noise_over_limit|noise_night_lmax|lamp_fault",
        )
        .with_panel(
            panels.time_series(
                "AQI (worst pole per district)",
                Query(f'SELECT max("aqi") FROM "air_quality" {WHERE_DISTRICT} {BY_DISTRICT}').alias(
                    "$tag_district"
                ),
                steps=panels.AQI_STEPS,
                description="HJ 633 hourly AQI: 0-50 good ... >300 severe pollution",
            )
        )
        .with_panel(
            panels.time_series(
                "IAQI of PM2.5 and PM10 (district mean)",
                Query(
                    'SELECT mean("iaqi_pm25") AS "PM2.5", mean("iaqi_pm10") AS "PM10" '
                    f'FROM "air_quality" {WHERE_DISTRICT} {BY_DISTRICT}'
                ).alias("$tag_district $col"),
                steps=panels.AQI_STEPS,
            )
        )
        .with_panel(
            panels.grid(
                "AQI and primary pollutants (per pole, latest hour)",
                Query(
                    'SELECT last("aqi") AS "AQI", "primary", "exceeding", "category" '
                    f'FROM "air_quality" {WHERE_DISTRICT} GROUP BY "device_id", "district"'
                ).table(),
                sort_by="AQI",
                description="HJ 633 six-pollutant hourly AQI; primary: every pollutant with "
                "the highest IAQI when AQI > 50 (ties all named, e.g. pm25,pm10); exceeding: "
                "IAQI > 100",
            )
        )
        .with_panel(
            panels.time_series(
                "IAQI of the gases (district mean)",
                Query(
                    'SELECT mean("iaqi_no2") AS "NO2", mean("iaqi_o3_1h") AS "O3 1h", '
                    'mean("iaqi_o3_8h") AS "O3 8h", mean("iaqi_co") AS "CO", '
                    f'mean("iaqi_so2") AS "SO2" FROM "air_quality" {WHERE_DISTRICT} '
                    f"{BY_DISTRICT}"
                ).alias("$tag_district $col"),
                steps=panels.AQI_STEPS,
                description="HJ 633 1-hour tables (O3 also its 8-hour moving average)",
            )
        )
        .with_panel(
            panels.time_series(
                "PM concentration (readings, district mean)",
                Query(
                    'SELECT mean("pm25_ugm3") AS "PM2.5", mean("pm10_ugm3") AS "PM10" '
                    f'FROM "pole" {WHERE_DISTRICT} {BY_DISTRICT}'
                ).alias("$tag_district $col"),
                unit="conμgm3",
            )
        )
        .with_panel(
            panels.time_series(
                "Noise: hourly Leq over the zone limit (worst pole)",
                Query(
                    'SELECT max("exceed_dba") AS "over the limit" '
                    f'FROM "noise" {WHERE_DISTRICT} {BY_DISTRICT}'
                ).alias("$tag_district"),
                unit="dB",
                steps=[(None, "green"), (0.0, "orange"), (5.0, "red")],
                description="Leq 1h minus the GB 3096 limit of the pole's acoustic zone (day or "
                "night); above 0 the pole is over its limit",
            )
        )
        .with_panel(
            panels.grid(
                "Poles over their noise limit",
                Query(
                    'SELECT * FROM (SELECT last("exceed_dba") AS "over by dBA", '
                    '"leq_1h_dba", "limit_dba" FROM "noise" '
                    f'{WHERE_DISTRICT} GROUP BY "device_id", "district") '
                    'WHERE "over by dBA" > 0'
                ).table(),
                sort_by="over by dBA",
            )
        )
        .with_panel(
            panels.time_series(
                "Lamps on",
                Query(
                    'SELECT count("lamp_on") FROM "pole" WHERE "lamp_on" = true AND '
                    f'"district" =~ /^$district$/ AND $timeFilter {BY_DISTRICT}'
                ).alias("$tag_district"),
                description="Readings per interval reporting the lamp on",
            )
        )
        .with_panel(
            panels.time_series(
                "Lamp power (district mean)",
                Query(
                    f'SELECT mean("lamp_power_w") FROM "pole" {WHERE_DISTRICT} {BY_DISTRICT}'
                ).alias("$tag_district"),
                unit="watt",
            )
        )
        .with_panel(
            panels.grid(
                "Lamp failures",
                Query(
                    'SELECT "state", "message", "entity", "district" FROM "cityflux_alert" '
                    """WHERE "rule" = 'lamp_fault' AND "district" =~ /^$district$/ """
                    "AND $timeFilter"
                ).table(),
                sort_by="Time",
                description="Lamp-fault alerts: dark at night, burning by day, or drawing "
                "the wrong power",
            )
        )
    )
