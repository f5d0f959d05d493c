"""Pipeline counters: Prometheus ``/metrics``, ``/healthz``, and points for InfluxDB.

Each worker process has its own registry (no global state), served on its own port.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cityflux.model.contract import KINDS, Reason

log = logging.getLogger(__name__)

# cityflux_broker_<name>: what the broker says of itself ($SYS), docs/operations.md
BROKER_GAUGES = {
    "messages_dropped": "QoS 1 messages the broker dropped since it started (queue limits)",
    "messages_dropped_per_min": "the broker's dropped messages, 1-minute average per minute",
    "store_messages": "messages held in the broker's store (queued for clients, retained)",
    "store_bytes": "payload bytes held in the broker's store",
    "clients_connected": "clients connected to the broker",
    "uptime_seconds": "seconds since the broker started (its counters restart with it)",
    "stats_up": "1 while the broker's $SYS counters arrive (0: disconnected or denied by ACL)",
    "dropping": "1 while the broker_dropping alert is active",
}


class Metrics:
    """Every counter the pipeline keeps; the names are documented in docs/operations.md."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.received = Counter(
            "cityflux_messages_received", "MQTT messages received", registry=registry
        )
        self.acked = Counter(
            "cityflux_messages_acked",
            "MQTT messages acknowledged after a durable write",
            registry=registry,
        )
        self.ignored = Counter(
            "cityflux_messages_ignored",
            "messages on cityflux's own topics (dead letters, alerts) seen on the wildcard",
            registry=registry,
        )
        self.accepted = Counter(
            "cityflux_readings_accepted",
            "readings that passed validation",
            ["kind"],
            registry=registry,
        )
        self.rejected = Counter(
            "cityflux_rejections",
            "messages or readings rejected, by reason",
            ["reason"],
            registry=registry,
        )
        self.lines_written = Counter(
            "cityflux_lines_written",
            "line-protocol points the database accepted",
            registry=registry,
        )
        self.lines_spooled = Counter(
            "cityflux_lines_spooled", "points written to the disk spool", registry=registry
        )
        self.spool_bytes = Gauge("cityflux_spool_bytes", "bytes in the spool", registry=registry)
        self.spool_records = Gauge(
            "cityflux_spool_records", "batches in the spool", registry=registry
        )
        self.spool_full = Gauge(
            "cityflux_spool_full",
            "1 while the spool is full and acks are held back",
            registry=registry,
        )
        self.spool_corrupt_records = Counter(
            "cityflux_spool_corrupt_records",
            "spooled records found corrupt on disk (never acknowledged ones only, see "
            "docs/operations.md)",
            registry=registry,
        )
        self.spool_corrupt_files = Counter(
            "cityflux_spool_corrupt_files",
            "damaged spool database files salvaged and set aside as *.corrupt",
            registry=registry,
        )
        self.database_up = Gauge(
            "cityflux_database_up", "1 if the last database write succeeded", registry=registry
        )
        self.mqtt_connected = Gauge(
            "cityflux_mqtt_connected", "1 while connected to the broker", registry=registry
        )
        self.write_seconds = Histogram(
            "cityflux_write_seconds", "database write latency per batch", registry=registry
        )
        self.batch_messages = Histogram(
            "cityflux_batch_messages",
            "messages per processed batch",
            buckets=(1, 10, 100, 500, 1_000, 2_000, 5_000, 10_000, 20_000),
            registry=registry,
        )
        self.ack_lag_seconds = Histogram(
            "cityflux_ack_lag_seconds",
            "from a batch's first message received to its ack",
            registry=registry,
        )
        self.event_lag_seconds = Gauge(
            "cityflux_event_lag_seconds",
            "now minus the newest reading timestamp of the last batch",
            registry=registry,
        )
        self.deadletters_published = Counter(
            "cityflux_deadletters_published", "dead letters published to MQTT", registry=registry
        )
        self.analytics_errors = Counter(
            "cityflux_analytics_errors",
            "analytics failures: a batch, a window computation or a results write"
            " (ingest went on; see the log)",
            registry=registry,
        )
        self.mqtt_protocol_errors = Counter(
            "cityflux_mqtt_protocol_errors",
            "malformed packets from the broker; each one reconnects",
            registry=registry,
        )
        self.component_restarts = Counter(
            "cityflux_component_restarts",
            "supervised threads restarted after a failure (docs/operations.md)",
            ["component"],
            registry=registry,
        )
        self.checkpoint_corrupt = Counter(
            "cityflux_analytics_checkpoint_corrupt",
            "analytics checkpoints found corrupt at start and set aside (*.corrupt)",
            registry=registry,
        )
        self.commit_errors = Counter(
            "cityflux_commit_errors",
            "batches whose store-and-acknowledge failed and was retried",
            ["error"],
            registry=registry,
        )
        # the broker's own counters from its $SYS topics (cityflux/pipeline/broker_stats.py)
        self.broker = {
            name: Gauge(f"cityflux_broker_{name}", text, registry=registry)
            for name, text in BROKER_GAUGES.items()
        }
        self.broker_stats_errors = Counter(
            "cityflux_broker_stats_errors",
            "failures of the broker $SYS watcher (refused connections, bad values; see the log)",
            registry=registry,
        )
        for kind in KINDS:  # make every label visible at 0 from the start
            self.accepted.labels(kind)
        for reason in Reason:
            self.rejected.labels(reason.value)

    def snapshot(self) -> dict[str, float]:
        """Current values, flattened (``rejections.schema``...), for the InfluxDB health point."""
        values: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                suffix = "".join(f".{value}" for value in sample.labels.values())
                values[sample.name.removeprefix("cityflux_") + suffix] = float(sample.value)
        return values

    def value(self, name: str, **labels: str) -> float:
        """One sample by its name without ``cityflux_``, e.g. ``value("lines_written_total")``."""
        sample = self.registry.get_sample_value(f"cityflux_{name}", labels or None)
        return 0.0 if sample is None else sample

    def rejected_total(self) -> float:
        return sum(v for k, v in self.snapshot().items() if k.startswith("rejections_total."))


HealthCheck = Callable[[], dict[str, Any]]


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/healthz`` (JSON; 503 when unhealthy)."""

    def __init__(self, metrics: Metrics, health: HealthCheck, host: str, port: int) -> None:
        handler = _handler(metrics, health)
        self._server = _Server((host, port), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])

    def serve(self) -> None:
        """Answer requests until :meth:`stop` (run it on a supervised thread)."""
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that hangs up before its answer is sent (a timeout, Ctrl-C on curl) is
        an expected condition: one line, not socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):  # BrokenPipeError, ConnectionResetError, ...
            log.info("metrics client %s:%s disconnected early: %s", *client_address[:2], exc)
            return
        log.exception("metrics request from %s:%s failed", *client_address[:2])


def _handler(metrics: Metrics, health: HealthCheck) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
            elif self.path == "/healthz":
                state = health()
                status = 200 if state.get("healthy") else 503
                self._reply(status, "application/json", json.dumps(state).encode())
            else:
                self._reply(404, "text/plain", b"try /metrics or /healthz\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would flood the log

    return Handler
