"""The city map as arrays the analytics index into: detectors, links, stations, poles, manholes.

A *link* is one direction of one segment. Entities are numbered once here, so state arrays
are dense and keyed by entity index; ids from the wire are mapped with one dict lookup each.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics import indices
from cityflux.model.citymap import CityMap

Array = npt.NDArray[Any]


def lookup(index: dict[str, int], ids: Array) -> Array:
    """Entity index of each id (-1: not on the map), one C-level dict lookup per row."""
    get = index.get
    return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))


@dataclass(slots=True)
class CityModel:
    city: CityMap
    district_ids: list[str] = field(init=False)
    detector_index: dict[str, int] = field(init=False)
    detector_link: Array = field(init=False)
    detector_lanes: Array = field(init=False)
    link_segment: list[str] = field(init=False)
    link_direction: list[str] = field(init=False)
    link_district: Array = field(init=False)  # district index
    link_class: Array = field(init=False)  # road class strings
    link_length_km: Array = field(init=False)
    link_lanes: Array = field(init=False)
    link_free_flow: Array = field(init=False)
    link_capacity: Array = field(init=False)  # veh/h, all lanes
    link_upstream: Array = field(init=False)  # -1: none
    link_downstream: Array = field(init=False)
    station_pairs: Array = field(init=False)  # (n, 2) detector indices: upstream, downstream
    pole_index: dict[str, int] = field(init=False)
    manhole_index: dict[str, int] = field(init=False)
    # labels the analytics attach to every window's results, built once
    link_speed_bands: Array = field(init=False)
    link_entity: Array = field(init=False)  # "<segment>:<direction>"
    link_district_id: Array = field(init=False)
    link_direction_array: Array = field(init=False)
    detector_ids: Array = field(init=False)
    pair_entity: Array = field(init=False)  # "<segment>:<upstream station>"
    rollup_names: Array = field(init=False)  # districts, then "city"
    # where things are, for maps: a link at its segment's midpoint, an alert at its entity
    link_lat: Array = field(init=False)
    link_lon: Array = field(init=False)
    segment_middle: dict[str, tuple[float, float]] = field(init=False)  # segment -> (lat, lon)
    district_middle: dict[str, tuple[float, float]] = field(init=False)  # and "city"

    def __post_init__(self) -> None:
        city = self.city
        self.district_ids = [d.id for d in city.districts]
        district_of = {d: i for i, d in enumerate(self.district_ids)}
        segments = {s.id: s for s in city.segments}
        links = [(s.id, "forward") for s in city.segments]
        links += [(s.id, "reverse") for s in city.segments if not s.oneway]
        link_of = {link: i for i, link in enumerate(links)}
        seg = [segments[s] for s, _ in links]
        self.link_segment = [s for s, _ in links]
        self.link_direction = [d for _, d in links]
        self.link_district = np.array([district_of[s.district] for s in seg], dtype=np.int64)
        self.link_class = np.array([s.road_class for s in seg], dtype=object)
        self.link_length_km = np.array([s.length_m / 1000 for s in seg])
        self.link_lanes = np.array([s.lanes for s in seg], dtype=np.float64)
        self.link_free_flow = np.array([s.free_flow_kmh for s in seg])
        self.link_capacity = np.array([s.capacity_vphpl for s in seg]) * self.link_lanes
        self.link_upstream, self.link_downstream = _neighbours(city, links, link_of)
        self.detector_index = {d.id: i for i, d in enumerate(city.detectors)}
        self.detector_link = np.array(
            [link_of[(d.segment, d.direction)] for d in city.detectors], dtype=np.int64
        )
        self.detector_lanes = np.array([d.lanes for d in city.detectors], dtype=np.int64)
        self.station_pairs = _station_pairs(self)
        self.pole_index = {p.id: i for i, p in enumerate(city.poles)}
        self.manhole_index = {m.id: i for i, m in enumerate(city.manholes)}
        self.link_speed_bands = indices.speed_bands(self.link_class)
        self.link_entity = np.array([f"{s}:{d}" for s, d in links], dtype=object)
        self.link_district_id = np.array(self.district_ids, dtype=object)[self.link_district]
        self.link_direction_array = np.array(self.link_direction, dtype=object)
        self.detector_ids = np.array([d.id for d in city.detectors], dtype=object)
        up = self.station_pairs[:, 0].tolist()
        self.pair_entity = np.array(
            [f"{city.detectors[i].segment}:{city.detectors[i].id}" for i in up], dtype=object
        )
        self.rollup_names = np.array([*self.district_ids, "city"], dtype=object)
        middle = {s.id: _midpoint(s.geometry) for s in city.segments}
        self.segment_middle = middle
        self.link_lat = np.array([middle[s][0] for s in self.link_segment])
        self.link_lon = np.array([middle[s][1] for s in self.link_segment])
        self.district_middle = _district_middles(city, middle)

    def position(self, entity: str) -> tuple[float, float] | None:
        """Where an alert's entity is, as (lat, lon): a pole or manhole where it stands, a
        detector, link ("seg:dir") or station pair ("seg:station") at its segment's midpoint,
        a district (or "city") at the mean of its segments; None if not on the map."""
        city = self.city
        if (i := self.pole_index.get(entity)) is not None:
            return city.poles[i].lat, city.poles[i].lon
        if (i := self.manhole_index.get(entity)) is not None:
            return city.manholes[i].lat, city.manholes[i].lon
        if (i := self.detector_index.get(entity)) is not None:
            return self.segment_middle[city.detectors[i].segment]
        segment = entity.split(":", 1)[0]
        return self.segment_middle.get(segment) or self.district_middle.get(entity)

    @property
    def links(self) -> int:
        return len(self.link_segment)

    def along(self, detector: int) -> float:
        """Position of a detector along its link in the direction of travel, m."""
        d = self.city.detectors[detector]
        length = self.link_length_km[self.detector_link[detector]] * 1000
        return d.position_m if d.direction == "forward" else length - d.position_m


def _neighbours(
    city: CityMap, links: list[tuple[str, str]], link_of: dict[tuple[str, str], int]
) -> tuple[Array, Array]:
    up = np.full(len(links), -1, dtype=np.int64)
    down = np.full(len(links), -1, dtype=np.int64)
    for segment in city.segments:
        for nxt in segment.next[:1]:
            a, b = link_of[(segment.id, "forward")], link_of.get((nxt, "forward"))
            if b is not None:
                down[a], up[b] = b, a
            ra, rb = link_of.get((nxt, "reverse")), link_of.get((segment.id, "reverse"))
            if ra is not None and rb is not None:
                down[ra], up[rb] = rb, ra
    return up, down


def _station_pairs(model: CityModel) -> Array:
    """Adjacent detector stations along every corridor, upstream first (California pairs)."""
    by_link: dict[int, list[int]] = {}
    for det, link in enumerate(model.detector_link.tolist()):
        by_link.setdefault(link, []).append(det)
    for dets in by_link.values():
        dets.sort(key=model.along)
    pairs: list[tuple[int, int]] = []
    for first in range(model.links):
        if model.link_upstream[first] >= 0:
            continue  # walk each corridor from its first link
        chain: list[int] = []
        seen: set[int] = set()
        link = first
        while link >= 0 and link not in seen:
            seen.add(link)
            chain += by_link.get(link, [])
            link = int(model.link_downstream[link])
        pairs += list(itertools.pairwise(chain))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _midpoint(geometry: list[tuple[float, float]]) -> tuple[float, float]:
    """(lat, lon) halfway between a segment's ends (geometry is [lon, lat] pairs)."""
    (lon_a, lat_a), (lon_b, lat_b) = geometry[0], geometry[-1]
    return round((lat_a + lat_b) / 2, 6), round((lon_a + lon_b) / 2, 6)


def _district_middles(
    city: CityMap, middle: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Each district, and the city, at the mean of its segments' midpoints."""
    out: dict[str, tuple[float, float]] = {}
    for district in [*(d.id for d in city.districts), "city"]:
        points = [middle[s.id] for s in city.segments if district in (s.district, "city")]
        if points:
            lat, lon = np.mean(points, axis=0)
            out[district] = (round(float(lat), 6), round(float(lon), 6))
    return out
