"""A corrupt analytics checkpoint between two runs of the real pipeline (mosquitto, cityflux,
InfluxDB): the second run starts (it raised BadZipFile from the engine's constructor before),
sets the file aside, re-reads the open windows' readings from InfluxDB, and writes the same
windows as a run whose checkpoint was intact."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.store.influx import InfluxWriter
from tests.support import count_points, mosquitto_pub, running, select, wait_for

TOPIC = "cityflux/v1/centre/traffic/det-0001"  # seg-0001 in examples/city-map.json


def traffic(ts_ms: int, count: int) -> bytes:
    lanes = [
        {"lane": n, "count": count, "occupancy_pct": 8.0, "speed_kmh": 70.0} for n in (1, 2, 3)
    ]
    return msgspec.json.encode({"ts": ts_ms, "interval_s": 60, "lanes": lanes})


CORRUPT = {
    "intact": lambda data: data,
    "torn": lambda data: data[: len(data) // 2],  # renamed into place before it was on disk
    "garbage": lambda data: b"\x00" * len(data),
}


@pytest.mark.parametrize("damage", list(CORRUPT))
def test_a_corrupt_checkpoint_costs_a_recovery_not_the_start(
    damage: str, config: Config, db: InfluxWriter
) -> None:
    # windows close by event time only (no idle flush); the checkpoint is the one at the stop
    config = config.with_overrides(
        {"analytics.idle_flush_s": 3_600, "analytics.checkpoint_interval_s": 3_600}
    )
    path = Path(config.analytics.checkpoint_dir) / "windows.npz"
    # 9 minutes ago, on a minute: every reading below is in the past (event time never
    # runs ahead of the wall clock), and inside the recovery horizon (12 minutes)
    minute = (time.time_ns() // 60_000_000_000 - 9) * 60_000
    with running(Pipeline(config)):
        for m in range(3):  # minutes 0-2, 30 vehicles per lane: their windows still open
            mosquitto_pub(config.mqtt.port, TOPIC, traffic(minute + m * 60_000, 30))
        wait_for(lambda: count_points(db, "traffic", "count") == 9, what="the first run's data")
    intact = path.read_bytes()  # written at the stop, holding minutes 0-2
    damaged = CORRUPT[damage](intact)
    path.write_bytes(damaged)

    with running(Pipeline(config)) as pipeline:  # raised from the constructor before
        assert pipeline.analytics is not None
        corrupt = pipeline.analytics.engine.counts["checkpoint_corrupt"]
        for m in range(3, 8):  # later minutes move the watermark past minutes 0-4
            mosquitto_pub(config.mqtt.port, TOPIC, traffic(minute + m * 60_000, 10))
        wait_for(lambda: count_points(db, "traffic", "count") == 24, what="the later readings")
        query = (
            'SELECT "flow_vph" FROM "traffic_segment" WHERE "segment" = \'seg-0001\' AND '
            f"\"window\" = '1m' AND time >= {minute * 1_000_000}"
        )
        rows = wait_for(lambda: len(select(db, query)) == 5 and select(db, query),
                        what="the windows of minutes 0-4")  # fmt: skip
    # 3 lanes x 30 vehicles a minute = 5,400 veh/h; then 1,800: the same with or without it
    assert [r["flow_vph"] for r in rows] == [5_400.0] * 3 + [1_800.0] * 2
    if damage == "intact":
        assert corrupt == 0 and not list(path.parent.glob("*.corrupt"))
    else:
        assert corrupt == 1
        assert (path.parent / "windows.npz.corrupt").read_bytes() == damaged
