"""Kill -9 of a worker mid-run gives the indices of one process (issue 12): the rush-hour
scenario published over MQTT to nats-server, read through one consumer group by one `cityflux
run` and through another by three, one of which is killed while the devices publish. Its
partitions move to the survivors (their engines resume from the partition's checkpoint in the
object store and re-read the open windows from InfluxDB; what the dead worker held comes back
after ack_wait); every reading lands once in each database, and the segment indices are
identical, row for row."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import msgspec

from cityflux.config import Config
from cityflux.nats.admin import init
from cityflux.nats.partition import partition_of
from cityflux.servers import LocalInfluxDB
from cityflux.servers_nats import LocalNats
from cityflux.simulators.runner import run_simulation
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from tests.conftest import TEN_YEARS_S
from tests.integration.test_nats_failover import (
    PARTITIONS,
    owners,
    run_async,
    shared_out,
    workers,
)
from tests.integration.test_nats_pipeline import points, segment_rows, steady
from tests.support import wait_for

SPEED = 20.0  # the fail-over (pin timeout + ack_wait, ~8 s) is ~160 s of event time: in time


def group_base(nats: LocalNats, influx: LocalInfluxDB, tmp: Path, group: str, city: Path) -> Config:
    return Config().with_overrides(
        {
            "source.kind": "nats",
            "nats.urls": [nats.url],
            "nats.partitions": PARTITIONS,
            "nats.group": group,
            "nats.members_bucket": f"{group}_workers",
            "nats.alerts_bucket": f"{group}_alerts",
            "nats.checkpoints_bucket": f"{group}_checkpoints",
            "nats.heartbeat_s": 0.5,
            "nats.pin_timeout_s": 3.0,
            "nats.fetch_expires_s": 0.5,
            "nats.ack_wait_s": 5.0,
            "influx.url": influx.url,
            "influx.database": f"test_{group}_{uuid.uuid4().hex[:8]}",
            "ingest.max_past_s": TEN_YEARS_S,
            "metrics.health_interval_s": 0,
            "analytics.city_map": str(city),
            "analytics.idle_flush_s": 3.0,  # the last windows close soon after the run
            "analytics.checkpoint_interval_s": 5.0,
            "analytics.checkpoint_dir": str(tmp / "unused"),
        }
    )


def test_kill_9_of_a_worker_mid_run_gives_the_indices_of_one_process(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    scenario = load_scenario("rush-hour-incident", {"clock.duration_s": 600.0})
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), SPEED))
    city = tmp_path / "city-map.json"
    city.write_bytes(msgspec.json.encode(sim.city))
    with_districts = {partition_of(d.id, PARTITIONS) for d in sim.city.districts}
    one = group_base(nats_node, influxdb, tmp_path, "one", city)
    three = group_base(nats_node, influxdb, tmp_path, "three", city)
    asyncio.run(init(one))
    asyncio.run(init(three))
    assert nats_node.mqtt_port is not None
    device_side = msgspec.structs.replace(
        one.mqtt, url=f"mqtt://127.0.0.1:{nats_node.mqtt_port}", protocol="3.1.1"
    )
    for group in ("one", "three"):
        (tmp_path / group).mkdir()
    with workers(one, tmp_path / "one", 1) as single, workers(three, tmp_path / "three", 3) as w:
        wait_for(shared_out(one, {x.name for x in single}), 45, "one worker owning all")
        wait_for(shared_out(three, {x.name for x in w}), 45, "three workers sharing out")
        held = run_async(lambda nc: owners(nc, three), three)
        # the victim: the worker holding the most partitions that have districts
        victim = max(w, key=lambda x: len(set(held[x.name]) & with_districts))
        moved = set(held[victim.name]) & with_districts
        assert moved, held
        publishing = threading.Thread(target=run_simulation, args=(sim, device_side, SPEED))
        publishing.start()
        time.sleep(scenario.clock.duration_s / SPEED / 3)  # a third of the run published
        victim.kill()
        killed_at = time.monotonic()
        survivors = {x.name for x in w} - {victim.name}
        wait_for(shared_out(three, survivors), 30, "the dead worker's partitions moved")
        moved_after = time.monotonic() - killed_at
        publishing.join(120)
        assert not publishing.is_alive()
        # the simulation counts what it published as it goes: known once it has run
        expected = sum(sim.expected.points.get(m, 0) for m in ("pole", "manhole", "traffic"))
        for config in (one, three):
            wait_for(lambda c=config: points(influxdb, c) >= expected, 90, "every reading")
        for config in (one, three):  # the idle flush closes the last windows
            database = config.influx.database
            wait_for(lambda d=database: steady(d, len(segment_rows(influxdb, d))), 60, "windows")
        counts = [points(influxdb, c) for c in (one, three)]
        rows_one = segment_rows(influxdb, one.influx.database)
        rows_three = segment_rows(influxdb, three.influx.database)
    print(f"\nkill -9 of {victim.name}: partitions {sorted(moved)} moved in {moved_after:.1f}s")
    assert counts == [expected, expected]  # every reading once in each database
    only_one = sorted(set(rows_one) - set(rows_three))
    only_three = sorted(set(rows_three) - set(rows_one))
    assert len(rows_one) > 1_000 and rows_one == rows_three, (
        f"{len(only_one)} rows only from one worker, {len(only_three)} only from three: "
        f"{only_one[:2]} {only_three[:2]}"
    )
