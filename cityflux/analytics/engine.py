"""The streaming analytics core: validated column batches in, index points and alerts out.

    ingest (validated Columns) -> AnalyticsEngine.process()
        traffic rows  -> 1-min panes -> stations -> links -> rollups, California, sliding 5 min
        pole rows     -> 5-min panes -> hourly AQI, Leq, lamp faults
        manhole rows  -> per-reading checks
        status rows   -> online/offline
        every row     -> last seen per device (deadman)
    -> Observations -> AlertEngine -> alert changes (SQLite, MQTT, InfluxDB)
    -> lines for InfluxDB (docs/schema.md)

One engine holds the state of one partition (a set of districts; all of them by default),
keyed by entity index, so districts can be split across processes. Nothing here does network
I/O: the pipeline writes the lines durably and publishes the alert changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from cityflux.analytics import checkpoint as checkpoint_file
from cityflux.analytics.alerts import Alert, AlertEngine, AlertStore, Observation, load_rules
from cityflux.analytics.citymodel import CityModel, lookup
from cityflux.analytics.environment import (
    POLE_PARTIALS,
    ManholeState,
    air_noise,
    pole_partials,
)
from cityflux.analytics.traffic import (
    PARTIALS,
    California,
    CaliforniaThresholds,
    LinkIndices,
    Rollup,
    add_partials,
    link_indices,
    rollup,
    station_partials,
)
from cityflux.analytics.windows import NS, Pane, PaneBuffer, Watermark
from cityflux.citymap import CityMap, load_city_map
from cityflux.config import AnalyticsConfig
from cityflux.ingest.batch import Columns
from cityflux.store.lineprotocol import FieldValue, encode_point, encode_table, series_prefixes
from cityflux.supervisor import Component, Spawn

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]
SEGMENT_MEASUREMENT = "traffic_segment"
DISTRICT_MEASUREMENT = "traffic_district"
AIR_MEASUREMENT = "air_quality"
NOISE_MEASUREMENT = "noise"
ALERT_MEASUREMENT = "cityflux_alert"


@dataclass(slots=True)
class TooLate:
    """Readings that arrived after their window closed (stored raw, not in the analytics)."""

    kind: str
    message_index: Array
    reading_index: Array
    ts_ns: Array


@dataclass(slots=True)
class Output:
    lines: list[str] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    too_late: list[TooLate] = field(default_factory=list)


class AnalyticsEngine:
    def __init__(
        self,
        config: AnalyticsConfig,
        city: CityMap | None = None,
        *,
        encode: bool = True,
        notify: Callable[[Alert], None] | None = None,
    ) -> None:
        self.config = config
        # called at once for every alert change, before windows are computed: an open manhole
        # cover must not wait for a minute of traffic indices (bench/analytics.py, latency)
        self.notify = notify
        self.encode = encode  # False: compute and alert, write no index lines (benchmarks)
        self.city = city or load_city_map(resolve_map(config.city_map))
        self.model = CityModel(self.city)
        self.watermark = Watermark(round(config.delay_s * NS))
        # event time a batch can move the watermark to: the wall clock + this (docs/analytics.md)
        self._skew_ns = round(max(config.max_clock_skew_s, 0.0) * NS)
        self.traffic = PaneBuffer(config.pane_s, config.lateness_s)
        self.poles = PaneBuffer(config.env_pane_s, config.lateness_s)
        self.station_parts: dict[int, dict[str, Array]] = {}  # pane start -> station sums
        self.pole_parts: dict[int, dict[str, Array]] = {}
        thresholds = {k: CaliforniaThresholds(**msgspec.to_builtins(v))
                      for k, v in config.california.items()}  # fmt: skip
        self.california = California(self.model, thresholds)
        self.manholes = ManholeState(np.array([m.depth_cm for m in self.city.manholes]))
        self.devices = _DeviceIndex(self.city)
        self.last_seen = np.zeros(len(self.devices.ids), dtype=np.int64)
        self.alerts = AlertEngine(load_rules(config.rules_file), AlertStore(config.alerts_db))
        self.pole_lon = np.array([p.lon for p in self.city.poles])
        self.pole_lat = np.array([p.lat for p in self.city.poles])
        self.counts: Counter[str] = Counter()  # unmapped, too_late, windows emitted
        self._last_data = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._newest_before = _newest_before([], 0)
        self._series: dict[str, Array] = {}
        self._silence_minute = 0
        self._poles_forced_ns = 0
        self._stuck_count = np.zeros(len(self.city.detectors), dtype=np.int64)
        self._last_station_speed = np.full(len(self.city.detectors), np.nan)
        self.latest: tuple[int, LinkIndices, Rollup] | None = None
        self.latest_end = 0
        self._checkpoint_path = Path(config.checkpoint_dir) / "windows.npz"
        # Threads (start_worker): the caller's thread adds rows and runs the per-reading rules;
        # a worker computes the windows, so an open manhole cover never waits behind a minute
        # of traffic indices. _panes_lock guards the pane buffers and the watermark (held
        # briefly); _emit_lock guards everything windows derive (held while computing).
        self._panes_lock = threading.Lock()
        self._emit_lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        # called on each failure of the worker (the pipeline counts them in /metrics)
        self.on_worker_error: Callable[[], object] = lambda: None
        self._deliver: Callable[[list[str]], object] = lambda lines: None
        self.restore()

    def start_worker(
        self, deliver: Callable[[list[str]], object], spawn: Spawn | None = None
    ) -> None:
        """Compute windows on a thread of their own. ``deliver`` writes the window results
        (durably) from that thread, so their volume never holds up ingest. ``spawn`` starts
        the thread under the caller's supervisor (restarted and counted if it dies)."""
        self._deliver = deliver
        self._undelivered: list[str] = []  # results whose write raised: retried first
        if spawn is not None:
            self._worker = spawn("analytics", self._work)
            return
        self._worker = threading.Thread(target=self._work, name="analytics", daemon=True)
        self._worker.start()

    def _work(self, component: Component | None = None) -> None:
        while not self._stopping.is_set():
            if component is not None:
                component.beat()
            self._wake.wait(0.5)
            self._wake.clear()
            out = Output()
            try:
                with self._emit_lock:
                    self._emit(out)
                    self._maybe_checkpoint()
            except Exception:  # a bad window must not stop every later one
                self._worker_failed("computing windows failed")
            self._undelivered += out.lines
            if self._undelivered:
                try:
                    self._deliver(self._undelivered)
                except Exception:  # kept, and delivered with the next results
                    self._worker_failed(f"{len(self._undelivered)} result lines not written")
                else:
                    self._undelivered = []

    def _worker_failed(self, what: str) -> None:
        log.exception("analytics worker: %s", what)
        self.counts["worker_errors"] += 1
        self.on_worker_error()

    # -- input ---------------------------------------------------------------------------
    def process(self, columns: dict[str, Columns], now_ns: int | None = None) -> Output:
        """``now_ns``: the wall clock at arrival (default: now); event time cannot advance
        past it + ``max_clock_skew_s``."""
        out = Output()
        limit_ns = (now_ns or time.time_ns()) + self._skew_ns
        mapped = {kind: self._map(kind, cols) for kind, cols in columns.items()}
        self._newest_before = _newest_before(
            [c for k, (c, _) in mapped.items() if k != "status"], self.watermark.newest_ns
        )
        # rows are judged against the watermark of the batches before this one: a batch
        # replayed at full speed may span minutes of event time, and is one arrival
        for kind, (cols, entity) in mapped.items():
            handler = getattr(self, f"_add_{kind}", None)
            if handler is not None and len(cols):
                handler(cols, entity, out)
        with self._panes_lock:  # devices seen first, then time advances: no false deadman
            readings = [(k, c, e) for k, (c, e) in mapped.items() if k != "status"]
            for kind, cols, entity in readings:
                self._seen(kind, entity, cols.ts_ns)
            for _, cols, _ in readings:  # a clock ahead of the wall clock moves no one's
                self.watermark.observe(cols.ts_ns, limit_ns)
        if any(len(c) for c in columns.values()):
            self._last_data = time.monotonic()
        if self._worker is not None:
            self._wake.set()
        else:
            with self._emit_lock:
                self._emit(out)
                self._maybe_checkpoint()
        return out

    def _map(self, kind: str, cols: Columns) -> tuple[Columns, Array]:
        if kind == "status":  # any device may announce itself; rules match on its id
            return cols, np.zeros(len(cols), dtype=np.int64)
        index = self.devices.index_of(kind)
        entity = lookup(index, cols.tags["device_id"])
        known = entity >= 0
        if not known.all():
            self.counts["unmapped"] += int((~known).sum())
            cols, entity = cols.select(known), entity[known]
        return cols, entity

    def _seen(self, kind: str, entity: Array, ts_ns: Array) -> None:
        numbers = entity + self.devices.offset[kind]
        np.maximum.at(self.last_seen, numbers, ts_ns)

    def _too_late(self, kind: str, cols: Columns, late: Array, out: Output) -> None:
        if late.any():
            self.counts["too_late"] += int(late.sum())
            out.too_late.append(
                TooLate(kind, cols.message_index[late], cols.reading_index[late], cols.ts_ns[late])
            )

    def _add_traffic(self, cols: Columns, entity: Array, out: Output) -> None:
        f = cols.fields
        lane = np.clip(f["lane"], 1, 16) - 1
        with self._panes_lock:
            late = self.traffic.add(
                self.watermark.value_ns, entity * 16 + lane, cols.ts_ns, count=f["count"],
                occupancy_pct=f["occupancy_pct"], speed_kmh=f["speed_kmh"],
                interval_s=f["interval_s"],
            )  # fmt: skip
        self._too_late("traffic", cols, late, out)

    def _add_pole(self, cols: Columns, entity: Array, out: Output) -> None:
        f = cols.fields
        with self._panes_lock:
            late = self.poles.add(
                self.watermark.value_ns, entity, cols.ts_ns,
                pm25_ugm3=f["pm25_ugm3"], pm10_ugm3=f["pm10_ugm3"], noise_dba=f["noise_dba"],
                lamp_on=f["lamp_on"], lamp_power_w=f["lamp_power_w"], lamp_fault=f["lamp_fault"],
            )  # fmt: skip
        self._too_late("pole", cols, late, out)

    def _add_manhole(self, cols: Columns, entity: Array, out: Output) -> None:
        rows = {"entity": entity, "ts_ns": cols.ts_ns, **cols.fields}
        metrics = self.manholes.metrics(rows)
        for at in _by_occurrence(entity, cols.ts_ns):
            self._observe(out, Observation(
                "manhole", int(cols.ts_ns[at].max()), cols.tags["device_id"][at],
                cols.tags["district"][at], {k: v[at] for k, v in metrics.items()},
            ))  # fmt: skip

    def _add_status(self, cols: Columns, entity: Array, out: Output) -> None:
        online = cols.fields["online"].astype(np.float64)
        ids = cols.tags["device_id"]
        # A last will carries no clock: ingest stamps it on arrival. During a replay faster
        # than real time that is far ahead of event time, so it is taken as the newest event
        # time of the readings that arrived before it (the same instant when running live).
        ts = cols.ts_ns
        before = self._newest_before(cols.message_index)
        ts = np.where(before > 0, np.minimum(ts, before), ts)
        for at in _by_occurrence(lookup({d: i for i, d in enumerate(set(ids))}, ids), ts):
            self._observe(out, Observation(
                "status", int(ts[at].max()), ids[at], cols.tags["district"][at],
                {"online": online[at]},
            ))  # fmt: skip

    # -- windows -------------------------------------------------------------------------
    def tick(self) -> Output:
        """Called when no data arrives: after ``idle_flush_s`` close every open window."""
        out = Output()
        idle = time.monotonic() - self._last_data >= self.config.idle_flush_s
        if idle and self.watermark.newest_ns and self._has_open_panes():
            self.flush(out)
        if self._worker is None:
            with self._emit_lock:
                self._maybe_checkpoint()
        return out

    def flush(self, out: Output | None = None, now_ns: int | None = None) -> Output:
        """Treat every reading seen so far as on time and complete: emit all open windows,
        but none beyond the wall clock + ``max_clock_skew_s`` (a clock running ahead); those
        close on a later idle tick, once the wall clock has caught up."""
        out = out or Output()
        limit_ns = (now_ns or time.time_ns()) + self._skew_ns
        with self._emit_lock:
            with self._panes_lock:
                # each buffer to the end of its own pane holding the newest reading: only a
                # minute ahead for traffic, so readings resuming after a lull are not late
                newest = self.watermark.newest_until(limit_ns)
                self.watermark.forced_ns = (
                    newest // self.traffic.pane_ns + 1
                ) * self.traffic.pane_ns
                self._poles_forced_ns = (newest // self.poles.pane_ns + 1) * self.poles.pane_ns
            self._emit(out)
        return out

    def _has_open_panes(self) -> bool:
        with self._panes_lock:
            panes = [*self.traffic.panes.values(), *self.poles.panes.values()]
        return any(p.dirty for p in panes)

    def _emit(self, out: Output) -> None:
        """Compute every window that became complete (caller holds _emit_lock)."""
        with self._panes_lock:  # take the panes' rows; compute without holding the lock
            watermark = self.watermark.value_ns
            poles_watermark = max(watermark, self._poles_forced_ns)
            traffic_due = self.traffic.due(watermark)
            poles_due = self.poles.due(poles_watermark)
            traffic = [(p.start_ns, list(p.chunks), not p.emitted) for p in traffic_due]
            poles = [(p.start_ns, list(p.chunks)) for p in poles_due]
            for pane in [*traffic_due, *poles_due]:
                pane.emitted, pane.dirty = True, False
            self.traffic.expire(watermark)
            self.poles.expire(poles_watermark)
        for start, chunks, first in traffic:
            self._traffic_pane(start, Pane.dedup(chunks), first, out)
        for start, chunks in poles:
            self._pole_pane(start, Pane.dedup(chunks), out)
        minute = self.watermark.observed_ns // (60 * NS)
        if minute > self._silence_minute and self.watermark.newest_ns:  # deadman, any data
            self._silence_minute = minute
            self._observe_silence(minute * 60 * NS, out)
        keep_traffic = self.traffic.pane_ns * (self.config.sliding_panes + 1)
        keep_env = round(self.config.env_window_s * NS) + self.poles.pane_ns
        _forget(self.station_parts, watermark - keep_traffic - self.traffic.lateness_ns)
        _forget(self.pole_parts, watermark - keep_env - self.poles.lateness_ns)

    def _traffic_pane(self, start: int, rows: dict[str, Array], first: bool, out: Output) -> None:
        if not rows:
            return
        end = start + self.traffic.pane_ns
        self.station_parts[start] = station_partials(self.model, rows)
        links = link_indices(self.model, self.station_parts[start])
        self.counts["traffic_windows"] += 1
        districts = rollup(self.model, links)
        if first:  # the stuck-sensor count advances once per interval, in order
            self._count_repeats(self.station_parts[start])
        faulty = self._stuck_count >= self.config.stuck_intervals
        if faulty.any():  # their counts stay; their speeds are not trusted
            parts = dict(self.station_parts[start])
            parts["speed_vehicles"] = np.where(faulty, 0.0, parts["speed_vehicles"])
            parts["inverse_speed"] = np.where(faulty, 0.0, parts["inverse_speed"])
            self.station_parts[start] = parts
            links = link_indices(self.model, parts)
            districts = rollup(self.model, links)
        if first:
            self._observe_stations(end, out)
        if end >= self.latest_end:  # for live views (the demo): replaced whole, never mutated
            self.latest = (end, links, districts)
            self.latest_end = end
        out.lines += self._segment_lines(links, "1m", end)
        out.lines += self._district_lines(districts, "1m", end)
        out.lines += self._sliding_lines(end)
        if not first:  # a late update also changes the sliding windows emitted after this one
            step = self.traffic.pane_ns
            for later_end in range(end + step, end + self.config.sliding_panes * step, step):
                if later_end - step in self.station_parts:
                    out.lines += self._sliding_lines(later_end)
        if first:  # rules see each interval once, in order; late updates only rewrite points
            self._observe_segments(links, districts, end, out)
            # California runs once per interval too
            parts = self.station_parts[start]
            with np.errstate(invalid="ignore", divide="ignore"):
                occupancy = np.where(
                    parts["rows"] > 0, parts["occupancy_sum"] / parts["rows"], np.nan
                )
            self._observe_incidents(self.california.step(occupancy), occupancy, end, out)

    def _prefixes(self, key: str, measurement: str, tags: dict[str, list[str]]) -> Array:
        """Series prefixes of a table whose rows are fixed entities (links, poles, districts):
        built once, then selected per window."""
        cached = self._series.get(key)
        if cached is None:
            cached = self._series[key] = np.array(series_prefixes(measurement, tags), dtype=object)
        return cached

    def _sliding_lines(self, end: int) -> list[str]:
        """The sliding window ending at ``end``: the last ``sliding_panes`` panes' partials."""
        step = self.traffic.pane_ns
        starts = range(end - self.config.sliding_panes * step, end, step)
        window = [self.station_parts[s] for s in starts if s in self.station_parts]
        sliding = link_indices(self.model, add_partials(window))
        return self._segment_lines(sliding, "5m", end) + self._district_lines(
            rollup(self.model, sliding), "5m", end
        )

    def _count_repeats(self, parts: dict[str, Array]) -> None:
        """Per station, how many intervals in a row its mean speed repeated exactly with
        vehicles passing: ``stuck_intervals`` of them is a frozen sensor (spot-speed noise
        never repeats to the bit)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            speed = parts["speed_vehicles"] / parts["inverse_speed"]
        same = (speed == self._last_station_speed) & (parts["speed_vehicles"] > 0)
        self._stuck_count = np.where(same, self._stuck_count + 1, 0)
        self._last_station_speed = speed

    def _observe_stations(self, end: int, out: Output) -> None:
        m = self.model
        self._observe(out, Observation(
            "station", end, m.detector_ids, m.link_district_id[m.detector_link],
            {"stuck_intervals": self._stuck_count.astype(np.float64)},
        ))  # fmt: skip

    def _segment_lines(self, links: LinkIndices, window: str, end: int) -> list[str]:
        m = self.model
        ok = links.has_data
        if not self.encode:
            return []
        prefixes = self._prefixes(f"segment/{window}", SEGMENT_MEASUREMENT, {
            "segment": m.link_segment, "direction": m.link_direction,
            "district": np.array(m.district_ids, dtype=object)[m.link_district].tolist(),
            "road_class": m.link_class.tolist(), "window": [window] * m.links,
        })  # fmt: skip
        fields = {
            "flow_vph": links.flow_vph[ok], "occupancy_pct": links.occupancy_pct[ok],
            "speed_kmh": links.speed_kmh[ok], "density_vpkm": links.density_vpkm[ok],
            "travel_time_s": links.travel_time_s[ok], "tti": links.tti[ok],
            "delay_proportion": links.dtp[ok], "tpi": links.tpi[ok],
            "level": links.level[ok].astype(np.int64), "los": links.los[ok].astype(object),
            "vc": links.vc[ok], "imputed": links.imputed[ok],
        }  # fmt: skip
        if window == "5m":  # maps read the 5-minute window: positions there only
            fields |= {"lat": m.link_lat[ok], "lon": m.link_lon[ok]}
        return encode_table(prefixes[ok].tolist(), _rounded(fields), end)

    def _district_lines(self, r: Rollup, window: str, end: int) -> list[str]:
        if not self.encode:
            return []
        names = [*self.model.district_ids, "city"]
        fields = {
            "tpi": r.tpi, "congested_share": r.congested_share, "cv": r.cv, "vkt": r.vkt,
            "segments_with_data": r.links_with_data.astype(np.int64),
        }  # fmt: skip
        prefixes = self._prefixes(f"district/{window}", DISTRICT_MEASUREMENT,
                                  {"district": names, "window": [window] * len(names)})  # fmt: skip
        return encode_table(prefixes.tolist(), _rounded(fields), end)

    def _observe_segments(self, links: LinkIndices, r: Rollup, end: int, out: Output) -> None:
        m = self.model
        self._observe(out, Observation(
            "segment", end, m.link_entity, m.link_district_id,
            {"tpi": links.tpi, "speed_kmh": links.speed_kmh, "tti": links.tti, "vc": links.vc,
             "level": links.level.astype(np.float64)},
            labels={"direction": m.link_direction_array, "speed": links.speed_kmh},
        ))  # fmt: skip
        names = m.rollup_names
        self._observe(out, Observation(
            "district", end, names, names,
            {"tpi": r.tpi, "congested_share": r.congested_share, "cv": r.cv},
        ))  # fmt: skip

    def _observe_incidents(self, active: Array, occupancy: Array, end: int, out: Output) -> None:
        pairs = self.model.station_pairs
        if not len(pairs):
            return
        m = self.model
        up, down = pairs[:, 0], pairs[:, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            occrdf = (occupancy[up] - occupancy[down]) / occupancy[up]
        # one alert per station pair, named by its segment and its upstream station
        self._observe(out, Observation(
            "incident", end, m.pair_entity, m.link_district_id[m.detector_link[up]],
            {"active": active.astype(np.float64)},
            labels={"upstream": m.detector_ids[up], "downstream": m.detector_ids[down],
                    "occrdf": occrdf},
        ))  # fmt: skip

    def _observe_silence(self, end: int, out: Output) -> None:
        with self._panes_lock:  # a consistent pair: ingest updates both under this lock
            observed, last_seen = self.watermark.observed_ns, self.last_seen.copy()
        silent = np.where(last_seen > 0, (observed - last_seen) / NS, np.nan)
        devices = self.devices
        self._observe(out, Observation(
            "silence", max(observed, end), devices.ids, devices.district,
            {"silent_s": silent}, kind=devices.kind,
        ))  # fmt: skip

    def _pole_pane(self, start: int, rows: dict[str, Array], out: Output) -> None:
        if not rows:
            return
        end = start + self.poles.pane_ns
        self.pole_parts[start] = pole_partials(
            self.city, rows, self.config.lamp_power_tolerance, self.pole_lon, self.pole_lat
        )
        hour = [p for s, p in self.pole_parts.items()
                if end - round(self.config.env_window_s * NS) <= s < end]  # fmt: skip
        summed = {k: np.sum([p[k] for p in hour], axis=0) for k in POLE_PARTIALS}
        local_hour = ((end / NS + self.config.utc_offset_h * 3600) % 86_400) / 3600
        result = air_noise(
            self.city, summed, self.pole_parts[start], local_hour, self.config.aqi_table
        )
        ids = np.array([p.id for p in self.city.poles], dtype=object)
        district = np.array([p.district for p in self.city.poles], dtype=object)
        tags = {"device_id": ids.tolist(), "district": district.tolist()}
        air = self._prefixes("air", AIR_MEASUREMENT, tags).tolist()
        noise = self._prefixes("noise", NOISE_MEASUREMENT, tags).tolist()
        out.lines += encode_table(air, _rounded({
            "aqi": result.aqi, "iaqi_pm25": result.iaqi_pm25, "iaqi_pm10": result.iaqi_pm10,
            "pm25_1h_ugm3": result.pm25_1h, "pm10_1h_ugm3": result.pm10_1h,
            "category": result.category.astype(np.int64), "primary": result.primary.astype(object),
        }), end)  # fmt: skip
        period = "day" if 6 <= local_hour < 22 else "night"
        out.lines += encode_table(noise, _rounded({
            "leq_1h_dba": result.leq_dba, "limit_dba": result.limit_dba,
            "exceed_dba": result.exceed_dba,
        }), end)  # fmt: skip
        self._observe(out, Observation(
            "air", end, ids, district, {"aqi": result.aqi},
            labels={"primary": result.primary},
        ))  # fmt: skip
        self._observe(out, Observation(
            "noise", end, ids, district, {"exceed_dba": result.exceed_dba},
            labels={"leq": result.leq_dba, "limit": result.limit_dba,
                    "period": np.full(len(ids), period, dtype=object)},
        ))  # fmt: skip
        self._observe(
            out, Observation("lamp", end, ids, district, {"fault_share": result.lamp_fault_share})
        )

    # -- alerts --------------------------------------------------------------------------
    def _observe(self, out: Output, observation: Observation) -> None:
        for alert in self.alerts.evaluate(observation):
            out.alerts.append(alert)
            out.lines.append(alert_line(alert, self.model.position(alert.entity)))
            if self.notify is not None:
                self.notify(alert)

    def acknowledge(self, alert_id: int, by: str) -> tuple[Alert | None, list[str]]:
        alert = self.alerts.acknowledge(alert_id, by)
        if alert is None:
            return None, []
        # at the time of the alert's current state, not the wall clock: the acknowledged flag
        # updates that point, and a replay's later clearing is never older than the ack
        return alert, [alert_line(alert, self.model.position(alert.entity))]

    # -- checkpoints ---------------------------------------------------------------------
    def recovery_since_ns(self, now_ns: int | None = None) -> int:
        """Event time from which raw readings must be re-read after a restart: the oldest
        pane that may still change. Without a checkpoint (a first start, or killed before
        the first one) the watermark is taken from the wall clock, as for live data."""
        watermark = self.watermark.value_ns
        if not self.watermark.newest_ns:
            watermark = (now_ns or time.time_ns()) - self.watermark.delay_ns
        horizon = watermark - self.traffic.lateness_ns
        oldest = min(horizon - self.traffic.pane_ns, horizon - self.poles.pane_ns)
        return max(oldest, 0)

    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        with self._emit_lock, self._panes_lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Open panes, window partials, watermark and per-device state, atomically and
        durably on disk (checkpoint_file.write). (Alerts are in SQLite already.) Redelivered
        messages after a crash are de-duplicated by the panes, so replaying what the checkpoint
        missed counts nothing twice."""
        checkpoint_file.write(self._checkpoint_path, self._state())
        self._last_checkpoint = time.monotonic()

    def _state(self) -> dict[str, Array]:
        w = self.watermark
        arrays: dict[str, Array] = {
            "watermark": np.array([w.newest_ns, w.forced_ns, w.ahead_ns], dtype=np.int64),
            "last_seen": self.last_seen,
            "manhole_level": self.manholes.last_level,
            "manhole_ts": self.manholes.last_ts,
            "manhole_rise": self.manholes.rise,
            "stuck_count": self._stuck_count,
            "last_station_speed": self._last_station_speed,
        }
        arrays |= self.traffic.state("traffic") | self.poles.state("poles")
        for name, store in (("station", self.station_parts), ("pole", self.pole_parts)):
            for start, parts in store.items():
                arrays |= {f"{name}#{start}#{k}": v for k, v in parts.items()}
        for i, occupancy in enumerate(self.california.history):
            arrays[f"california#{i}"] = occupancy
        arrays |= {"california_tentative": self.california.tentative,
                   "california_active": self.california.active,
                   "california_quiet": self.california.quiet}  # fmt: skip
        return arrays

    def _layout(self) -> checkpoint_file.Layout:
        """What this engine's checkpoints hold (taken from its state before a restore)."""
        fixed = {k: v for k, v in self._state().items() if "|" not in k and "#" not in k}
        stations, poles = len(self.city.detectors), len(self.city.poles)
        lanes = {"entity", "ts_ns", "count", "occupancy_pct", "speed_kmh", "interval_s"}
        pole = {"entity", "ts_ns", "pm25_ugm3", "pm10_ugm3", "noise_dba", "lamp_on",
                "lamp_power_w", "lamp_fault"}  # fmt: skip
        return checkpoint_file.Layout(
            arrays=fixed,
            optional=frozenset({"manhole_rise", "stuck_count", "last_station_speed"}),
            panes={"traffic": (frozenset(lanes), stations * 16), "poles": (frozenset(pole), poles)},
            partials={
                "station": (frozenset(PARTIALS), stations),
                "pole": (frozenset(POLE_PARTIALS), poles),
            },
            series={"california": (3, stations)},
        )

    def restore(self) -> None:
        """Load the checkpoint, if any. One that cannot be read or does not fit is logged,
        renamed to ``windows.npz.corrupt`` and ignored: the engine starts as if killed before
        its first checkpoint, and the pipeline's recovery re-reads the open windows' raw
        readings from InfluxDB (link.AnalyticsLink.recover)."""
        path = self._checkpoint_path
        if not path.exists():
            return
        try:
            arrays = checkpoint_file.read(path)
            seen = arrays.get("last_seen")
            if seen is not None and seen.ndim == 1 and len(seen) != len(self.last_seen):
                log.warning("checkpoint %s is for another city map: ignored", path)
                return
            checkpoint_file.check(arrays, self._layout())
        except checkpoint_file.CheckpointError as exc:
            aside = checkpoint_file.set_aside(path)
            self.counts["checkpoint_corrupt"] += 1
            log.error(
                "analytics checkpoint %s is corrupt (%s): set aside as %s; starting without it, "
                "the open windows are re-read from InfluxDB as after a kill",
                path, exc, aside or "(could not be moved)",
            )  # fmt: skip
            return
        self._apply(arrays)
        log.info("analytics restored from %s", path)

    def _apply(self, arrays: dict[str, Array]) -> None:
        """Take the state of a checked checkpoint (checkpoint_file.check: nothing here fails)."""
        newest, forced, *ahead = (int(v) for v in arrays["watermark"])
        self.watermark.newest_ns, self.watermark.forced_ns = newest, forced
        self.watermark.ahead_ns = max([newest, *ahead])
        self.last_seen = arrays["last_seen"]
        self.manholes.last_level, self.manholes.last_ts = (
            arrays["manhole_level"],
            arrays["manhole_ts"],
        )
        self.manholes.rise = arrays.get("manhole_rise", self.manholes.rise)
        self._stuck_count = arrays.get("stuck_count", self._stuck_count)
        self._last_station_speed = arrays.get("last_station_speed", self._last_station_speed)
        self.traffic.restore("traffic", arrays)
        self.poles.restore("poles", arrays)
        for name, store in (("station", self.station_parts), ("pole", self.pole_parts)):
            for key, value in arrays.items():
                if key.startswith(f"{name}#"):
                    _, start, part = key.split("#")
                    store.setdefault(int(start), {})[part] = value
        self.california.history = [arrays[f"california#{i}"] for i in range(3)
                                    if f"california#{i}" in arrays]  # fmt: skip
        self.california.tentative = arrays["california_tentative"]
        self.california.active = arrays["california_active"]
        self.california.quiet = arrays["california_quiet"]

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.checkpoint()
        self.alerts.store.close()


def resolve_map(path: str) -> Path:
    """A relative map path is looked up in the working directory, then in the source tree
    (so the shipped example works from anywhere in a checkout)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    shipped = Path(__file__).resolve().parents[2] / path
    return shipped if shipped.exists() else candidate


def alert_line(alert: Alert, position: tuple[float, float] | None = None) -> str:
    """The alert's current state as a point at the time it took that state, so dashboards can
    annotate it (and map it, at the entity's ``position``)."""
    fields: dict[str, FieldValue] = {
        "alert_id": alert.id, "state": alert.state, "acknowledged": alert.acknowledged,
        "flapping": alert.flapping,
        "value": float(alert.value) if np.isfinite(alert.value) else 0.0,
        "message": alert.message,
    }  # fmt: skip
    if position is not None:
        fields["lat"], fields["lon"] = position
    return encode_point(
        ALERT_MEASUREMENT,
        {"rule": alert.rule, "severity": alert.severity, "district": alert.district,
         "entity": alert.entity},
        fields,
        alert.cleared_ns if alert.state == "cleared" else alert.started_ns,
    )  # fmt: skip


def _newest_before(readings: list[Columns], newest_ns: int) -> Any:
    """A function: message positions -> the newest event time among the readings of the
    messages before them in the batch (or ``newest_ns`` of earlier batches)."""
    rows = [c for c in readings if len(c)]
    if not rows:
        return lambda positions: np.full(len(positions), newest_ns, dtype=np.int64)
    messages = np.concatenate([c.message_index for c in rows])
    times = np.concatenate([c.ts_ns for c in rows])
    size = int(messages.max()) + 2
    newest = np.full(size, newest_ns, dtype=np.int64)
    np.maximum.at(newest, messages + 1, times)  # +1: strictly before
    running = np.maximum.accumulate(newest)

    def lookup_before(positions: Array) -> Array:
        result: Array = running[np.clip(positions, 0, size - 1)]
        return result

    return lookup_before


def _by_occurrence(entity: Array, ts_ns: Array) -> list[Array]:
    """Row indices in rounds: each entity's oldest reading first, then its next, ...; so a
    state machine sees one entity's readings in event-time order, and most batches need one
    round."""
    order = np.lexsort((ts_ns, entity))
    sorted_entity = entity[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = sorted_entity[1:] != sorted_entity[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - first
    return [order[rank == r] for r in range(int(rank.max()) + 1)] if len(order) else []


def _forget(store: dict[int, Any], before_ns: int) -> None:
    for start in [s for s in store if s < before_ns]:
        del store[start]


def _rounded(fields: dict[str, Array]) -> dict[str, Array]:
    """Floats to 4 decimals: smaller lines, and no spurious precision."""
    return {k: np.round(v, 4) if v.dtype == np.float64 else v for k, v in fields.items()}


class _DeviceIndex:
    """Every device of the map, numbered poles, then manholes, then detectors."""

    def __init__(self, city: CityMap) -> None:
        groups = city.devices_by_kind()
        self.offset: dict[str, int] = {}
        ids: list[str] = []
        districts: list[str] = []
        kinds: list[str] = []
        self._index: dict[str, dict[str, int]] = {}
        for kind, members in groups.items():
            self.offset[kind] = len(ids)
            self._index[kind] = {device: i for i, (device, _) in enumerate(members)}
            ids += [m[0] for m in members]
            districts += [m[1] for m in members]
            kinds += [kind] * len(members)
        self.ids = np.array(ids, dtype=object)
        self.district = np.array(districts, dtype=object)
        self.kind = np.array(kinds, dtype=object)

    def index_of(self, kind: str) -> dict[str, int]:
        return self._index[kind]
