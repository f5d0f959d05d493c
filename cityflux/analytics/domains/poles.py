"""Poles (environment): rows into 5-minute panes; per pane the hourly six-pollutant AQI (and on
the hour the daily one), Leq and the night-time Lmax against the zone limits, and lamp faults.
Everything is computed for all poles at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics.alerts import Observation
from cityflux.analytics.environment import POLE_INPUTS, air_noise, hour_of, pole_partials
from cityflux.analytics.quality import STUCK_PANES
from cityflux.analytics.results import Output
from cityflux.model.columns import Columns
from cityflux.model.units import NS

if TYPE_CHECKING:
    from cityflux.analytics.engine import AnalyticsEngine

Array = npt.NDArray[Any]


def add(engine: AnalyticsEngine, cols: Columns, entity: Array, out: Output) -> None:
    f = cols.fields
    missing = np.full(len(cols), np.nan)  # a field an older recovery query did not read
    values = {name: f.get(name, missing) for name in POLE_INPUTS}
    with engine.panes_lock:
        late = engine.poles.add(engine.watermark.value_ns, entity, cols.ts_ns, **values)
    engine.too_late("pole", cols, late, out)


def pane(engine: AnalyticsEngine, start: int, rows: dict[str, Array], out: Output) -> None:
    if not rows:
        return
    e, config, sites = engine, engine.config, engine.pole_sites
    end = start + e.poles.pane_ns
    e.pole_parts[start] = pole_partials(
        sites, rows, config.lamp_power_tolerance, e.pole_lon, e.pole_lat
    )
    window_ns = round(config.env_window_s * NS)
    summed = hour_of([p for s, p in e.pole_parts.items() if end - window_ns <= s < end])
    recent_ns = STUCK_PANES * e.poles.pane_ns  # the stuck-sensor check's panes
    recent = hour_of([p for s, p in e.pole_parts.items() if end - recent_ns <= s < end])
    # the hour is judged by the period it starts in (GB 3096: a clock hour never straddles
    # 06:00 or 22:00, so its start decides)
    begins_s = (end - window_ns) / NS + config.utc_offset_h * 3600
    start_local_hour = (begins_s % 86_400) / 3600
    result = air_noise(
        sites, summed, e.pole_parts[start], recent, e.pole_hours, end, start_local_hour,
        config.aqi_table,
    )  # fmt: skip
    out.results += e.tables.poles(result, lambda: {
        "device_id": sites.ids.tolist(), "district": sites.district.tolist()}, end)  # fmt: skip
    ids, district = sites.ids, sites.district
    e.observe(out, Observation(
        "air", end, ids, district, {"aqi": result.aqi},
        labels={"primary": result.primary, "exceeding": result.report.exceeding},
    ))  # fmt: skip
    period = np.full(len(ids), result.period, dtype=object)
    e.observe(out, Observation(
        "noise", end, ids, district,
        {"exceed_dba": result.exceed_dba, "lmax_violation": result.lmax_violation},
        labels={"leq": result.leq_dba, "limit": result.limit_dba, "period": period,
                "lmax": result.lmax_dba, "frequent": result.lmax_frequent_n},
    ))  # fmt: skip
    e.observe(
        out, Observation("lamp", end, ids, district, {"fault_share": result.lamp_fault_share})
    )
    qc = result.quality
    e.observe(out, Observation(
        "sensor", end, ids, district, {"stuck": qc.stuck, "drift": qc.drift,
                                       "out_of_physics": qc.physics},
        labels={"flags": qc.flags},
    ))  # fmt: skip
