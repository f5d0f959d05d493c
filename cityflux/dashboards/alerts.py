"""Alerts: what is active now, what changed recently, and how many were raised over time."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash

from cityflux.dashboards import panels
from cityflux.dashboards.common import alert_annotations, frame
from cityflux.dashboards.influxql import Query

UID = "cityflux-alerts"

IN_DISTRICT = """WHERE "district" =~ /^$district$/ AND $timeFilter"""
ACTIVE = f"""SELECT {{fields}} FROM (SELECT last("state") AS "state", "message", "value", \
"acknowledged", "flapping" FROM "cityflux_alert" {IN_DISTRICT} \
GROUP BY "rule", "severity", "district", "entity") WHERE "state" = 'active'"""


def build() -> dash.Dashboard:
    return (
        frame(UID, "cityflux: alerts", "Alert states written by the analytics (cityflux_alert)")
        .with_variable(panels.district_variable("cityflux_alert"))
        .annotation(alert_annotations(district=True))
        .with_panel(
            panels.single_stat(
                "Active alerts by severity",
                Query(ACTIVE.format(fields='count("state")') + ' GROUP BY "severity"').alias(
                    "$tag_severity"
                ),
                width=24,
                height=4,
                steps=panels.SEVERITY_STEPS,
                no_value="0",
            )
        )
        .with_panel(
            panels.grid(
                "Active alerts (time: raised)",
                Query(
                    ACTIVE.format(fields='"message", "value", "acknowledged", "flapping"')
                ).table(),
                width=24,
                height=10,
                sort_by="Time",
            )
        )
        .with_panel(
            panels.time_series(
                "Alerts raised",
                Query(f"""SELECT count("alert_id") FROM "cityflux_alert" {IN_DISTRICT} \
AND "state" = 'active' GROUP BY time($__interval), "severity" fill(none)""").alias("$tag_severity"),
                width=24,
            )
        )
        .with_panel(
            panels.grid(
                "Recent state changes",
                Query(
                    'SELECT "state", "rule", "severity", "entity", "message", "acknowledged" '
                    f'FROM "cityflux_alert" {IN_DISTRICT} ORDER BY time DESC LIMIT 200'
                ).table(),
                width=24,
                height=12,
                sort_by="Time",
            )
        )
    )
