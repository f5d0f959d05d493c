"""The city map: districts, road segments, and where each device sits (docs/contract.md)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import msgspec

from cityflux.errors import ConfigError

RoadClass = Literal["expressway", "arterial", "secondary", "branch"]
NoiseZone = Literal["0", "1", "2", "3", "4a", "4b"]


class _Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class District(_Item, frozen=True, kw_only=True):
    id: str
    name: str


class Segment(_Item, frozen=True, kw_only=True):
    id: str
    district: str
    name: str
    road_class: RoadClass
    length_m: float
    lanes: int
    free_flow_kmh: float
    capacity_vphpl: float = 1_800.0
    oneway: bool = False
    geometry: list[tuple[float, float]]
    next: list[str] = []


class Detector(_Item, frozen=True, kw_only=True):
    id: str
    segment: str
    position_m: float
    direction: Literal["forward", "reverse"]
    lanes: int


class Pole(_Item, frozen=True, kw_only=True):
    id: str
    district: str
    segment: str | None = None
    lon: float
    lat: float
    noise_zone: NoiseZone
    lamp_rated_w: float = 150.0


class Manhole(_Item, frozen=True, kw_only=True):
    id: str
    district: str
    lon: float
    lat: float
    depth_cm: float = 300.0


class CityMap(_Item, frozen=True, kw_only=True):
    version: Literal[1]
    name: str
    districts: list[District]
    segments: list[Segment]
    detectors: list[Detector] = []
    poles: list[Pole] = []
    manholes: list[Manhole] = []

    def segment(self, segment_id: str) -> Segment:
        return {s.id: s for s in self.segments}[segment_id]

    def devices_by_kind(self) -> dict[str, list[tuple[str, str]]]:
        """Every device as (id, district) per kind, in this order: poles, manholes, traffic
        detectors (whose district is their segment's). Simulator and analytics number
        devices by it."""
        district_of = {s.id: s.district for s in self.segments}
        return {
            "pole": [(p.id, p.district) for p in self.poles],
            "manhole": [(m.id, m.district) for m in self.manholes],
            "traffic": [(d.id, district_of[d.segment]) for d in self.detectors],
        }


def load_city_map(path: str | Path) -> CityMap:
    """Parse and cross-check a city map file; errors name the offending item."""
    try:
        city = msgspec.json.decode(Path(path).read_bytes(), type=CityMap)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"city map {path}: {exc}") from exc
    problems = check_city_map(city)
    if problems:
        raise ConfigError(f"city map {path}: " + "; ".join(problems))
    return city


def check_city_map(city: CityMap) -> list[str]:
    problems: list[str] = []
    districts = {d.id for d in city.districts}
    segments = {s.id: s for s in city.segments}
    groups: list[list[str]] = [
        [d.id for d in city.districts],
        [s.id for s in city.segments],
        [d.id for d in city.detectors],
        [p.id for p in city.poles],
        [m.id for m in city.manholes],
    ]
    for ids in groups:
        counts = Counter(ids)  # not ids.count(): quadratic on a 100,000-device map
        problems += [f"duplicate id {i!r}" for i in sorted(i for i, n in counts.items() if n > 1)]
    for seg in city.segments:
        if seg.district not in districts:
            problems.append(f"segment {seg.id}: unknown district {seg.district!r}")
        if len(seg.geometry) < 2 or seg.length_m <= 0 or seg.lanes < 1 or seg.free_flow_kmh <= 0:
            problems.append(f"segment {seg.id}: needs 2+ points, positive length, lanes, speed")
        problems += [f"segment {seg.id}: next {n!r} unknown" for n in seg.next if n not in segments]
    for det in city.detectors:
        on = segments.get(det.segment)
        if on is None:
            problems.append(f"detector {det.id}: unknown segment {det.segment!r}")
        elif not 0 <= det.position_m <= on.length_m:
            problems.append(f"detector {det.id}: position {det.position_m} outside the segment")
        elif det.direction == "reverse" and on.oneway:
            problems.append(f"detector {det.id}: reverse direction on a one-way segment")
    placed: list[Pole | Manhole] = [*city.poles, *city.manholes]
    for item in placed:
        if item.district not in districts:
            problems.append(f"{item.id}: unknown district {item.district!r}")
    return problems
