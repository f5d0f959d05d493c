"""What every cityflux dashboard shares: its frame (uid, tags, time, refresh, links to the
others) and the alert annotations."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import stat
from grafana_foundation_sdk.models import dashboard

from cityflux.dashboards import panels
from cityflux.dashboards.influxql import Query, annotation

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


# the panels' filter on a dashboard with the $district variable
WHERE_DISTRICT = """WHERE "district" =~ /^$district$/ AND $timeFilter"""


def district_frame(
    uid: str, title: str, description: str, measurement: str, rules: str = ".*"
) -> dash.Dashboard:
    """A dashboard filtered by district (the districts of ``measurement``), its time series
    annotated with the changes of the alert rules matching ``rules`` in those districts."""
    return (
        frame(uid, title, description)
        .with_variable(panels.district_variable(measurement))
        .annotation(alert_annotations(rules, district=True))
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


# the newest state of each alert (one series per rule and entity), kept if still active
# A point is written only when an alert changes state, so "active now" cannot look at the
# dashboard's range alone (an alert raised a day ago and still active has no point in the
# last 6 hours): the newest state within a year, whatever the time picker says.
ACTIVE_ALERTS = """SELECT {fields} FROM (SELECT last("state") AS "state", "lat", "lon", \
"message", "value", "acknowledged", "flapping" FROM "cityflux_alert" WHERE {where}\
time > now() - 365d GROUP BY "rule", "severity", "district", "entity") WHERE "state" = 'active'"""
IN_DISTRICT = '"district" =~ /^$district$/ AND '
ALERT_COLUMNS = '"rule", "severity", "entity", "district"'  # the tags the subquery grouped by
SEVERITY_COLOURS = {"critical": "red", "major": "orange", "minor": "yellow", "warning": "blue"}


def active_alerts(fields: str, in_district: bool = False) -> str:
    """A query for the alerts active now (their newest state is "active")."""
    return ACTIVE_ALERTS.format(fields=fields, where=IN_DISTRICT if in_district else "")


def severity_stat(title: str, width: int, height: int, in_district: bool = False) -> stat.Panel:
    """How many alerts are active now, one number per severity, in the severity's colour."""
    query = active_alerts('count("state")', in_district) + ' GROUP BY "severity"'
    panel = panels.single_stat(
        title, Query(query).alias("$tag_severity"), width=width, height=height,
        steps=panels.SEVERITY_STEPS, no_value="0",
    )  # fmt: skip
    for severity, colour in SEVERITY_COLOURS.items():
        panel = panel.override_by_name(severity, [panels.fixed_colour(colour)])
    return panel
