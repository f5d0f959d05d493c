"""How the analytics core sits in the pipeline: validated columns in; index lines, alert
changes (MQTT, retained) and too-late rejections out; acknowledgements from MQTT in.

The engine computes windows in :meth:`AnalyticsEngine.work`, which the link runs on a thread
of the pipeline's supervisor; the engine's result tables and alert points become line protocol
here, with the store's encoder (its series prefixes cached for the life of the link)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import msgspec
import numpy as np

from cityflux.analytics.alerts import Alert, AlertStorage
from cityflux.analytics.engine import AnalyticsEngine, TooLate, alert_point
from cityflux.analytics.environment import POLE_INPUTS
from cityflux.analytics.traffic import TrafficView
from cityflux.config import Config
from cityflux.errors import StoreError
from cityflux.model.citymap import CityMap
from cityflux.model.columns import Columns, Rejection
from cityflux.model.contract import Reason
from cityflux.model.points import Result
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import TableEncoder, point_line
from cityflux.supervisor import Spawn

log = logging.getLogger(__name__)
RECOVER_MEASUREMENTS: Final = {
    "traffic": ("lane", ("count", "occupancy_pct", "speed_kmh", "interval_s")),
    "pole": ("", POLE_INPUTS),  # every pole field the analytics read (gases, Lmax too)
}  # fmt: skip


def alert_line(alert: Alert, position: tuple[float, float] | None = None) -> str:
    """An alert's current state as a line (analytics.results.alert_point)."""
    return point_line(alert_point(alert, position))


class AckMessage(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    by: str = "operator"
    force: bool = False  # override another operator's acknowledgement (both are recorded)


class Publisher(Protocol):
    """What the link needs of the MQTT side (the pipeline's consumer)."""

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any: ...


class AnalyticsLink:
    def __init__(
        self,
        config: Config,
        publisher: Publisher,
        write: Callable[[list[str]], object],
        spawn: Spawn,
        city: CityMap | None = None,
        alert_store: AlertStorage | None = None,
    ) -> None:
        """``city``: the map (or part of it) the engine computes (default: the configured);
        ``alert_store``: where its alerts live (default: the SQLite file)."""
        self.publisher = publisher
        root = config.mqtt.topic_root
        self.alert_root = f"{root}/alerts"
        self.ack_topic = f"{root}/alerts/ack"
        self._ack_decoder = msgspec.json.Decoder(AckMessage)
        self._encoder = msgspec.json.Encoder()
        self._write = write
        self.tables = TableEncoder()
        self.engine = AnalyticsEngine(
            config.analytics, city, notify=self._publish_one, alert_store=alert_store
        )
        # results pass this before encoding (a partition's engine drops its city row)
        self.result_filter: Callable[[list[Result]], list[Result]] = lambda results: results
        # the window results are written from the worker, so their volume never holds up
        # ingest; spawn starts it under the pipeline's supervisor (restarted and counted)
        self.engine.windows_in_background(self._deliver)
        self.worker = spawn("analytics", lambda component: self.engine.work(component.beat))

    def encode(self, results: Sequence[Result]) -> list[str]:
        """The engine's results as lines. One that cannot be encoded (a tag the line protocol
        cannot express) is logged, counted as a worker error and dropped: retried, it would
        hold up every later result."""
        results = self.result_filter(list(results))
        try:
            return self.tables.encode(results)
        except ValueError:
            lines: list[str] = []
            for item in results:
                try:
                    lines += self.tables.encode([item])
                except ValueError:
                    log.exception("analytics result of %s not encodable: dropped", item.measurement)
                    self.engine.on_worker_error()
            return lines

    def _deliver(self, results: list[Result]) -> None:
        self._write(self.encode(results))

    def process(self, columns: dict[str, Columns]) -> tuple[list[str], list[Rejection]]:
        out = self.engine.process(columns)  # alert changes are published as they happen
        late = [
            Rejection(
                Reason.TOO_LATE,
                f"{item.kind} reading at {ts} ns arrived after its analytics window closed: "
                "it is stored, but not in the indices",
                message,
                reading,
            )
            for item in out.too_late
            for message, reading, ts in _per_reading(item)
        ]
        return self.encode(out.results), late

    def idle(self) -> list[str]:
        return self.encode(self.engine.tick().results)

    def flush(self) -> list[str]:
        """Every open window closed now (the end of a scenario run), as lines."""
        return self.encode(self.engine.flush().results)

    def acknowledgements(self, topics: list[str], payloads: list[bytes]) -> list[str]:
        """Apply every ``{topic_root}/alerts/ack`` message of the batch."""
        lines: list[str] = []
        for topic, payload in zip(topics, payloads, strict=True):
            if topic != self.ack_topic:
                continue
            try:
                ack = self._ack_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                log.warning("bad alert acknowledgement %r: %s", payload[:200], exc)
                continue
            lines += self._acknowledge(ack)
        return lines

    def apply_acknowledgement(self, alert_id: int, by: str) -> list[str]:
        """An acknowledgement made elsewhere (`cityflux alerts ack` on the cluster's bucket):
        published and its InfluxDB point written as if it had come over MQTT."""
        return self._acknowledge(AckMessage(alert_id, by), quiet_refusal=True)

    def _acknowledge(self, message: AckMessage, quiet_refusal: bool = False) -> list[str]:
        """The rule of ``cityflux alerts ack``: another operator's acknowledgement stands
        unless the message says ``force``; a refused one is logged and changes nothing."""
        ack = self.engine.alerts.ack(message.id, message.by, message.force)
        if ack.alert is None:
            log.warning("acknowledgement of unknown alert %d", message.id)
            return []
        if ack.status == "refused":
            if quiet_refusal:  # a later acknowledgement overrode this one: it stands
                return []
            log.warning(
                "acknowledgement of alert %d by %s refused: already acknowledged by %s "
                '(send "force": true to acknowledge it again)',
                message.id, message.by, ack.previous_by,
            )  # fmt: skip
            return []
        alert = ack.alert
        # at the time of the alert's current state, not the wall clock: the acknowledged flag
        # updates that point, and a replay's later clearing is never older than the ack
        point = alert_point(alert, self.engine.model.position(alert.entity))
        self._publish_one(alert)
        return self.encode([point])

    def alert_history(self) -> list[Alert]:
        """Every alert in the alert database, oldest first."""
        return self.engine.alerts.store.select()

    def latest_traffic(self) -> TrafficView | None:
        return self.engine.latest_traffic()

    def topic(self, alert: Alert) -> str:
        return f"{self.alert_root}/{alert.district or '-'}/{alert.rule}/{alert.entity}"

    def _publish_one(self, alert: Alert) -> None:
        self.publisher.publish(self.topic(alert), self._encoder.encode(alert), retain=True)

    def recover(self, writer: InfluxWriter, districts: Sequence[str] = ()) -> int:
        """Re-read raw readings of still-open windows from InfluxDB after a restart (of
        ``districts`` only, if given: a partition taken over from another worker).

        Messages acknowledged after the last checkpoint are durable in InfluxDB but not in the
        checkpoint; the panes de-duplicate, so re-reading what the checkpoint has is harmless.
        """
        if writer.config.api != "v1":
            log.warning(
                "analytics recovery reads InfluxQL (/query), which the v2 API does not offer: "
                "windows open at a crash are completed only from the checkpoint"
            )
            return 0
        since = self.engine.recovery_since_ns()
        where = f"time >= {since}"
        if districts:  # ids are [A-Za-z0-9_.-] (the contract): only the dot needs escaping
            names_re = "|".join(d.replace(".", "\\.") for d in districts)
            where += f" AND district =~ /^({names_re})$/"
        recovered: dict[str, Columns] = {}
        for kind, (field_tag, names) in RECOVER_MEASUREMENTS.items():
            try:
                result = writer.query(f'SELECT * FROM "{kind}" WHERE {where}')
            except StoreError as exc:
                log.warning("analytics recovery: %s", exc)
                return 0
            columns = _columns(kind, field_tag, names, result)
            if columns is not None:
                recovered[kind] = columns
        if recovered:  # one arrival: every kind judged against the same watermark
            self.process(recovered)
        total = sum(len(c) for c in recovered.values())
        log.info("analytics recovery re-read %d readings from InfluxDB", total)
        return total

    def close(self) -> None:
        """Stop the worker, wait for its round to end, then the engine's last checkpoint."""
        self.engine.stop()
        self.worker.join(timeout=30)
        self.engine.close()


def _per_reading(late: TooLate) -> list[tuple[int, int, int]]:
    """One entry per (message, reading): a traffic reading has a row per lane."""
    seen: dict[tuple[int, int], int] = {}
    rows = zip(
        late.message_index.tolist(), late.reading_index.tolist(), late.ts_ns.tolist(), strict=True
    )
    for m, r, t in rows:
        seen.setdefault((m, r), t)
    return [(m, r, t) for (m, r), t in seen.items()]


def _columns(kind: str, field_tag: str, names: tuple[str, ...], result: Any) -> Columns | None:
    series = result.get("results", [{}])[0].get("series", [])
    if not series:
        return None
    columns, values = series[0]["columns"], series[0]["values"]
    at = {name: i for i, name in enumerate(columns)}
    if not {"time", "district", "device_id", field_tag or "time"} <= set(at):
        log.warning("analytics recovery: %s has no %s columns; skipped", kind, sorted(at))
        return None
    n = len(values)

    def column(name: str, dtype: Any) -> Any:
        raw = [row[at[name]] for row in values] if name in at else [None] * n
        if dtype is bool:
            return np.array([-1 if v is None else int(v) for v in raw], dtype=np.int8)
        if dtype is int:
            return np.array([0 if v is None else int(v) for v in raw], dtype=np.int64)
        return np.array([np.nan if v is None else float(v) for v in raw], dtype=np.float64)

    types = {"count": int, "interval_s": int, "lamp_on": bool, "lamp_fault": bool}
    fields = {name: column(name, types.get(name, float)) for name in names}
    if field_tag:
        fields[field_tag] = np.array([int(row[at[field_tag]]) for row in values], dtype=np.int64)
    return Columns(
        kind=kind,
        tags={
            "district": np.array([row[at["district"]] for row in values], dtype=object),
            "device_id": np.array([row[at["device_id"]] for row in values], dtype=object),
        },
        fields=fields,
        ts_ns=np.array([row[0] for row in values], dtype=np.int64),
        message_index=np.full(n, -1, dtype=np.int32),
        reading_index=np.zeros(n, dtype=np.int32),
        group=np.arange(n, dtype=np.int32),
    )
