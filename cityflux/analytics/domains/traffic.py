"""Traffic: detector rows into 1-minute panes; per pane the station sums, link indices,
district rollups, the 5-minute sliding window, stuck sensors and the California algorithm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics.alerts import Observation
from cityflux.analytics.results import Output
from cityflux.analytics.traffic import (
    LinkIndices,
    Rollup,
    add_partials,
    link_indices,
    rollup,
    station_partials,
)
from cityflux.model.columns import Columns
from cityflux.model.points import Table

if TYPE_CHECKING:
    from cityflux.analytics.engine import AnalyticsEngine

Array = npt.NDArray[Any]


def add(engine: AnalyticsEngine, cols: Columns, entity: Array, out: Output) -> None:
    f = cols.fields
    lane = np.clip(f["lane"], 1, 16) - 1
    with engine.panes_lock:
        late = engine.traffic.add(
            engine.watermark.value_ns, entity * 16 + lane, cols.ts_ns, count=f["count"],
            occupancy_pct=f["occupancy_pct"], speed_kmh=f["speed_kmh"],
            interval_s=f["interval_s"],
        )  # fmt: skip
    engine.too_late("traffic", cols, late, out)


def pane(engine: AnalyticsEngine, start: int, rows: dict[str, Array], first: bool,
         out: Output) -> None:  # fmt: skip
    if not rows:
        return
    e, model, tables = engine, engine.model, engine.tables
    end = start + e.traffic.pane_ns
    e.station_parts[start] = station_partials(model, rows)
    links = link_indices(model, e.station_parts[start])
    e.counts["traffic_windows"] += 1
    districts = rollup(model, links)
    if first:  # the stuck-sensor count advances once per interval, in order
        _count_repeats(e, e.station_parts[start])
    faulty = e.stuck_count >= e.config.stuck_intervals
    if faulty.any():  # their counts stay; their speeds are not trusted
        parts = dict(e.station_parts[start])
        parts["speed_vehicles"] = np.where(faulty, 0.0, parts["speed_vehicles"])
        parts["inverse_speed"] = np.where(faulty, 0.0, parts["inverse_speed"])
        e.station_parts[start] = parts
        links = link_indices(model, parts)
        districts = rollup(model, links)
    if first:
        _observe_stations(e, end, out)
    if end >= e.latest_end:  # for live views (the demo): replaced whole, never mutated
        e.latest = (end, links, districts)
        e.latest_end = end
    out.results += tables.segments(links, "1m", end)
    out.results += tables.districts(districts, "1m", end)
    out.results += _sliding_tables(e, end)
    if not first:  # a late update also changes the sliding windows emitted after this one
        step = e.traffic.pane_ns
        for later_end in range(end + step, end + e.config.sliding_panes * step, step):
            if later_end - step in e.station_parts:
                out.results += _sliding_tables(e, later_end)
    if first:  # rules see each interval once, in order; late updates only rewrite points
        _observe_segments(e, links, districts, end, out)
        # California runs once per interval too
        parts = e.station_parts[start]
        with np.errstate(invalid="ignore", divide="ignore"):
            occupancy = np.where(parts["rows"] > 0, parts["occupancy_sum"] / parts["rows"], np.nan)
        _observe_incidents(e, e.california.step(occupancy), occupancy, end, out)


def _sliding_tables(engine: AnalyticsEngine, end: int) -> list[Table]:
    """The sliding window ending at ``end``: the last ``sliding_panes`` panes' partials."""
    step = engine.traffic.pane_ns
    starts = range(end - engine.config.sliding_panes * step, end, step)
    window = [engine.station_parts[s] for s in starts if s in engine.station_parts]
    sliding = link_indices(engine.model, add_partials(window))
    return engine.tables.segments(sliding, "5m", end) + engine.tables.districts(
        rollup(engine.model, sliding), "5m", end
    )


def _count_repeats(engine: AnalyticsEngine, parts: dict[str, Array]) -> None:
    """Per station, how many intervals in a row its mean speed repeated exactly with
    vehicles passing: ``stuck_intervals`` of them is a frozen sensor (spot-speed noise
    never repeats to the bit)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        speed = parts["speed_vehicles"] / parts["inverse_speed"]
    same = (speed == engine.last_station_speed) & (parts["speed_vehicles"] > 0)
    engine.stuck_count = np.where(same, engine.stuck_count + 1, 0)
    engine.last_station_speed = speed


def _observe_stations(engine: AnalyticsEngine, end: int, out: Output) -> None:
    m = engine.model
    engine.observe(out, Observation(
        "station", end, m.detector_ids, m.link_district_id[m.detector_link],
        {"stuck_intervals": engine.stuck_count.astype(np.float64)},
    ))  # fmt: skip


def _observe_segments(engine: AnalyticsEngine, links: LinkIndices, r: Rollup, end: int,
                      out: Output) -> None:  # fmt: skip
    m = engine.model
    engine.observe(out, Observation(
        "segment", end, m.link_entity, m.link_district_id,
        {"tpi": links.tpi, "speed_kmh": links.speed_kmh, "tti": links.tti, "vc": links.vc,
         "level": links.level.astype(np.float64)},
        labels={"direction": m.link_direction_array, "speed": links.speed_kmh},
    ))  # fmt: skip
    names = m.rollup_names
    engine.observe(out, Observation(
        "district", end, names, names,
        {"tpi": r.tpi, "congested_share": r.congested_share, "cv": r.cv},
    ))  # fmt: skip


def _observe_incidents(engine: AnalyticsEngine, active: Array, occupancy: Array, end: int,
                       out: Output) -> None:  # fmt: skip
    m = engine.model
    pairs = m.station_pairs
    if not len(pairs):
        return
    up, down = pairs[:, 0], pairs[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        occrdf = (occupancy[up] - occupancy[down]) / occupancy[up]
    # one alert per station pair, named by its segment and its upstream station
    engine.observe(out, Observation(
        "incident", end, m.pair_entity, m.link_district_id[m.detector_link[up]],
        {"active": active.astype(np.float64)},
        labels={"upstream": m.detector_ids[up], "downstream": m.detector_ids[down],
                "occrdf": occrdf},
    ))  # fmt: skip
