"""Pipeline health: cityflux's own metrics (``cityflux_pipeline``, written every
``metrics.health_interval_s`` by each worker) and its dead letters (``cityflux_deadletter``)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash

from cityflux.dashboards import panels
from cityflux.dashboards.common import frame
from cityflux.dashboards.influxql import Query

UID = "cityflux-pipeline"

HEALTH = 'FROM "cityflux_pipeline" WHERE $timeFilter'
BY_WORKER = 'GROUP BY time($__interval), "worker" fill(none)'
# the counters only grow (per worker, from its start): rates are their derivative, and a
# histogram's mean over an interval is the growth of its sum over the growth of its count
RATE = "non_negative_derivative(max({field}), 1s)"  # field: "name" or a /regex/
ACCEPTED = RATE.format(field=r"/^readings_accepted_total\./")
REJECTED = RATE.format(field=r"/^rejections_total\./")
MEAN = 'non_negative_difference(max("{name}_sum")) / non_negative_difference(max("{name}_count"))'


def build() -> dash.Dashboard:
    return (
        frame(
            UID,
            "cityflux: pipeline health",
            "Throughput, rejections, writes, spool and lag",
            since="now-1h",
        )
        .with_panel(
            panels.single_stat(
                "InfluxDB reachable",
                Query(f'SELECT last("database_up") {HEALTH} GROUP BY "worker"').alias(
                    "$tag_worker"
                ),
                steps=[(None, "red"), (1.0, "green")],
            )
        )
        .with_panel(
            panels.single_stat(
                "MQTT connected",
                Query(f'SELECT last("mqtt_connected") {HEALTH} GROUP BY "worker"').alias(
                    "$tag_worker"
                ),
                steps=[(None, "red"), (1.0, "green")],
            )
        )
        .with_panel(
            panels.single_stat(
                "Spool",
                Query(f'SELECT last("spool_bytes") {HEALTH}'),
                unit="bytes",
                steps=[(None, "green"), (1.0, "orange")],
                description="Lines waiting on disk for InfluxDB (0 when healthy)",
            )
        )
        .with_panel(
            panels.single_stat(
                "Rejected (total)",
                Query(f'SELECT last(/^rejections_total\\./) {HEALTH} GROUP BY "worker"').alias(
                    "$tag_worker $col"
                ),
                steps=[(None, "green"), (1.0, "orange")],
            )
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
        .with_panel(
            panels.time_series(
                "Readings accepted per second, by kind",
                Query(f"SELECT {ACCEPTED} {HEALTH} {BY_WORKER}").alias("$tag_worker $col"),
                unit="reqps",
            )
        )
        .with_panel(
            panels.time_series(
                "Rejections per second, by reason",
                Query(f"SELECT {REJECTED} {HEALTH} {BY_WORKER}").alias("$tag_worker $col"),
                unit="reqps",
            )
        )
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
                Query(f"SELECT {MEAN.format(name='write_seconds')} {HEALTH} {BY_WORKER}").alias(
                    "$tag_worker"
                ),
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
                    f'SELECT {MEAN.format(name="ack_lag_seconds")} AS "ack lag" '
                    f"{HEALTH} {BY_WORKER}"
                )
                .ref_id("B")
                .alias("$tag_worker $col"),
                unit="s",
                description="event lag: now - the newest reading time of the last batch; "
                "ack lag: a batch's first message received - the batch acknowledged",
            )
        )
    )
