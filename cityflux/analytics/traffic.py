"""Traffic indices per link and window, rollups per district and city, and incident detection.

Per 1-minute pane, each detector *station* (all lanes of one detector) reduces to partial sums;
a window (1 pane, or the last 5 for the 5-minute sliding window) adds them up, and each link
(one direction of a segment) combines its stations:

* flow q (veh/h) = vehicles / time covered per lane x 3600, averaged over the link's stations
* occupancy (%) = mean over lanes and intervals
* space-mean speed v_s = sum(n) / sum(n / v): the volume-weighted harmonic mean of the
  detectors' mean spot speeds (a link whose stations counted no vehicle flows freely: v = vf)
* density k = q / v_s (veh/km, and per lane); travel time = length / v_s;
  TTI = T / T0 = vf / v_s; delay proportion DTP = 1 - v_s / vf; TPI per GB/T 33171;
  congestion level from the speed bands of the road class; HCM LOS; v/c = q / capacity
* a link with no station data is imputed from its upstream and downstream neighbours (the mean
  of their speeds and occupancies, flagged ``imputed``) or reported as no data: never zero.

Rollups per district and for the city: TPI weighted by vehicle-kilometres (q x length), the
share of road length at light congestion or worse (TPI >= 4), and the coefficient of variation
of segment TPI (std / mean), the imbalance measure.

Incidents: the California algorithm on adjacent stations (see :class:`California`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics import indices
from cityflux.analytics.citymodel import CityModel

Array = npt.NDArray[Any]
PARTIALS = ("vehicles", "occupancy_sum", "rows", "speed_vehicles", "inverse_speed", "covered_s")


def station_partials(model: CityModel, rows: dict[str, Array]) -> dict[str, Array]:
    """Sums per detector station from one pane's de-duplicated lane rows."""
    n = len(model.detector_lanes)
    det = rows["entity"] // 16
    count = rows["count"].astype(np.float64)
    speed = rows["speed_kmh"]
    has_speed = (count > 0) & (speed > 0)
    safe_speed = np.where(has_speed, speed, 1.0)

    def total(weights: Array) -> Array:
        summed: Array = np.bincount(det, weights=weights, minlength=n)
        return summed

    return {
        "vehicles": total(count),
        "occupancy_sum": total(rows["occupancy_pct"]),
        "rows": total(np.ones(len(det))),
        "speed_vehicles": total(np.where(has_speed, count, 0.0)),
        "inverse_speed": total(np.where(has_speed, count / safe_speed, 0.0)),
        "covered_s": total(rows["interval_s"].astype(np.float64)),
    }


def add_partials(parts: list[dict[str, Array]]) -> dict[str, Array]:
    return {key: np.sum([p[key] for p in parts], axis=0) for key in PARTIALS}


@dataclass(slots=True)
class LinkIndices:
    """One value per link; NaN where there is no data."""

    flow_vph: Array
    occupancy_pct: Array
    speed_kmh: Array
    density_vpkm: Array
    travel_time_s: Array
    tti: Array
    dtp: Array
    tpi: Array
    level: Array
    los: Array
    vc: Array
    imputed: Array
    has_data: Array


def link_indices(model: CityModel, stations: dict[str, Array]) -> LinkIndices:
    links = model.links
    lanes = model.detector_lanes.astype(np.float64)
    reported = stations["rows"] > 0
    per_lane_s = np.where(reported, stations["covered_s"] / lanes, np.nan)
    station_flow = stations["vehicles"] / per_lane_s * 3600.0
    station_occ = np.where(
        reported, stations["occupancy_sum"] / np.maximum(stations["rows"], 1), np.nan
    )

    def per_link(values: Array) -> tuple[Array, Array]:
        ok = ~np.isnan(values)
        total = np.bincount(model.detector_link[ok], weights=values[ok], minlength=links)
        count = np.bincount(model.detector_link[ok], minlength=links).astype(np.float64)
        mean: Array = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return mean, count

    flow, n_stations = per_link(station_flow)
    occupancy, _ = per_link(station_occ)
    link_of = model.detector_link
    veh = np.bincount(link_of, weights=stations["speed_vehicles"], minlength=links)
    inv = np.bincount(link_of, weights=stations["inverse_speed"], minlength=links)
    counted = np.bincount(link_of, weights=stations["vehicles"], minlength=links)
    has_data = n_stations > 0
    # vehicles but no usable speed (none measured, or a faulty station's excluded): unknown
    unknown = np.where(counted > 0, np.nan, model.link_free_flow)
    speed = np.where(inv > 0, veh / np.maximum(inv, 1e-12), unknown)
    speed = np.where(has_data, np.minimum(speed, model.link_free_flow * 1.2), np.nan)
    speed, occupancy, flow, imputed = _impute(model, speed, occupancy, flow, has_data)
    return _derived(model, flow, occupancy, speed, imputed, has_data)


def _impute(
    model: CityModel, speed: Array, occupancy: Array, flow: Array, has_data: Array
) -> tuple[Array, Array, Array, Array]:
    """Links without data (and links whose speed is unknown) take the mean of their
    neighbours that have it (one hop); the returned mask says which speeds were imputed."""
    neighbours = np.stack([model.link_upstream, model.link_downstream], axis=1)
    exists = neighbours >= 0
    at = np.maximum(neighbours, 0)

    def fill(values: Array, need: Array) -> tuple[Array, Array]:
        valid = exists & ~np.isnan(values[at])
        usable = need & valid.any(axis=1)
        taken = np.where(valid, values[at], 0.0)
        mean = taken.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
        filled: Array = np.where(usable, mean, values)
        return filled, usable

    speed, imputed = fill(speed, np.isnan(speed))
    occupancy, _ = fill(occupancy, ~has_data)
    flow, _ = fill(flow, ~has_data)
    return speed, occupancy, flow, imputed


def _derived(
    model: CityModel, flow: Array, occupancy: Array, speed: Array, imputed: Array, has_data: Array
) -> LinkIndices:
    with np.errstate(divide="ignore", invalid="ignore"):
        density = flow / speed
        travel_time = model.link_length_km / speed * 3600.0
        tti = model.link_free_flow / speed
    vc = flow / model.link_capacity
    dtp = indices.delay_proportion(speed, model.link_free_flow)
    tpi = indices.tpi_from_dtp(dtp)
    level = indices.congestion_level(speed, model.link_speed_bands)
    los = indices.level_of_service(
        model.link_class, speed, model.link_free_flow, density / model.link_lanes, vc
    )
    return LinkIndices(
        flow_vph=flow,
        occupancy_pct=occupancy,
        speed_kmh=speed,
        density_vpkm=density,
        travel_time_s=travel_time,
        tti=tti,
        dtp=dtp,
        tpi=tpi,
        level=level,
        los=los,
        vc=vc,
        imputed=imputed,
        has_data=has_data | imputed,
    )


@dataclass(slots=True)
class Rollup:
    """Per district (index order of the map), then the city as the last row."""

    tpi: Array
    congested_share: Array
    cv: Array
    vkt: Array
    links_with_data: Array
    # sums from which the city's figures follow from the district rows alone (workers that
    # each hold some districts write no city row): TPI = sum(tpi_vkt) / sum(vkt), congested
    # share = sum(congested_km) / sum(length_km), CV from the segment TPIs' sum and sum of
    # squares over links_with_data
    tpi_vkt: Array
    congested_km: Array
    length_km: Array
    tpi_sum: Array
    tpi_sq_sum: Array


def rollup(model: CityModel, link: LinkIndices) -> Rollup:
    districts = len(model.district_ids)
    ok = link.has_data & ~np.isnan(link.tpi)
    group = np.where(ok, model.link_district, districts)  # no-data links go to a spare bin
    bins = districts + 1
    vkt = np.where(ok, np.nan_to_num(link.flow_vph) * model.link_length_km, 0.0)
    tpi = np.nan_to_num(link.tpi)
    length = np.where(ok, model.link_length_km, 0.0)
    congested = np.where(ok & (tpi >= 4.0), model.link_length_km, 0.0)

    def by_district(weights: Array) -> Array:
        sums: Array = np.bincount(group, weights=weights, minlength=bins)[:districts]
        return np.append(sums, sums.sum())

    w_tpi, w = by_district(tpi * vkt), by_district(vkt)
    n = by_district(ok.astype(np.float64))
    tpi_sum, tpi_sq_sum = by_district(tpi), by_district(tpi * tpi)
    congested_km, length_km = by_district(congested), by_district(length)
    mean = tpi_sum / np.maximum(n, 1)
    mean_sq = tpi_sq_sum / np.maximum(n, 1)
    std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return Rollup(
            tpi=np.where(w > 0, w_tpi / w, np.where(n > 0, mean, np.nan)),
            congested_share=np.where(n > 0, congested_km / length_km, np.nan),
            cv=np.where(mean > 0, std / mean, np.where(n > 0, 0.0, np.nan)),
            vkt=w,
            links_with_data=n,
            tpi_vkt=w_tpi,
            congested_km=congested_km,
            length_km=length_km,
            tpi_sum=tpi_sum,
            tpi_sq_sum=tpi_sq_sum,
        )


@dataclass(frozen=True, slots=True)
class TrafficView:
    """The last closed minute's indices with the names to show them by (the demo's view)."""

    end_ns: int
    district_ids: list[str]  # the rollup's rows, then "city"
    link_segment: list[str]
    link_direction: list[str]
    links: LinkIndices
    rollup: Rollup


@dataclass(frozen=True, slots=True)
class CaliforniaThresholds:
    occdf_pct: float = 8.0  # T1: occupancy difference, percentage points
    occrdf: float = 0.5  # T2: relative occupancy difference
    docctd: float = 0.3  # T3: relative drop of downstream occupancy over 2 intervals
    persistence: int = 1  # intervals the tests must hold before the alarm (#7's persistence)
    clear_after: int = 2  # intervals with OCCRDF < T2 before the incident is over


@dataclass(slots=True)
class California:
    """The California incident detection algorithm (Payne & Tignor 1978) on station pairs.

    For adjacent stations i (upstream) and i+1, with 1-minute occupancies:
    OCCDF = OCC(i,t) - OCC(i+1,t); OCCRDF = OCCDF / OCC(i,t);
    DOCCTD = (OCC(i+1,t-2) - OCC(i+1,t)) / OCC(i+1,t-2).
    A pair becomes *tentative* when OCCDF >= T1, OCCRDF >= T2 and DOCCTD >= T3; the incident is
    *confirmed* when OCCDF and OCCRDF still pass after ``persistence`` intervals (algorithm #7's
    persistence test), and *over* once OCCRDF < T2 for ``clear_after`` intervals.
    Thresholds are per road class (the site class), from config.
    """

    model: CityModel
    thresholds: dict[str, CaliforniaThresholds]
    history: list[Array] = field(default_factory=list)  # station occupancy, newest last
    tentative: Array = field(init=False)
    active: Array = field(init=False)
    quiet: Array = field(init=False)
    t1: Array = field(init=False)
    t2: Array = field(init=False)
    t3: Array = field(init=False)
    persistence: Array = field(init=False)
    clear_after: Array = field(init=False)

    def __post_init__(self) -> None:
        pairs = self.model.station_pairs
        n = len(pairs)
        self.tentative = np.zeros(n, dtype=np.int64)
        self.active = np.zeros(n, dtype=bool)
        self.quiet = np.zeros(n, dtype=np.int64)
        upstream_class: list[str] = (
            self.model.link_class[self.model.detector_link[pairs[:, 0]]].tolist() if n else []
        )
        site = [self.thresholds.get(str(c), CaliforniaThresholds()) for c in upstream_class]
        self.t1 = np.array([s.occdf_pct for s in site])
        self.t2 = np.array([s.occrdf for s in site])
        self.t3 = np.array([s.docctd for s in site])
        self.persistence = np.array([s.persistence for s in site], dtype=np.int64)
        self.clear_after = np.array([s.clear_after for s in site], dtype=np.int64)

    def step(self, station_occupancy: Array) -> Array:
        """One interval; returns whether each pair is in the incident state now."""
        self.history = [*self.history[-2:], station_occupancy]
        pairs = self.model.station_pairs
        if len(self.history) < 3 or not len(pairs):
            return self.active.copy()
        up, down = station_occupancy[pairs[:, 0]], station_occupancy[pairs[:, 1]]
        down_before = self.history[0][pairs[:, 1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            occdf = up - down
            occrdf = occdf / up
            docctd = (down_before - down) / down_before
        spatial = (occdf >= self.t1) & (occrdf >= self.t2)  # NaN compares False: no data
        onset = spatial & (docctd >= self.t3)
        self.tentative = np.where(onset | ((self.tentative > 0) & spatial), self.tentative + 1, 0)
        confirmed = self.tentative > self.persistence
        still = occrdf >= self.t2
        self.quiet = np.where(self.active & ~still, self.quiet + 1, 0)
        self.active = confirmed | (self.active & (self.quiet < self.clear_after))
        return self.active.copy()
