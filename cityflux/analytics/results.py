"""What the engine hands out: the typed result of a batch (:class:`Output`) and the encoding of
window results and alert states as InfluxDB line protocol (docs/schema.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics.alerts import Alert
from cityflux.analytics.citymodel import CityModel
from cityflux.analytics.environment import AirNoise
from cityflux.analytics.traffic import LinkIndices, Rollup
from cityflux.store.lineprotocol import FieldValue, encode_point, encode_table, series_prefixes

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


class Encoder:
    """Window results as lines. The series prefixes of tables whose rows are fixed entities
    (links, poles, districts) are built once, then selected per window. ``enabled=False``
    (benchmarks) encodes no index lines."""

    def __init__(self, model: CityModel, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled
        self._series: dict[str, Array] = {}

    def prefixes(self, key: str, measurement: str, tags: dict[str, list[str]]) -> Array:
        cached = self._series.get(key)
        if cached is None:
            cached = self._series[key] = np.array(series_prefixes(measurement, tags), dtype=object)
        return cached

    def segment_lines(self, links: LinkIndices, window: str, end: int) -> list[str]:
        m = self.model
        ok = links.has_data
        if not self.enabled:
            return []
        prefixes = self.prefixes(f"segment/{window}", SEGMENT_MEASUREMENT, {
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
        return encode_table(prefixes[ok].tolist(), rounded(fields), end)

    def district_lines(self, r: Rollup, window: str, end: int) -> list[str]:
        if not self.enabled:
            return []
        names = [*self.model.district_ids, "city"]
        fields = {
            "tpi": r.tpi, "congested_share": r.congested_share, "cv": r.cv, "vkt": r.vkt,
            "segments_with_data": r.links_with_data.astype(np.int64),
        }  # fmt: skip
        prefixes = self.prefixes(f"district/{window}", DISTRICT_MEASUREMENT,
                                 {"district": names, "window": [window] * len(names)})  # fmt: skip
        return encode_table(prefixes.tolist(), rounded(fields), end)

    def pole_lines(self, result: AirNoise, tags: dict[str, list[str]], end: int) -> list[str]:
        """The hourly air quality and noise of every pole (encoded even when disabled, as
        before the split: the benchmark's figures include them)."""
        air = self.prefixes("air", AIR_MEASUREMENT, tags).tolist()
        noise = self.prefixes("noise", NOISE_MEASUREMENT, tags).tolist()
        lines = encode_table(air, rounded({
            "aqi": result.aqi, "iaqi_pm25": result.iaqi_pm25, "iaqi_pm10": result.iaqi_pm10,
            "pm25_1h_ugm3": result.pm25_1h, "pm10_1h_ugm3": result.pm10_1h,
            "category": result.category.astype(np.int64), "primary": result.primary.astype(object),
        }), end)  # fmt: skip
        lines += encode_table(noise, rounded({
            "leq_1h_dba": result.leq_dba, "limit_dba": result.limit_dba,
            "exceed_dba": result.exceed_dba,
        }), end)  # fmt: skip
        return lines


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


def rounded(fields: dict[str, Array]) -> dict[str, Array]:
    """Floats to 4 decimals: smaller lines, and no spurious precision."""
    return {k: np.round(v, 4) if v.dtype == np.float64 else v for k, v in fields.items()}
