"""The analytics of a worker that owns some partitions of the city (the JetStream source).

One :class:`AnalyticsLink` per owned partition, each over the part of the city map its
districts make up: a partition's state (open windows, device state, its checkpoint) is its own,
so a worker that takes a partition over starts that partition's engine from the partition's
checkpoint and re-reads its open windows from InfluxDB, and a worker that hands one over closes
its engine (a last checkpoint) without touching the others. A district lives in exactly one
partition (the stream's subject transform hashes the district), so every window sees all the
readings of its road.

The city-wide rollup row (district "city") is not written in this mode: each engine sees only
part of the city; the dashboards' city panel weights the district rows (docs/scale.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np

from cityflux.analytics.alerts import Ack, AckRecord, Alert
from cityflux.analytics.citymapfile import load_configured_map
from cityflux.analytics.traffic import TrafficView
from cityflux.config import Config
from cityflux.model.citymap import CityMap
from cityflux.model.columns import Columns, Rejection
from cityflux.model.points import Result, Table
from cityflux.nats.alerts import KvAlertStore
from cityflux.nats.partition import partition_of
from cityflux.pipeline.analytics_link import AnalyticsLink, Publisher
from cityflux.store.influx import InfluxWriter
from cityflux.supervisor import Spawn

log = logging.getLogger(__name__)
CITY_ROW = "city"


def city_part(city: CityMap, districts: set[str]) -> CityMap:
    """The districts given, their segments and the devices on them."""
    segments = [s for s in city.segments if s.district in districts]
    on_segments = {s.id for s in segments}
    return msgspec.structs.replace(
        city,
        districts=[d for d in city.districts if d.id in districts],
        segments=segments,
        detectors=[d for d in city.detectors if d.segment in on_segments],
        poles=[p for p in city.poles if p.district in districts],
        manholes=[m for m in city.manholes if m.district in districts],
    )


def without_city_row(results: list[Result]) -> list[Result]:
    """Rollup tables without their "city" row (a partition's engine sees part of the city)."""
    out: list[Result] = []
    for item in results:
        if not isinstance(item, Table) or CITY_ROW not in item.tags.get("district", ()):
            out.append(item)
            continue
        names = np.asarray(item.tags["district"], dtype=object)
        rows = np.arange(len(names)) if item.rows is None else _indices(item.rows)
        keep = names[rows] != CITY_ROW
        fields = {name: column[keep] for name, column in item.fields.items()}
        out.append(Table(item.measurement, item.series, item.tags, fields, item.ts_ns, rows[keep]))
    return out


def _indices(rows: Any) -> Any:
    rows = np.asarray(rows)
    return np.flatnonzero(rows) if rows.dtype == np.bool_ else rows


class ScopedAlerts:
    """The cluster's alert store as one partition's engine sees it: its own districts' alerts
    (an engine restarted on a partition carries on with those, not the whole city's); closing
    it leaves the shared store open for the other partitions."""

    def __init__(self, store: KvAlertStore, districts: set[str]) -> None:
        self.store = store
        self.districts = districts

    def save(self, alerts: list[Alert]) -> None:
        self.store.save(alerts)

    def acknowledge(
        self, alert_id: int, by: str, force: bool = False, at_ns: int | None = None
    ) -> Ack:
        return self.store.acknowledge(alert_id, by, force, at_ns)

    def acknowledgements(self, alert_id: int) -> list[AckRecord]:
        return self.store.acknowledgements(alert_id)

    def select(self) -> list[Alert]:
        return [a for a in self.store.select() if a.district in self.districts]

    def with_state(self, state: str) -> list[Alert]:
        return [a for a in self.store.with_state(state) if a.district in self.districts]

    def active(self) -> list[Alert]:
        return self.store.active_in(self.districts)

    def close(self) -> None:
        pass  # the worker closes the shared store


class Objects(Protocol):
    """Where a partition's checkpoint lives between owners (the cluster's object store)."""

    def put_object(self, name: str, data: bytes) -> None: ...

    def get_object(self, name: str) -> bytes | None: ...


class PartitionedAnalytics:
    """The pipeline's analytics when the source hands out partitions (same calls as
    :class:`AnalyticsLink`)."""

    def __init__(
        self,
        config: Config,
        publisher: Publisher,
        write: Callable[[list[str]], object],
        spawn: Spawn,
        writer: InfluxWriter,
        objects: Objects,
        retire: Callable[[str], None],
    ) -> None:
        """``spawn``/``retire``: start a supervised thread, and end one for good (a partition's
        engine worker, when the partition goes to another worker)."""
        self.config = config
        self.objects = objects
        self.retire = retire
        self._threads: dict[int, str] = {}  # partition -> its engine worker's thread name
        # one connection to the cluster's alert bucket for all of this worker's partitions
        self.alerts = KvAlertStore.open(config.nats, f"{config.mqtt.client_id}-alerts")
        self.alerts.follow_acks()
        self.publisher = publisher
        self.write = write
        self.spawn = spawn
        self.writer = writer
        self.city = load_configured_map(config.analytics.city_map)
        partitions = config.nats.partitions
        self.districts: dict[int, set[str]] = {}
        for district in self.city.districts:
            self.districts.setdefault(partition_of(district.id, partitions), set()).add(district.id)
        self.partition_of = {d: p for p, names in self.districts.items() for d in names}
        self.links: dict[int, AnalyticsLink] = {}
        self._lock = threading.Lock()  # links change on the source's thread
        self.engines_started = 0  # unique thread names across hand-overs; a test counts them
        self.on_worker_error: Callable[[], object] = lambda: None
        self.checkpoint_corrupt = 0

    # -- partitions come and go ---------------------------------------------------------------
    def on_partitions(self, gained: frozenset[int], lost: frozenset[int]) -> None:
        for partition in sorted(lost):
            with self._lock:
                link = self.links.pop(partition, None)
            if link is not None:
                self._close(partition, link)
        for partition in sorted(gained):
            if partition not in self.districts:
                continue  # no district of the map hashes here
            self._fetch_checkpoint(partition)
            link = self._start(partition)
            recovered = link.recover(self.writer, sorted(self.districts[partition]))
            log.info("partition %d: analytics started, %d readings re-read", partition, recovered)
            with self._lock:
                self.links[partition] = link

    # -- checkpoints travel through the cluster ---------------------------------------------------
    def _directory(self, partition: int) -> Path:
        return Path(self.config.analytics.checkpoint_dir) / f"p{partition}"

    @staticmethod
    def _object(partition: int) -> str:
        return f"partition-{partition}/windows.npz"

    def _fetch_checkpoint(self, partition: int) -> None:
        """The partition's last checkpoint from the cluster (its previous owner's, wherever
        that ran) replaces any local copy; none there: the local one, if any, is used."""
        try:
            data = self.objects.get_object(self._object(partition))
        except Exception as exc:
            log.warning("partition %d: checkpoint not fetched (%s)", partition, exc)
            return
        if data is None:
            return
        path = self._directory(partition) / "windows.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".fetched")
        temporary.write_bytes(data)
        temporary.replace(path)

    def _upload(self, partition: int, path: Path) -> None:
        try:
            self.objects.put_object(self._object(partition), path.read_bytes())
        except Exception as exc:
            log.warning("partition %d: checkpoint not stored in the cluster (%s)", partition, exc)

    def _close(self, partition: int, link: AnalyticsLink) -> None:
        name = self._threads.pop(partition, None)
        if name is not None:
            self.retire(name)
        link.close()  # stops its worker, writes the last checkpoint (and uploads it)

    def _start(self, partition: int) -> AnalyticsLink:
        base = self.config.analytics
        directory = self._directory(partition)
        analytics = msgspec.structs.replace(
            base,
            checkpoint_dir=str(directory),
            alerts_db=str(Path(base.alerts_db).with_name(f"alerts-p{partition}.sqlite")),
        )
        config = msgspec.structs.replace(self.config, analytics=analytics)
        self.engines_started += 1
        number = self.engines_started

        def spawn(name: str, target: Any) -> threading.Thread:
            self._threads[partition] = f"{name}-p{partition}-{number}"
            return self.spawn(self._threads[partition], target)

        part = city_part(self.city, self.districts[partition])
        scoped = ScopedAlerts(self.alerts, self.districts[partition])
        link = AnalyticsLink(
            config, self.publisher, self.write, spawn, city=part, alert_store=scoped
        )
        link.result_filter = without_city_row
        link.engine.on_checkpoint = lambda path: self._upload(partition, path)
        self.checkpoint_corrupt += link.engine.counts["checkpoint_corrupt"]
        link.engine.on_worker_error = self.on_worker_error
        return link

    def _links(self) -> list[AnalyticsLink]:
        with self._lock:
            return list(self.links.values())

    # -- what the pipeline calls ----------------------------------------------------------------
    def process(self, columns: dict[str, Columns]) -> tuple[list[str], list[Rejection]]:
        lines = self._acks_from_elsewhere()  # a deque check when there are none
        late: list[Rejection] = []
        with self._lock:
            links = dict(self.links)
        for kind, table in columns.items():
            parts = self._partitions(table)
            for partition, link in links.items():
                mine = parts == partition
                if mine.any():
                    more, too_late = link.process({kind: table.select(mine)})
                    lines += more
                    late += too_late
        return lines, late

    def _partitions(self, table: Columns) -> Any:
        districts = table.tags["district"]
        names, inverse = np.unique(districts.astype(str), return_inverse=True)
        lookup = np.array([self.partition_of.get(n, -1) for n in names.tolist()], dtype=np.int64)
        return lookup[inverse]

    def idle(self) -> list[str]:
        return self._acks_from_elsewhere() + [
            line for link in self._links() for line in link.idle()
        ]

    def _acks_from_elsewhere(self) -> list[str]:
        """Acknowledgements written to the bucket by `cityflux alerts ack` (or another
        worker): the partition holding the alert publishes it and writes its point."""
        lines: list[str] = []
        for record in self.alerts.take_acks():
            alert = self.alerts.get(record.alert_id)
            partition = None if alert is None else self.partition_of.get(alert.district)
            with self._lock:
                link = self.links.get(partition) if partition is not None else None
            if link is not None:
                lines += link.apply_acknowledgement(record.alert_id, record.by)
        return lines

    def flush(self) -> list[str]:
        return [line for link in self._links() for line in link.flush()]

    def acknowledgements(self, topics: list[str], payloads: list[bytes]) -> list[str]:
        """MQTT acknowledgements do not reach the stream (it holds readings only): on the
        cluster, `cityflux alerts ack` writes to the alert bucket, which :meth:`process` and
        :meth:`idle` follow."""
        return []

    def alert_history(self) -> list[Alert]:
        alerts = [alert for link in self._links() for alert in link.alert_history()]
        return sorted(alerts, key=lambda a: (a.started_ns, a.id))

    def latest_traffic(self) -> TrafficView | None:
        views = [v for v in (link.latest_traffic() for link in self._links()) if v is not None]
        return max(views, key=lambda v: v.end_ns) if views else None

    def recover(self, writer: InfluxWriter) -> int:
        return 0  # each partition's engine recovers when the partition is taken

    def close(self) -> None:
        with self._lock:
            links, self.links = list(self.links.values()), {}
        for link in links:
            link.close()  # each uploads its last checkpoint, if the cluster is there
        self.alerts.close()
