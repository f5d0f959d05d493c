"""Every device of a city map numbered once: poles, then manholes, then traffic detectors.

The simulator, the analytics and the benchmarks keep per-device state in flat arrays indexed by
this number, so they must all number the devices the same way: this is the one place that does.
"""

from __future__ import annotations

from dataclasses import dataclass

from cityflux.model.citymap import CityMap


@dataclass(frozen=True, slots=True)
class DeviceNumbers:
    """Device ``n`` is ``kind[n]`` ``ids[n]`` in ``district[n]``; each kind's are contiguous."""

    kind: list[str]
    ids: list[str]
    district: list[str]
    offset: dict[str, int]  # first device number of each kind

    def number(self, kind: str, index: int) -> int:
        """The number of the ``index``-th device of ``kind`` in the map's list of that kind."""
        return self.offset[kind] + index

    def topics(self, root: str) -> list[str]:
        """Each device's topic, ``<root>/<district>/<kind>/<device_id>`` (docs/contract.md)."""
        return [
            f"{root}/{district}/{kind}/{device}"
            for kind, device, district in zip(self.kind, self.ids, self.district, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.ids)


def number_devices(city: CityMap) -> DeviceNumbers:
    kinds: list[str] = []
    ids: list[str] = []
    districts: list[str] = []
    offset: dict[str, int] = {}
    for kind, members in city.devices_by_kind().items():
        offset[kind] = len(ids)
        kinds += [kind] * len(members)
        ids += [device for device, _ in members]
        districts += [district for _, district in members]
    return DeviceNumbers(kind=kinds, ids=ids, district=districts, offset=offset)
