"""What every cityflux dashboard shares: its frame (uid, tags, time, refresh, links to the
others) and the alert annotations."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import dashboard

from cityflux.dashboards.influxql import annotation

TAG = "cityflux"


def frame(uid: str, title: str, description: str, since: str = "now-6h") -> dash.Dashboard:
    return (
        dash.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .timezone("browser")
        .time(since, "now")
        .refresh("30s")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .link(
            dash.DashboardLink("cityflux")
            .type(dashboard.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def alert_annotations(rules: str = ".*", district: bool = False) -> dash.AnnotationQuery:
    """Alert state changes (raised, cleared, acknowledged) from ``cityflux_alert`` marked on
    every time-series panel; ``rules`` is a regex of rule names."""
    where = f'"rule" =~ /^({rules})$/'
    if district:
        where += ' AND "district" =~ /^$district$/'
    query = (
        'SELECT "message", "state", "rule", "severity", "entity" FROM "cityflux_alert" '
        f"WHERE {where} AND $timeFilter"
    )
    built = annotation("Alerts", query, "red", "message", "state,rule,severity,entity")
    assert isinstance(built, dash.AnnotationQuery)
    return built
