"""The naive consumers users write first: paho-mqtt callbacks + influxdb-client, as documented.

Usage: python -m bench.naive_consumer MQTT_PORT INFLUX_V2_URL CLIENT_ID N --mode sync|batching

* ``sync``: ``write_api(write_options=SYNCHRONOUS)``, one write (one HTTP request) per message.
* ``batching``: ``write_api()`` with influxdb-client's default ``WriteOptions`` (batches of
  1,000 points, flushed every second on its background thread); closed (flushed) at the end.

Each consumer takes the first N messages of its persistent session (paho auto-acknowledges
them when the callback returns), writes them, and prints one JSON line on stdout: messages and
points it wrote, and its own wall and CPU time from its first message to its last write (so
that a bench can leave out its start-up, which favours it).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import paho.mqtt.client as paho
from influxdb_client import InfluxDBClient, Point
from influxdb_client.client.write_api import SYNCHRONOUS
from paho.mqtt.enums import CallbackAPIVersion

from bench.figures import peak_rss_mb


def to_points(topic: str, payload: bytes) -> list[Point]:
    """One Point per reading (a traffic message is one per lane), as a user would write it."""
    _, _, district, kind, device = topic.split("/")
    reading = json.loads(payload)
    ts_ns = reading.pop("ts") * 1_000_000
    points = []
    for lane in reading.pop("lanes", [None]):
        point = Point(kind).tag("district", district).tag("device_id", device).time(ts_ns)
        for key, value in {**reading, **(lane or {})}.items():
            if key == "lane":
                point = point.tag("lane", str(value))
            elif value is not None:
                point = point.field(key, value)
        points.append(point)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("url")
    parser.add_argument("client_id")
    parser.add_argument("n", type=int)
    parser.add_argument("--mode", choices=("sync", "batching"), required=True)
    args = parser.parse_args()
    influx = InfluxDBClient(url=args.url, token="bench", org="bench")
    write_api = (
        influx.write_api(write_options=SYNCHRONOUS) if args.mode == "sync" else influx.write_api()
    )
    done = threading.Event()
    seen, written = 0, 0
    first: list[float] = []

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal seen, written
        if seen >= args.n:  # in flight after the last one: not ours to write
            return
        if not first:
            first.extend((time.monotonic(), time.process_time()))
        points = to_points(message.topic, bytes(message.payload))
        write_api.write(bucket="bench", record=points)
        seen += 1
        written += len(points)
        if seen >= args.n:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe("cityflux/v1/#", qos=1)
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    done.wait()
    client.disconnect()
    client.loop_stop()
    write_api.close()  # batching: flushes what is still buffered
    influx.close()
    report = {
        "messages": seen,
        "points": written,
        "steady_s": time.monotonic() - first[0],
        "steady_cpu_s": time.process_time() - first[1],
        # VmHWM, not ru_maxrss: that one counts the parent's copy before exec
        "peak_rss_mb": peak_rss_mb(os.getpid()),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
