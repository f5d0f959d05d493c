"""A point InfluxDB refuses (a field type conflict) is dead-lettered, not retried; the rest of
its batch is written."""

from __future__ import annotations

import time

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto
from cityflux.store.influx import InfluxWriter
from tests.support import Subscriber, count_points, publish_all, running, select, wait_for

NOW_MS = int(time.time() * 1000) - 60_000


def test_field_type_conflict_is_dead_lettered(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    # someone else already wrote humidity_pct as an integer into this database, in the same
    # shard (InfluxDB 1.x keeps field types per shard)
    db.send(
        f"pole,device_id=other,district=x humidity_pct=5i {NOW_MS}000000".encode(), gzipped=False
    )
    good = [
        (f"cityflux/v1/d1/pole/p{i}", f'{{"ts": {NOW_MS + i}, "noise_dba": 50}}'.encode())
        for i in range(40)
    ]
    conflicting = (
        "cityflux/v1/d1/pole/p-humid",
        f'{{"ts": {NOW_MS}, "humidity_pct": 55.5}}'.encode(),
    )
    watcher = Subscriber(broker.port, "cityflux/v1/deadletter/#")
    try:
        with running(Pipeline(config)) as pipeline:
            publish_all(broker.port, [*good[:20], conflicting, *good[20:]])
            wait_for(lambda: watcher.messages, what="the write_rejected dead letter")
            wait_for(lambda: count_points(db, "pole", "noise_dba") >= 40, what="the good 40")
            rejected = pipeline.metrics.value("rejections_total", reason="write_rejected")
            spooled = pipeline.metrics.value("lines_spooled_total")
    finally:
        watcher.close()
    letter = watcher.decoded()[0]
    assert watcher.messages[0][0] == "cityflux/v1/deadletter/write_rejected"
    assert "field type conflict" in letter["message"]
    assert "p-humid" in letter["payload"]
    assert rejected == 1
    assert spooled == 0
    assert count_points(db, "pole", "noise_dba") == 40
    assert count_points(db, "pole", "humidity_pct") == 1  # only the other writer's
    assert select(db, "SELECT * FROM pole WHERE device_id = 'p-humid'") == []
