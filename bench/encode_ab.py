"""Line-protocol encoding, old against new, in one process (issue 11).

The old encoder is the frozen per-value reference of tests/unit/test_lineprotocol_identity.py;
the new one is cityflux.store.lineprotocol.BatchEncoder. Both encode the same decoded and
validated columns of ``bench.stream.mixed_stream`` (prepared as bench/hotpath.py does), in
interleaved rounds (old, new, old, new, ...) with warm encoders, so load drifts hit both alike.
Also times the body the writer sends ("\\n".join + utf-8) and float-to-text per value by repr,
numpy's StringDType cast and msgspec.

python -m bench.encode_ab [--messages 200000] [--batch 5000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import msgspec
import numpy as np

from bench.stream import mixed_stream
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.model.columns import Columns
from cityflux.store.lineprotocol import BatchEncoder
from tests.unit.test_lineprotocol_identity import ReferenceBatchEncoder

Encode = Callable[[Columns], list[str]]


def prepare(messages: int, batch: int) -> list[Columns]:
    config = Config()
    stream = mixed_stream(messages)
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    prepared = []
    for start in range(0, len(stream), batch):
        chunk = stream[start : start + batch]
        now = time.time_ns()
        decoded = decoder.decode([t for t, _ in chunk], [p for _, p in chunk], now)
        prepared += [validate(c, config.ingest, now)[0] for c in decoded.columns.values()]
    return prepared


def timed(encode: Encode, batches: list[Columns]) -> tuple[float, float]:
    """Seconds to encode every batch, and to encode and make the request bodies."""
    t0 = time.perf_counter()
    encoded = [encode(columns) for columns in batches]
    t1 = time.perf_counter()
    for lines in encoded:
        "\n".join(lines).encode("utf-8")
    return t1 - t0, time.perf_counter() - t0


def float_text_ns(values: np.ndarray) -> dict[str, float]:
    """ns per value to write floats as text, best of 5."""
    encoder = msgspec.json.Encoder()
    ways: dict[str, Callable[[], object]] = {
        "repr": lambda: [repr(v) for v in values.tolist()],
        "numpy StringDType cast": lambda: values.astype(np.dtypes.StringDType()),
        "msgspec": lambda: encoder.encode(values.tolist()).decode()[1:-1].split(","),
    }
    result = {}
    for name, way in ways.items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            way()
            best = min(best, time.perf_counter() - t0)
        result[name] = best / len(values) * 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    batches = prepare(args.messages, args.batch)
    old, new = ReferenceBatchEncoder(), BatchEncoder()
    encoders: dict[str, Encode] = {"old": old.encode, "new": new.encode}
    for encode in encoders.values():  # warm: the old one's series cache fills here
        timed(encode, batches)
    same = all(old.encode(c) == new.encode(c) for c in batches)
    points = sum(len(c) for c in batches)
    print(
        f"{len(batches)} batches, {points:,} points from {args.messages:,} messages; "
        f"outputs identical: {same}; load before: {os.getloadavg()}"
    )
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in encoders}
    for _ in range(args.rounds):
        for name, encode in encoders.items():
            runs[name].append(timed(encode, batches))
    per_message = 1e6 / args.messages
    medians = {}
    for name, seconds in runs.items():
        encode_s = [s[0] for s in seconds]
        body_s = [s[1] for s in seconds]
        medians[name] = statistics.median(encode_s)
        print(
            f"{name}: encode best {min(encode_s) * per_message:.2f} median "
            f"{statistics.median(encode_s) * per_message:.2f} µs/message; encode+body best "
            f"{min(body_s) * per_message:.2f} median {statistics.median(body_s) * per_message:.2f}"
        )
    print(
        f"speed-up (median encode): {medians['old'] / medians['new']:.2f}x; "
        f"load after: {os.getloadavg()}"
    )
    floats = np.concatenate([c.fields["pm25_ugm3"] for c in batches if c.kind == "pole"])
    costs = ", ".join(f"{k} {v:.0f}" for k, v in float_text_ns(floats).items())
    print(f"float -> text, ns/value: {costs}")


if __name__ == "__main__":
    main()
