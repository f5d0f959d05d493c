"""Generate a city map (docs/contract.md format) from a seed and a size, and export GeoJSON.

The generated city is a grid of districts. Each district has straight roads in both directions
(one arterial, the rest secondary or branch), and an expressway crosses the city west to east.
Each road line is cut into segments of about ``segment_m`` chained by ``next`` in the forward
direction, so the traffic model sees corridors on which queues can spill back across segments.
Detector stations sit every ``detector_spacing_m`` along each line, in both directions of
two-way roads; poles and manholes are spread along the roads, weighted by length.
Same spec, same seed: byte-identical map (a test checks it).
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgspec
import numpy as np

from cityflux.model.citymap import (
    CityMap,
    Detector,
    District,
    Manhole,
    NoiseZone,
    Pole,
    RoadClass,
    Segment,
)

# Lanes per direction, free-flow speed km/h, capacity veh/h/lane (HCM-order-of-magnitude values).
ROAD_CLASSES: Final[dict[RoadClass, tuple[int, float, float]]] = {
    "expressway": (3, 80.0, 2_000.0),
    "arterial": (3, 60.0, 1_800.0),
    "secondary": (2, 50.0, 1_600.0),
    "branch": (1, 40.0, 1_400.0),
}
# GB 3096 zone of a pole: roadside of major roads is 4a; otherwise the district's land use.
LAND_USE_ZONES: Final[tuple[NoiseZone, ...]] = ("1", "2", "2", "3")
DISTRICT_SIDE_M: Final = 4_000.0
METRES_PER_DEGREE_LAT: Final = 111_320.0
DISTRICT_NAMES: Final = (
    "Centre", "Riverside", "Harbour", "Old Town", "University", "Airport", "Hillside",
    "Lakeside", "Market", "Station", "Garden", "Industrial Park", "Westgate", "Eastgate",
    "Northfield", "Southbank",
)  # fmt: skip


class CitySpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The size of a generated city (:meth:`for_devices`: from a device count)."""

    seed: int = 1
    districts: int = 4
    road_km: float = 60.0
    poles: int = 200
    manholes: int = 100
    detector_spacing_m: float = 500.0
    segment_m: float = 500.0
    centre_lon: float = 121.47
    centre_lat: float = 31.23
    name: str = "Simulated City"

    @classmethod
    def for_devices(cls, devices: int, seed: int = 1) -> CitySpec:
        """A city of about ``devices`` devices: ~8 % detectors, the rest poles and manholes."""
        road_km = max(devices * 0.02, 4.0)  # 2 detector stations per road km (500 m, 2 ways)
        detectors = int(road_km * 2 * 1_000 / 500)
        rest = max(devices - detectors, 2)
        districts = max(1, min(len(DISTRICT_NAMES) * 4, round(math.sqrt(road_km / 8))))
        return cls(
            seed=seed,
            districts=districts,
            road_km=road_km,
            poles=rest * 3 // 5,
            manholes=rest - rest * 3 // 5,
        )


def generate_city(spec: CitySpec) -> CityMap:
    rng = np.random.default_rng(spec.seed)
    columns = math.ceil(math.sqrt(spec.districts))
    districts = [
        District(id=f"d{i + 1:02d}", name=_district_name(i)) for i in range(spec.districts)
    ]
    lines_per_district = max(2, round(spec.road_km * 1_000 / DISTRICT_SIDE_M / spec.districts))
    segments: list[Segment] = []
    detectors: list[Detector] = []
    for index, district in enumerate(districts):
        origin = ((index % columns) * DISTRICT_SIDE_M, (index // columns) * DISTRICT_SIDE_M)
        for line in range(lines_per_district):
            road_class = _road_class(line, lines_per_district)
            horizontal = line % 2 == 0
            offset = (line // 2 + 0.5) * DISTRICT_SIDE_M / math.ceil(lines_per_district / 2)
            start, end = _line_ends(origin, offset, horizontal)
            name = f"{district.name} {'Road' if horizontal else 'Avenue'} {line // 2 + 1}"
            _add_line(spec, district.id, name, road_class, start, end, segments, detectors)
    rows = math.ceil(spec.districts / columns)
    for row in range(rows):  # the expressway: west to east through each row of districts
        y = (row + 0.5) * DISTRICT_SIDE_M + 150.0
        for col in range(columns):
            index = row * columns + col
            if index >= spec.districts:
                break
            start = (col * DISTRICT_SIDE_M, y)
            end = ((col + 1) * DISTRICT_SIDE_M, y)
            _add_line(
                spec, districts[index].id, f"Expressway {row + 1}", "expressway", start, end,
                segments, detectors, chain_from=_last_expressway(segments, row, col),
            )  # fmt: skip
    land_use = {d.id: LAND_USE_ZONES[int(rng.integers(len(LAND_USE_ZONES)))] for d in districts}
    poles = _place_poles(spec, rng, segments, land_use)
    manholes = _place_manholes(spec, rng, segments)
    return CityMap(
        version=1,
        name=spec.name,
        districts=districts,
        segments=segments,
        detectors=detectors,
        poles=poles,
        manholes=manholes,
    )


def _road_class(line: int, lines: int) -> RoadClass:
    """Line 0 is an arterial (line 1 too in bigger districts); then secondary and branch."""
    if line == 0 or (line == 1 and lines >= 4):
        return "arterial"
    return "branch" if line % 3 == 2 else "secondary"


def _district_name(index: int) -> str:
    base = DISTRICT_NAMES[index % len(DISTRICT_NAMES)]
    return base if index < len(DISTRICT_NAMES) else f"{base} {index // len(DISTRICT_NAMES) + 1}"


def _line_ends(
    origin: tuple[float, float], offset: float, horizontal: bool
) -> tuple[tuple[float, float], tuple[float, float]]:
    x0, y0 = origin
    if horizontal:
        return (x0, y0 + offset), (x0 + DISTRICT_SIDE_M, y0 + offset)
    return (x0 + offset, y0), (x0 + offset, y0 + DISTRICT_SIDE_M)


def _last_expressway(segments: list[Segment], row: int, col: int) -> Segment | None:
    """The previous district's last expressway segment on this row, to chain across districts."""
    if col == 0:
        return None
    name = f"Expressway {row + 1}"
    candidates = [s for s in segments if s.name == name]
    return candidates[-1] if candidates else None


def _add_line(
    spec: CitySpec,
    district: str,
    name: str,
    road_class: RoadClass,
    start: tuple[float, float],
    end: tuple[float, float],
    segments: list[Segment],
    detectors: list[Detector],
    chain_from: Segment | None = None,
) -> None:
    lanes, free_flow, capacity = ROAD_CLASSES[road_class]
    length = math.dist(start, end)
    pieces = max(1, round(length / spec.segment_m))
    piece_m = length / pieces
    first_index = len(segments)
    for k in range(pieces):
        a = _lerp(start, end, k / pieces)
        b = _lerp(start, end, (k + 1) / pieces)
        segment_id = f"seg-{len(segments) + 1:05d}"
        segments.append(
            Segment(
                id=segment_id,
                district=district,
                name=name,
                road_class=road_class,
                length_m=round(piece_m, 1),
                lanes=lanes,
                free_flow_kmh=free_flow,
                capacity_vphpl=capacity,
                oneway=False,
                geometry=[_lonlat(spec, a), _lonlat(spec, b)],
                next=[],
            )
        )
        if k > 0:
            _link(segments, len(segments) - 2, segment_id)
    if chain_from is not None:
        _link(segments, segments.index(chain_from), segments[first_index].id)
    _place_detectors(spec, segments[first_index:], piece_m, detectors)


def _link(segments: list[Segment], index: int, next_id: str) -> None:
    segments[index] = msgspec.structs.replace(segments[index], next=[next_id])


def _place_detectors(
    spec: CitySpec, line: list[Segment], piece_m: float, detectors: list[Detector]
) -> None:
    line_m = piece_m * len(line)
    stations = max(1, round(line_m / spec.detector_spacing_m))
    for k in range(stations):
        along = (k + 0.5) * line_m / stations
        segment = line[min(int(along // piece_m), len(line) - 1)]
        position = round(min(along - line.index(segment) * piece_m, segment.length_m), 1)
        for direction in ("forward", "reverse"):
            detectors.append(
                Detector(
                    id=f"det-{len(detectors) + 1:05d}",
                    segment=segment.id,
                    position_m=position,
                    direction=direction,
                    lanes=segment.lanes,
                )
            )


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _lonlat(spec: CitySpec, xy: tuple[float, float]) -> tuple[float, float]:
    """Local metres (east, north) to WGS 84, equirectangular: fine at city scale."""
    lat = spec.centre_lat + xy[1] / METRES_PER_DEGREE_LAT
    lon = spec.centre_lon + xy[0] / (METRES_PER_DEGREE_LAT * math.cos(math.radians(lat)))
    return (round(lon, 6), round(lat, 6))


def _along_roads(
    rng: np.random.Generator, segments: list[Segment], count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` random points on the roads: segment index, lon, lat (offset a few metres)."""
    lengths = np.array([s.length_m for s in segments])
    which = rng.choice(len(segments), size=count, p=lengths / lengths.sum())
    t = rng.random(count)
    a = np.array([s.geometry[0] for s in segments])[which]
    b = np.array([s.geometry[-1] for s in segments])[which]
    points = a + (b - a) * t[:, None] + rng.normal(0, 0.00005, size=(count, 2))
    return which, np.round(points[:, 0], 6), np.round(points[:, 1], 6)


def _place_poles(
    spec: CitySpec,
    rng: np.random.Generator,
    segments: list[Segment],
    land_use: dict[str, NoiseZone],
) -> list[Pole]:
    which, lon, lat = _along_roads(rng, segments, spec.poles)
    width = max(4, len(str(spec.poles)))
    poles = []
    for i, (seg_index, x, y) in enumerate(
        zip(which.tolist(), lon.tolist(), lat.tolist(), strict=True)
    ):
        segment = segments[seg_index]
        major = segment.road_class in ("expressway", "arterial")
        poles.append(
            Pole(
                id=f"pole-{i + 1:0{width}d}",
                district=segment.district,
                segment=segment.id,
                lon=x,
                lat=y,
                noise_zone="4a" if major else land_use[segment.district],
                lamp_rated_w=250.0 if major else 150.0,
            )
        )
    return poles


def _place_manholes(
    spec: CitySpec, rng: np.random.Generator, segments: list[Segment]
) -> list[Manhole]:
    which, lon, lat = _along_roads(rng, segments, spec.manholes)
    depth = np.round(rng.uniform(150, 450, size=spec.manholes), 0)
    width = max(4, len(str(spec.manholes)))
    return [
        Manhole(
            id=f"mh-{i + 1:0{width}d}",
            district=segments[s].district,
            lon=x,
            lat=y,
            depth_cm=d,
        )
        for i, (s, x, y, d) in enumerate(
            zip(which.tolist(), lon.tolist(), lat.tolist(), depth.tolist(), strict=True)
        )
    ]


def to_geojson(city: CityMap) -> dict[str, Any]:
    """Segments as LineStrings, devices as Points, each with its map properties (RFC 7946)."""
    features: list[dict[str, Any]] = []
    for segment in city.segments:
        properties = msgspec.to_builtins(segment)
        geometry = properties.pop("geometry")
        features.append(_feature("segment", properties, "LineString", geometry))
    segments = {s.id: s for s in city.segments}
    for detector in city.detectors:
        segment = segments[detector.segment]
        (x0, y0), (x1, y1) = segment.geometry[0], segment.geometry[-1]
        t = detector.position_m / segment.length_m
        point = [round(x0 + (x1 - x0) * t, 6), round(y0 + (y1 - y0) * t, 6)]
        properties = msgspec.to_builtins(detector) | {"district": segment.district}
        features.append(_feature("detector", properties, "Point", point))
    placed: list[Pole | Manhole] = [*city.poles, *city.manholes]
    for item in placed:
        properties = msgspec.to_builtins(item)
        point = [properties.pop("lon"), properties.pop("lat")]
        kind = "pole" if isinstance(item, Pole) else "manhole"
        features.append(_feature(kind, properties, "Point", point))
    return {"type": "FeatureCollection", "name": city.name, "features": features}


def _feature(kind: str, properties: dict[str, Any], shape: str, coordinates: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": properties["id"],
        "properties": {"kind": kind, **properties},
        "geometry": {"type": shape, "coordinates": coordinates},
    }
