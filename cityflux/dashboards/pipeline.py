"""Pipeline health: cityflux's own metrics (``cityflux_pipeline``, written every
``metrics.health_interval_s`` by each worker) and its dead letters (``cityflux_deadletter``)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import stat, timeseries

from cityflux.dashboards import panels
from cityflux.dashboards.common import frame
from cityflux.dashboards.influxql import Query

UID = "cityflux-pipeline"

HEALTH = 'FROM "cityflux_pipeline" WHERE $timeFilter'
BY_WORKER = 'GROUP BY time($__interval), "worker" fill(none)'
# the counters only grow (per worker, from its start): rates are their derivative
RATE = "non_negative_derivative(max({field}), 1s)"  # field: "name" or a /regex/
# a histogram's mean over an interval: the growth of its sum over the growth of its count,
# where anything was counted (0/0 would read as a mean of 0)
MEAN = """SELECT "sum" / "count" AS "{label}" FROM (SELECT \
non_negative_difference(max("{name}_sum")) AS "sum", \
non_negative_difference(max("{name}_count")) AS "count" {health} {by_worker}) \
WHERE "count" > 0 GROUP BY "worker\""""
# status panels look at the last two minutes only: a worker (or the database it writes its
# health to) that stopped reporting shows "no data", not its last good value
NOW = "2m"
UP_DOWN = [(None, "red"), (1.0, "green")]


def _status(title: str, field: str, description: str) -> stat.Panel:
    return panels.single_stat(
        title,
        Query(f'SELECT last("{field}") {HEALTH} GROUP BY "worker"').alias("$tag_worker"),
        steps=UP_DOWN,
        no_value="no data",
        time_from=NOW,
        description=description,
    )


def _rates_by_label(title: str, counter: str) -> timeseries.Panel:
    """The per-second rate of each label of a labelled counter (``rejections_total.schema``,
    ``rejections_total.bad_topic``...: one field per label), named "label (worker)"."""
    rate = RATE.format(field=f"/^{counter}_total\\./")
    return panels.time_series(
        title,
        Query(f"SELECT {rate} {HEALTH} {BY_WORKER}").alias("$tag_worker $col"),
        unit="reqps",
    ).with_transformation(panels.rename_by_regex(rf"(.*) .*{counter}_total\.(.*)", "$2 ($1)"))


def build() -> dash.Dashboard:
    return (
        frame(
            UID,
            "cityflux: pipeline health",
            "Throughput, rejections, writes, spool and lag",
            since="now-1h",
        )
        .with_panel(_status("InfluxDB reachable", "database_up", "Per worker, 1 = writes succeed"))
        .with_panel(_status("MQTT connected", "mqtt_connected", "Per worker, 1 = connected"))
        .with_panel(
            panels.single_stat(
                "Spool",
                Query(f'SELECT last("spool_bytes") {HEALTH} GROUP BY "worker"').alias(
                    "$tag_worker"
                ),
                unit="bytes",
                steps=[(None, "green"), (1.0, "orange")],
                no_value="no data",
                time_from=NOW,
                description="Lines waiting on disk for InfluxDB (0 when healthy)",
            )
        )
        .with_panel(
            panels.single_stat(
                "Rejected since start",
                Query(f"SELECT last(/^rejections_total\\./) {HEALTH}"),
                steps=[(None, "green"), (1.0, "orange")],
                time_from=NOW,
            ).with_transformation(panels.rename_by_regex(r".*rejections_total\.(.*)", "$1"))
        )
        .with_panel(
            panels.time_series(
                "Messages per second",
                Query(f"""SELECT {RATE.format(field='"messages_received_total"')} AS "received", \
{RATE.format(field='"messages_acked_total"')} AS "acked" {HEALTH} {BY_WORKER}""").alias(
                    "$tag_worker $col"
                ),
                unit="reqps",
            )
        )
        .with_panel(_rates_by_label("Readings accepted per second, by kind", "readings_accepted"))
        .with_panel(_rates_by_label("Rejections per second, by reason", "rejections"))
        .with_panel(
            panels.time_series(
                "Dead letters, by reason",
                Query(
                    'SELECT count("payload_bytes") FROM "cityflux_deadletter" WHERE $timeFilter '
                    'GROUP BY time($__interval), "reason" fill(none)'
                ).alias("$tag_reason"),
                description="Each rejected message or reading (also on cityflux/v1/deadletter/#)",
            )
        )
        .with_panel(
            panels.time_series(
                "Write latency (mean per interval)",
                Query(
                    MEAN.format(
                        label="write", name="write_seconds", health=HEALTH, by_worker=BY_WORKER
                    )
                ).alias("$tag_worker"),
                unit="s",
            )
        )
        .with_panel(
            panels.time_series(
                "Spool depth",
                Query(f'SELECT max("spool_records") AS "records" {HEALTH} {BY_WORKER}').alias(
                    "$tag_worker $col"
                ),
            )
        )
        .with_panel(
            panels.time_series(
                "Lag",
                Query(f'SELECT max("event_lag_seconds") AS "event lag" {HEALTH} {BY_WORKER}').alias(
                    "$tag_worker $col"
                ),
                Query(
                    MEAN.format(
                        label="ack lag", name="ack_lag_seconds", health=HEALTH, by_worker=BY_WORKER
                    )
                )
                .ref_id("B")
                .alias("$tag_worker $col"),
                unit="s",
                description="event lag: now - the newest reading time of the last batch; "
                "ack lag: a batch's first message received - the batch acknowledged",
            )
        )
    )
