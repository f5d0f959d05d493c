"""What the engine hands out: the typed result of a batch (:class:`Output`), with window
results and alert states as :class:`~cityflux.model.points.Table` s and points (docs/schema.md
is the contract: which measurement, tags and fields). The store encodes them; nothing here
formats line protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics.alerts import Alert
from cityflux.analytics.citymodel import CityModel
from cityflux.analytics.environment import AirNoise
from cityflux.analytics.traffic import LinkIndices, Rollup
from cityflux.model.points import FieldValue, Point, Result, Table

Array = npt.NDArray[Any]
SEGMENT_MEASUREMENT = "traffic_segment"
DISTRICT_MEASUREMENT = "traffic_district"
AIR_MEASUREMENT = "air_quality"
AIR_DISTRICT_MEASUREMENT = "air_quality_district"
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
    results: list[Result] = field(default_factory=list)  # tables and alert points, in order
    alerts: list[Alert] = field(default_factory=list)
    too_late: list[TooLate] = field(default_factory=list)


class ResultTables:
    """Window results as :class:`Table` s (docs/schema.md: which measurement, tags and fields).
    Their rows are fixed entities (links, districts, poles), so each table's tag columns are
    built once per series and handed out again; the store caches its series prefixes by the
    same key. ``enabled=False`` (benchmarks) builds no traffic tables."""

    def __init__(self, model: CityModel, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled
        self._tags: dict[str, dict[str, list[str]]] = {}

    def tags(self, series: str, build: Callable[[], dict[str, list[str]]]) -> dict[str, list[str]]:
        cached = self._tags.get(series)
        if cached is None:
            cached = self._tags[series] = build()
        return cached

    def segments(self, links: LinkIndices, window: str, end: int) -> list[Table]:
        if not self.enabled:
            return []
        m, ok = self.model, links.has_data
        series = f"segment/{window}"
        tags = self.tags(series, lambda: {
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
        return [Table(SEGMENT_MEASUREMENT, series, tags, rounded(fields), end, rows=ok)]

    def districts(self, r: Rollup, window: str, end: int) -> list[Table]:
        if not self.enabled:
            return []
        series = f"district/{window}"

        def build() -> dict[str, list[str]]:
            names = [*self.model.district_ids, "city"]
            return {"district": names, "window": [window] * len(names)}

        fields = {
            "tpi": r.tpi, "congested_share": r.congested_share, "cv": r.cv, "vkt": r.vkt,
            "segments_with_data": r.links_with_data.astype(np.int64), "tpi_vkt": r.tpi_vkt,
            "congested_km": r.congested_km, "length_km": r.length_km, "tpi_sum": r.tpi_sum,
            "tpi_sq_sum": r.tpi_sq_sum,
        }  # fmt: skip
        return [Table(DISTRICT_MEASUREMENT, series, self.tags(series, build), rounded(fields), end)]

    def poles(
        self, result: AirNoise, pole_tags: Callable[[], dict[str, list[str]]], end: int
    ) -> list[Table]:
        """The hourly air quality and noise of every pole (built even when disabled, as before
        the split: the benchmark's figures include them), and on the hour the daily AQI.
        ``pole_tags``: builds device_id and district per pole (once: they are cached)."""
        tags = self.tags("poles", pole_tags)
        report, means = result.report, result.means
        air = rounded({
            "aqi": report.aqi, "iaqi_pm25": result.iaqi_pm25, "iaqi_pm10": result.iaqi_pm10,
            "pm25_1h_ugm3": result.pm25_1h, "pm10_1h_ugm3": result.pm10_1h,
            "category": result.category.astype(np.int64), "primary": result.primary.astype(object),
            "iaqi_so2": report.iaqi["so2"], "iaqi_no2": report.iaqi["no2"],
            "iaqi_co": report.iaqi["co"], "iaqi_o3_1h": report.iaqi["o3_1h"],
            "iaqi_o3_8h": report.iaqi["o3_8h"],
            "so2_1h_ugm3": means["so2"], "no2_1h_ugm3": means["no2"], "co_1h_mgm3": means["co"],
            "o3_1h_ugm3": means["o3"], "o3_8h_ugm3": means["o3_8h"],
            "exceeding": report.exceeding.astype(object),
            "qc_flags": result.quality.flags, "qc_flagged": result.quality.flagged,
        })  # fmt: skip
        if result.daily is not None:
            daily = result.daily
            air |= {"aqi_24h": daily.aqi, "category_24h": daily.category,
                    "primary_24h": daily.primary.astype(object)}  # fmt: skip
        noise = rounded({
            "leq_1h_dba": result.leq_dba, "limit_dba": result.limit_dba,
            "exceed_dba": result.exceed_dba, "lmax_dba": result.lmax_dba,
            "lmax_frequent_n": result.lmax_frequent_n, "lmax_violation": result.lmax_violation,
            "period": np.full(len(result.leq_dba), result.period, dtype=object),
        })  # fmt: skip
        return [
            Table(AIR_MEASUREMENT, "poles", tags, air, end),
            Table(NOISE_MEASUREMENT, "poles", tags, noise, end),
            self._air_districts(result, end),
        ]

    def _air_districts(self, result: AirNoise, end: int) -> Table:
        """The district AQI from the means over its poles, flagged sensors left out."""
        names = self.model.district_ids
        tags = self.tags("air_districts", lambda: {"district": list(names)})
        report, means = result.district, result.district_means
        fields = rounded({
            "aqi": report.aqi, "category": report.category.astype(np.int64),
            "primary": report.primary.astype(object), "exceeding": report.exceeding,
            "colour": report.colour, "pm25_1h_ugm3": means["pm25"], "pm10_1h_ugm3": means["pm10"],
            "so2_1h_ugm3": means["so2"], "no2_1h_ugm3": means["no2"],
            "co_1h_mgm3": means["co"], "o3_1h_ugm3": means["o3"], "o3_8h_ugm3": means["o3_8h"],
            "poles": result.district_poles.astype(np.int64),
            "poles_flagged": result.district_flagged.astype(np.int64),
        })  # fmt: skip
        return Table(AIR_DISTRICT_MEASUREMENT, "air_districts", tags, fields, end)


def alert_point(alert: Alert, position: tuple[float, float] | None = None) -> Point:
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
    return Point(
        ALERT_MEASUREMENT,
        {"rule": alert.rule, "severity": alert.severity, "district": alert.district,
         "entity": alert.entity},
        fields,
        alert.cleared_ns if alert.state == "cleared" else alert.started_ns,
    )  # fmt: skip


def rounded(fields: dict[str, Array]) -> dict[str, Array]:
    """Floats to 4 decimals: smaller lines, and no spurious precision."""
    return {k: np.round(v, 4) if v.dtype == np.float64 else v for k, v in fields.items()}
