"""Helpers for tests that talk to real servers: publish, watch dead letters, query, wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalVictoriaMetrics, require_binary
from cityflux.store.influx import InfluxWriter
from cityflux.store.spool import Spool

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def mosquitto_pub(port: int, topic: str, payload: bytes | str, qos: int = 1) -> None:
    """Publish exactly these bytes with the broker's own client (payload via stdin: -s)."""
    data = payload.encode() if isinstance(payload, str) else payload
    subprocess.run(
        [require_binary("mosquitto_pub"), "-p", str(port), "-q", str(qos), "-t", topic, "-s"],
        input=data,
        check=True,
        timeout=20,
    )


def paho_client(port: int, client_id: str = "") -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or uuid.uuid4().hex)
    client.max_inflight_messages_set(1_000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish_all(port: int, messages: Sequence[tuple[str, bytes]], qos: int = 1) -> None:
    """Publish and wait until the broker acknowledged every QoS 1 message."""
    client = paho_client(port)
    try:
        # in chunks: packet ids wrap at 65,535, so no more may be outstanding at once
        for start in range(0, len(messages), 20_000):
            chunk = messages[start : start + 20_000]
            infos = [client.publish(topic, payload, qos=qos) for topic, payload in chunk]
            for info in infos:
                info.wait_for_publish(timeout=60)
                assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


class Subscriber:
    """Collects every message on ``pattern`` (e.g. the dead-letter topics)."""

    def __init__(self, port: int, pattern: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._ready.set()
        self._client.on_connect = lambda client, *a: client.subscribe(pattern, qos=1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._ready.wait(10), "subscription not confirmed"

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def decoded(self) -> list[dict[str, Any]]:
        with self._lock:
            return [msgspec.json.decode(payload) for _, payload in self.messages]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def select(writer: InfluxWriter, influxql: str) -> list[dict[str, Any]]:
    """Rows of an InfluxQL query as dicts (all series concatenated, tags included)."""
    rows: list[dict[str, Any]] = []
    for result in writer.query(influxql).get("results", []):
        if "error" in result:
            raise AssertionError(result["error"])
        for series in result.get("series", []):
            for values in series["values"]:
                row = dict(zip(series["columns"], values, strict=True))
                row.update(series.get("tags", {}))
                row["_measurement"] = series.get("name", "")
                rows.append(row)
    return rows


def count_points(writer: InfluxWriter, measurement: str, field: str) -> int:
    rows = select(writer, f'SELECT count("{field}") FROM "{measurement}"')
    return int(rows[0]["count"]) if rows else 0


@contextmanager
def running(pipeline: Pipeline) -> Iterator[Pipeline]:
    """A pipeline in a background thread, connected before the body runs."""
    pipeline.connect_timeout_s = 15
    with pipeline:
        yield pipeline


def config_env(config: Config) -> dict[str, str]:
    """The config as CITYFLUX_* variables, for `cityflux run` in a child process."""
    env = dict(os.environ)
    for section, values in msgspec.to_builtins(config).items():
        for key, value in values.items():
            if value is None or isinstance(value, dict):
                continue
            if isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, list | tuple):  # nats.urls: comma-separated (config.py)
                text = ",".join(str(item) for item in value)
            else:
                text = str(value)
            env[f"CITYFLUX_{section.upper()}__{key.upper()}"] = text
    return env


def start_ingest_process(config: Config, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "cityflux", "run"],
            env=config_env(config),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def export(vm: LocalVictoriaMetrics, selector: str) -> list[dict[str, Any]]:
    """Every series VictoriaMetrics holds that matches ``selector``, as its export JSON."""
    query = urllib.parse.urlencode({"match[]": selector})
    with urllib.request.urlopen(f"{vm.url}/api/v1/export?{query}", timeout=5) as response:
        return [json.loads(line) for line in response.read().decode().splitlines() if line]


def drain(spool: Spool) -> list[bytes]:
    """Every body left in the spool, oldest first, committed as it is read."""
    out = []
    while (record := spool.peek()) is not None:
        out.append(record.body)
        spool.commit(record)
    return out


def v2_overrides(victoria: LocalVictoriaMetrics) -> dict[str, object]:
    """Settings for writing to VictoriaMetrics through the InfluxDB v2 API."""
    return {
        "influx.url": victoria.url,
        "influx.api": "v2",
        "influx.token": "secret",
        "influx.bucket": "city",
        "influx.org": "ops",
        "metrics.health_interval_s": 0,
    }


def examples(full: int) -> int:
    """Hypothesis examples for a property test: ``full`` in the whole suite (CI), a tenth in
    the fast inner loop (``make test-unit`` sets CITYFLUX_TEST_FAST=1)."""
    return max(20, full // 10) if os.environ.get("CITYFLUX_TEST_FAST") else full
