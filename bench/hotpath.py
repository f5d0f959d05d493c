"""CPU cost of cityflux's own hot path, without MQTT or HTTP: decode -> validate -> encode.

python -m bench.hotpath [--messages 200000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import time

from bench.stream import mixed_stream
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import BatchEncoder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    args = parser.parse_args()
    config = Config()
    stream = mixed_stream(args.messages)
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    encoder = BatchEncoder()
    writer = InfluxWriter(config.influx)
    stages = {"decode": 0.0, "validate": 0.0, "encode": 0.0, "gzip": 0.0}
    lines_total = 0
    for start in range(0, len(stream), args.batch):
        chunk = stream[start : start + args.batch]
        topics = [t for t, _ in chunk]
        payloads = [p for _, p in chunk]
        now = time.time_ns()
        t0 = time.perf_counter()
        decoded = decoder.decode(topics, payloads, now)
        t1 = time.perf_counter()
        good = [validate(c, config.ingest, now)[0] for c in decoded.columns.values()]
        t2 = time.perf_counter()
        lines = [line for c in good for line in encoder.encode(c)]
        t3 = time.perf_counter()
        writer.encode_body(lines)
        t4 = time.perf_counter()
        for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[stage] += seconds
        lines_total += len(lines)
    total = sum(stages.values())
    n = args.messages
    for stage, seconds in stages.items():
        print(f"{stage:9} {seconds:6.2f}s  {seconds / n * 1e6:6.2f} µs/message")
    print(f"{'total':9} {total:6.2f}s  {n / total:9,.0f} messages/s  ({lines_total:,} points)")


if __name__ == "__main__":
    main()
