"""The city generator: deterministic per seed, valid against the contract, sized as asked."""

from __future__ import annotations

import msgspec

from cityflux.model.citymap import CityMap, check_city_map
from cityflux.simulators.citygen import CitySpec, generate_city, to_geojson


def test_same_seed_same_city_other_seed_other_city() -> None:
    first = msgspec.json.encode(generate_city(CitySpec(seed=3)))
    again = msgspec.json.encode(generate_city(CitySpec(seed=3)))
    other = msgspec.json.encode(generate_city(CitySpec(seed=4)))
    assert first == again
    assert first != other


def test_generated_map_validates_and_round_trips_through_the_contract_decoder() -> None:
    city = generate_city(CitySpec(seed=1, districts=5, road_km=50, poles=300, manholes=150))
    assert check_city_map(city) == []
    decoded = msgspec.json.decode(msgspec.json.encode(city), type=CityMap)
    assert decoded == city
    assert {d.id for d in city.districts} == {"d01", "d02", "d03", "d04", "d05"}
    assert len(city.poles) == 300
    assert len(city.manholes) == 150
    assert {s.road_class for s in city.segments} >= {"expressway", "arterial", "secondary"}
    # stations every 500 m per direction: about 4 detectors per road km
    road_km = sum(s.length_m for s in city.segments) / 1000
    assert 3.5 * road_km <= len(city.detectors) <= 4.5 * road_km
    assert {d.direction for d in city.detectors} == {"forward", "reverse"}


def test_segments_chain_into_corridors() -> None:
    city = generate_city(CitySpec(seed=2))
    ids = {s.id for s in city.segments}
    chained = [s for s in city.segments if s.next]
    assert len(chained) > len(city.segments) / 2
    assert all(n in ids for s in chained for n in s.next)


def test_a_100k_device_city() -> None:
    city = generate_city(CitySpec.for_devices(100_000, seed=1))
    devices = len(city.detectors) + len(city.poles) + len(city.manholes)
    assert 99_000 <= devices <= 101_000
    assert check_city_map(city) == []


def test_geojson_has_a_feature_per_segment_and_device() -> None:
    city = generate_city(CitySpec(seed=1, districts=2, road_km=16, poles=20, manholes=10))
    collection = msgspec.json.decode(msgspec.json.encode(to_geojson(city)))
    features = collection["features"]
    kinds = [f["properties"]["kind"] for f in features]
    assert kinds.count("segment") == len(city.segments)
    assert kinds.count("detector") == len(city.detectors)
    assert kinds.count("pole") == 20
    assert kinds.count("manhole") == 10
    line = next(f for f in features if f["properties"]["kind"] == "segment")
    assert line["geometry"]["type"] == "LineString"
    assert line["geometry"]["coordinates"] == [list(p) for p in city.segments[0].geometry]
    pole = next(f for f in features if f["properties"]["kind"] == "pole")
    assert pole["geometry"] == {
        "type": "Point",
        "coordinates": [city.poles[0].lon, city.poles[0].lat],
    }
    assert pole["properties"]["noise_zone"] == city.poles[0].noise_zone
