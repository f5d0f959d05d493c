"""The naive consumer users write first: paho-mqtt + influxdb-client, one Point per message.

Usage: python -m bench.naive_consumer MQTT_PORT INFLUX_V2_URL CLIENT_ID N
It auto-acknowledges (paho's default) and writes each reading synchronously.
"""

from __future__ import annotations

import json
import sys
import threading

import paho.mqtt.client as paho
from influxdb_client import InfluxDBClient, Point
from influxdb_client.client.write_api import SYNCHRONOUS
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    port, url, client_id, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    influx = InfluxDBClient(url=url, token="bench", org="bench")
    write_api = influx.write_api(write_options=SYNCHRONOUS)
    done = threading.Event()
    seen = 0

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal seen
        _, _, district, kind, device = message.topic.split("/")
        reading = json.loads(message.payload)
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
        write_api.write(bucket="bench", record=points)
        seen += 1
        if seen >= n:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe("cityflux/v1/#", qos=1)
    client.connect("127.0.0.1", int(port))
    client.loop_start()
    done.wait()
    client.disconnect()
    client.loop_stop()
    influx.close()


if __name__ == "__main__":
    main()
