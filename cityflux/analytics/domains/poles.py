"""Poles (environment): rows into 5-minute panes; per pane the hourly AQI, Leq against the
zone limits, and lamp faults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics.alerts import Observation
from cityflux.analytics.environment import POLE_PARTIALS, air_noise, pole_partials
from cityflux.analytics.results import Output
from cityflux.model.columns import Columns
from cityflux.model.units import NS

if TYPE_CHECKING:
    from cityflux.analytics.engine import AnalyticsEngine

Array = npt.NDArray[Any]


def add(engine: AnalyticsEngine, cols: Columns, entity: Array, out: Output) -> None:
    f = cols.fields
    with engine.panes_lock:
        late = engine.poles.add(
            engine.watermark.value_ns, entity, cols.ts_ns,
            pm25_ugm3=f["pm25_ugm3"], pm10_ugm3=f["pm10_ugm3"], noise_dba=f["noise_dba"],
            lamp_on=f["lamp_on"], lamp_power_w=f["lamp_power_w"], lamp_fault=f["lamp_fault"],
        )  # fmt: skip
    engine.too_late("pole", cols, late, out)


def pane(engine: AnalyticsEngine, start: int, rows: dict[str, Array], out: Output) -> None:
    if not rows:
        return
    e, city, config = engine, engine.city, engine.config
    end = start + e.poles.pane_ns
    e.pole_parts[start] = pole_partials(
        city, rows, config.lamp_power_tolerance, e.pole_lon, e.pole_lat
    )
    hour = [p for s, p in e.pole_parts.items()
            if end - round(config.env_window_s * NS) <= s < end]  # fmt: skip
    summed = {k: np.sum([p[k] for p in hour], axis=0) for k in POLE_PARTIALS}
    local_hour = ((end / NS + config.utc_offset_h * 3600) % 86_400) / 3600
    result = air_noise(city, summed, e.pole_parts[start], local_hour, config.aqi_table)
    ids = np.array([p.id for p in city.poles], dtype=object)
    district = np.array([p.district for p in city.poles], dtype=object)
    tags = {"device_id": ids.tolist(), "district": district.tolist()}
    out.results += e.tables.poles(result, tags, end)
    period = "day" if 6 <= local_hour < 22 else "night"
    e.observe(out, Observation(
        "air", end, ids, district, {"aqi": result.aqi},
        labels={"primary": result.primary},
    ))  # fmt: skip
    e.observe(out, Observation(
        "noise", end, ids, district, {"exceed_dba": result.exceed_dba},
        labels={"leq": result.leq_dba, "limit": result.limit_dba,
                "period": np.full(len(ids), period, dtype=object)},
    ))  # fmt: skip
    e.observe(
        out, Observation("lamp", end, ids, district, {"fault_share": result.lamp_fault_share})
    )
