"""Alerts: what is active now, what changed recently, and how many were raised over time."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash

from cityflux.dashboards import panels
from cityflux.dashboards.common import (
    ALERT_COLUMNS,
    WHERE_DISTRICT,
    active_alerts,
    district_frame,
    severity_stat,
)
from cityflux.dashboards.influxql import Query

UID = "cityflux-alerts"


def build() -> dash.Dashboard:
    return (
        district_frame(
            UID,
            "cityflux: alerts",
            "Alert states written by the analytics (cityflux_alert)",
            "cityflux_alert",
        )
        .with_panel(severity_stat("Active alerts by severity", 24, 4, in_district=True))
        .with_panel(
            panels.grid(
                "Active alerts now (time: active since)",
                Query(
                    active_alerts(
                        f'{ALERT_COLUMNS}, "message", "value", "acknowledged", "flapping"',
                        in_district=True,
                    )
                ).table(),
                width=24,
                height=10,
                sort_by="Time",
            )
        )
        .with_panel(
            panels.time_series(
                "Alerts raised",
                Query(f"""SELECT count("alert_id") FROM "cityflux_alert" {WHERE_DISTRICT} \
AND "state" = 'active' GROUP BY time($__interval), "severity" fill(none)""").alias("$tag_severity"),
                width=24,
            )
        )
        .with_panel(
            panels.grid(
                "Recent state changes",
                Query(
                    'SELECT "state", "rule", "severity", "entity", "message", "acknowledged" '
                    f'FROM "cityflux_alert" {WHERE_DISTRICT} ORDER BY time DESC LIMIT 200'
                ).table(),
                width=24,
                height=12,
                sort_by="Time",
            )
        )
    )
