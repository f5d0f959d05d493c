"""The streaming analytics core: validated column batches in, index points and alerts out.

    ingest (validated Columns) -> AnalyticsEngine.process()
        traffic rows  -> 1-min panes -> stations -> links -> rollups, California, sliding 5 min
        pole rows     -> 5-min panes -> hourly AQI, Leq, lamp faults
        manhole rows  -> per-reading checks
        status rows   -> online/offline
        every row     -> last seen per device (deadman)
    -> Observations -> AlertEngine -> alert changes (SQLite, MQTT, InfluxDB)
    -> result tables and alert points for InfluxDB (model.points; docs/schema.md)

One engine holds the state of one partition (a set of districts; all of them by default),
keyed by entity index, so districts can be split across processes. Nothing here does network
I/O, formats line protocol or starts a thread: the pipeline (pipeline/analytics_link.py) runs
:meth:`AnalyticsEngine.work` on a supervised thread, encodes the results, writes them durably
and publishes the alert changes.

This module is the orchestration: locks, the worker loop, the watermark, when windows close
and checkpoints are taken. What each kind of reading does lives in ``domains/`` (registered in
``domains.INTAKE``); the result tables in ``results.py``; the checkpointed state in
``snapshot.py`` (the files themselves in ``checkpoint.py``); device numbering in ``devices.py``;
which city map is loaded in ``citymapfile.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from cityflux.analytics import checkpoint as checkpoint_file
from cityflux.analytics import snapshot
from cityflux.analytics.alerts import (
    Alert,
    AlertEngine,
    AlertStorage,
    AlertStore,
    Observation,
    load_rules,
)
from cityflux.analytics.citymapfile import load_configured_map
from cityflux.analytics.citymodel import CityModel, lookup
from cityflux.analytics.devices import DeviceIndex
from cityflux.analytics.domains import INTAKE, status
from cityflux.analytics.domains import poles as poles_domain
from cityflux.analytics.domains import traffic as traffic_domain
from cityflux.analytics.environment import HourlyMeans, ManholeState, PoleSites
from cityflux.analytics.results import Output, ResultTables, TooLate, alert_point
from cityflux.analytics.traffic import (
    California,
    CaliforniaThresholds,
    LinkIndices,
    Rollup,
    TrafficView,
)
from cityflux.analytics.windows import Pane, PaneBuffer, Watermark
from cityflux.config import AnalyticsConfig
from cityflux.model.citymap import CityMap
from cityflux.model.columns import Columns
from cityflux.model.points import Point, Result
from cityflux.model.units import NS

# Output, TooLate and alert_point are imported from here by pipeline.analytics_link
__all__ = ["AnalyticsEngine", "Output", "TooLate", "alert_point"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]


class AnalyticsEngine:
    def __init__(
        self,
        config: AnalyticsConfig,
        city: CityMap | None = None,
        *,
        index_tables: bool = True,
        notify: Callable[[Alert], None] | None = None,
        alert_store: AlertStorage | None = None,
    ) -> None:
        """``alert_store``: where alerts live (default: the SQLite file analytics.alerts_db;
        with several workers, the cluster's KV bucket)."""
        self.config = config
        # called at once for every alert change, before windows are computed: an open manhole
        # cover must not wait for a minute of traffic indices (bench/analytics.py, latency)
        self.notify = notify
        self.city = city or load_configured_map(config.city_map)
        self.model = CityModel(self.city)
        # index_tables=False: compute and alert, hand out no traffic index tables (benchmarks)
        self.tables = ResultTables(self.model, index_tables)
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
        self.devices = DeviceIndex(self.city)
        self.last_seen = np.zeros(len(self.devices.ids), dtype=np.int64)
        store = alert_store if alert_store is not None else AlertStore(config.alerts_db)
        self.alerts = AlertEngine(load_rules(config.rules_file), store)
        self.pole_lon = np.array([p.lon for p in self.city.poles])
        self.pole_lat = np.array([p.lat for p in self.city.poles])
        self.pole_sites = PoleSites.of(self.city)
        self.pole_hours = HourlyMeans(len(self.city.poles))  # 8-hour O3, daily AQI
        self.counts: Counter[str] = Counter()  # unmapped, too_late, windows emitted
        self._last_data = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self.newest_before = status.newest_before([], 0)
        self._silence_minute = 0
        self._poles_forced_ns = 0
        self.stuck_count = np.zeros(len(self.city.detectors), dtype=np.int64)
        self.last_station_speed = np.full(len(self.city.detectors), np.nan)
        self.latest: tuple[int, LinkIndices, Rollup] | None = None
        self.latest_end = 0
        self.checkpoint_path = Path(config.checkpoint_dir) / "windows.npz"
        # Threads (windows_in_background): the caller's thread adds rows and runs the
        # per-reading rules; work(), run by the pipeline on a thread of its own, computes the
        # windows, so an open manhole cover never waits behind a minute of traffic indices.
        # panes_lock guards the pane buffers and the watermark (held briefly); _emit_lock
        # guards everything windows derive (held while computing).
        self.panes_lock = threading.Lock()
        self._emit_lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._background = False
        # called on each failure of the worker (the pipeline counts them in /metrics)
        self.on_worker_error: Callable[[], object] = lambda: None
        self._deliver: Callable[[list[Result]], object] = lambda results: None
        # window results in the order they were computed, not yet written (a failed delivery
        # keeps them first). One queue and one writer at a time, whichever thread computed
        # them (worker, idle tick, flush): a window emitted twice (a late update) must reach
        # the database in that order, or its stale version would win (points overwrite)
        self._undelivered: list[Result] = []
        self._queue_lock = threading.Lock()
        self._deliver_lock = threading.Lock()
        # after each checkpoint file is written (a partition's engine copies it to the cluster)
        self.on_checkpoint: Callable[[Path], object] = lambda path: None
        self.restore()

    def windows_in_background(self, deliver: Callable[[list[Result]], object]) -> None:
        """From now on windows are computed by :meth:`work`, which the caller runs on a
        thread of its own (supervised: restarted and counted if it dies); :meth:`process`
        only wakes it. ``deliver`` writes the window results (durably) from that thread, so
        their volume never holds up ingest."""
        self._deliver = deliver
        self._background = True

    def work(self, beat: Callable[[], object] = lambda: None) -> None:
        """The worker loop, until :meth:`stop`: woken by new data (or every 0.5 s), computes
        the windows that became complete, checkpoints when due, and delivers the results,
        those a failed delivery kept first. ``beat`` reports progress to a watchdog."""
        while not self._stopping.is_set():
            beat()
            self._wake.wait(0.5)
            self._wake.clear()
            out = Output()
            try:
                with self._emit_lock:
                    self._emit(out)
                    self._queue(out.results)
            except Exception:  # a bad window must not stop every later one
                self._worker_failed("computing windows failed")
            try:
                self.deliver_pending()
            except Exception:  # kept, and delivered with the next results
                self._worker_failed(f"{len(self._undelivered)} results not written")
                continue
            try:
                with self._emit_lock:
                    if not self._undelivered:  # the checkpoint says emitted: written too
                        self._maybe_checkpoint()
            except Exception:
                self._worker_failed("checkpoint failed")

    def _queue(self, results: list[Result]) -> None:
        """Results to deliver, in the order computed (the caller holds _emit_lock)."""
        if results:
            with self._queue_lock:
                self._undelivered += results

    def deliver_pending(self) -> None:
        """Write every queued result, oldest first; on failure they stay queued (raises)."""
        with self._deliver_lock:
            with self._queue_lock:
                pending, self._undelivered = self._undelivered, []
            if not pending:
                return
            try:
                self._deliver(pending)
            except BaseException:
                with self._queue_lock:
                    self._undelivered = pending + self._undelivered
                raise

    def stop(self) -> None:
        """Make :meth:`work` return (after the round it is in)."""
        self._stopping.set()
        self._wake.set()

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
        self.newest_before = status.newest_before(
            [c for k, (c, _) in mapped.items() if k != "status"], self.watermark.newest_ns
        )
        # rows are judged against the watermark of the batches before this one: a batch
        # replayed at full speed may span minutes of event time, and is one arrival
        for kind, (cols, entity) in mapped.items():
            intake = INTAKE.get(kind)  # kinds without one (none today) only count as seen
            if intake is not None and len(cols):
                intake(self, cols, entity, out)
        with self.panes_lock:  # devices seen first, then time advances: no false deadman
            readings = [(k, c, e) for k, (c, e) in mapped.items() if k != "status"]
            for kind, cols, entity in readings:
                self._seen(kind, entity, cols.ts_ns)
            for _, cols, _ in readings:  # a clock ahead of the wall clock moves no one's
                self.watermark.observe(cols.ts_ns, limit_ns)
        if any(len(c) for c in columns.values()):
            self._last_data = time.monotonic()
        if self._background:
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

    def too_late(self, kind: str, cols: Columns, late: Array, out: Output) -> None:
        if late.any():
            self.counts["too_late"] += int(late.sum())
            out.too_late.append(
                TooLate(kind, cols.message_index[late], cols.reading_index[late], cols.ts_ns[late])
            )

    # -- windows -------------------------------------------------------------------------
    def tick(self) -> Output:
        """Called when no data arrives: after ``idle_flush_s`` close every open window."""
        out = Output()
        idle = time.monotonic() - self._last_data >= self.config.idle_flush_s
        if idle and self.watermark.newest_ns and self._has_open_panes():
            log.info(
                "no readings for %.0f s: every open window closed",
                time.monotonic() - self._last_data,
            )
            self.flush(out)
        if not self._background:
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
            with self.panes_lock:
                # each buffer to the end of its own pane holding the newest reading: only a
                # minute ahead for traffic, so readings resuming after a lull are not late
                newest = self.watermark.newest_until(limit_ns)
                self.watermark.forced_ns = (
                    newest // self.traffic.pane_ns + 1
                ) * self.traffic.pane_ns
                self._poles_forced_ns = (newest // self.poles.pane_ns + 1) * self.poles.pane_ns
            self._emit(out)
            if self._background:  # written by the one ordered path, now
                self._queue(out.results)
                out.results = []
        if self._background:
            try:
                self.deliver_pending()
            except Exception:  # kept: the worker writes them with its next round
                self._worker_failed(f"{len(self._undelivered)} results not written")
                self._wake.set()
        return out

    def _has_open_panes(self) -> bool:
        with self.panes_lock:
            panes = [*self.traffic.panes.values(), *self.poles.panes.values()]
        return any(p.dirty for p in panes)

    def _emit(self, out: Output) -> None:
        """Compute every window that became complete (caller holds _emit_lock)."""
        with self.panes_lock:  # take the panes' rows; compute without holding the lock
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
            traffic_domain.pane(self, start, Pane.dedup(chunks), first, out)
        for start, chunks in poles:
            poles_domain.pane(self, start, Pane.dedup(chunks), out)
        minute = self.watermark.observed_ns // (60 * NS)
        if minute > self._silence_minute and self.watermark.newest_ns:  # deadman, any data
            self._silence_minute = minute
            status.observe_silence(self, minute * 60 * NS, out)
        keep_traffic = self.traffic.pane_ns * (self.config.sliding_panes + 1)
        keep_env = round(self.config.env_window_s * NS) + self.poles.pane_ns
        forget(self.station_parts, watermark - keep_traffic - self.traffic.lateness_ns)
        forget(self.pole_parts, watermark - keep_env - self.poles.lateness_ns)

    # -- alerts --------------------------------------------------------------------------
    def observe(self, out: Output, observation: Observation) -> None:
        for alert in self.alerts.evaluate(observation):
            out.alerts.append(alert)
            out.results.append(alert_point(alert, self.model.position(alert.entity)))
            if self.notify is not None:
                self.notify(alert)

    def latest_traffic(self) -> TrafficView | None:
        """The last closed minute's traffic indices, or None before the first."""
        with self._emit_lock:
            latest = self.latest
        if latest is None:
            return None
        end, links, rollup = latest
        m = self.model
        return TrafficView(end, m.district_ids, m.link_segment, m.link_direction, links, rollup)

    def acknowledge(self, alert_id: int, by: str) -> tuple[Alert | None, list[Point]]:
        alert = self.alerts.acknowledge(alert_id, by)
        if alert is None:
            return None, []
        # at the time of the alert's current state, not the wall clock: the acknowledged flag
        # updates that point, and a replay's later clearing is never older than the ack
        return alert, [alert_point(alert, self.model.position(alert.entity))]

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
        with self._emit_lock, self.panes_lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Open panes, window partials, watermark and per-device state, atomically and
        durably on disk (checkpoint_file.write). (Alerts are in SQLite already.) Redelivered
        messages after a crash are de-duplicated by the panes, so replaying what the checkpoint
        missed counts nothing twice."""
        checkpoint_file.write(self.checkpoint_path, snapshot.state(self))
        self._last_checkpoint = time.monotonic()
        self.on_checkpoint(self.checkpoint_path)

    def restore(self) -> None:
        """Load the checkpoint, if any. One that cannot be read or does not fit is logged,
        renamed to ``windows.npz.corrupt`` and ignored: the engine starts as if killed before
        its first checkpoint, and the pipeline's recovery re-reads the open windows' raw
        readings from InfluxDB (pipeline.analytics_link.AnalyticsLink.recover)."""
        path = self.checkpoint_path
        if not path.exists():
            return
        try:
            arrays = checkpoint_file.read(path)
            seen = arrays.get("last_seen")
            if seen is not None and seen.ndim == 1 and len(seen) != len(self.last_seen):
                log.warning("checkpoint %s is for another city map: ignored", path)
                return
            checkpoint_file.check(arrays, snapshot.layout(self))
        except checkpoint_file.CheckpointError as exc:
            aside = checkpoint_file.set_aside(path)
            self.counts["checkpoint_corrupt"] += 1
            log.error(
                "analytics checkpoint %s is corrupt (%s): set aside as %s; starting without it, "
                "the open windows are re-read from InfluxDB as after a kill",
                path, exc, aside or "(could not be moved)",
            )  # fmt: skip
            return
        snapshot.apply(self, arrays)
        log.info("analytics restored from %s", path)

    def close(self) -> None:
        """Stop the worker loop, take a last checkpoint (after the worker's round: the caller
        joins its thread first) and close the alert store."""
        self.stop()
        try:
            self.deliver_pending()
        except Exception:
            log.exception(
                "%d window results not written at close: the checkpoint marks them emitted",
                len(self._undelivered),
            )
        self.checkpoint()
        self.alerts.store.close()


def forget(store: dict[int, Any], before_ns: int) -> None:
    """Drop the partials of panes that started before ``before_ns``."""
    for start in [s for s in store if s < before_ns]:
        del store[start]
