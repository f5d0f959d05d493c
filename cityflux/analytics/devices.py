"""Every device of the city map numbered once, and per-entity ordering of a batch's rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.model.citymap import CityMap

Array = npt.NDArray[Any]


class DeviceIndex:
    """Every device of the map, numbered poles, then manholes, then detectors."""

    def __init__(self, city: CityMap) -> None:
        groups = city.devices_by_kind()
        self.offset: dict[str, int] = {}
        ids: list[str] = []
        districts: list[str] = []
        kinds: list[str] = []
        self._index: dict[str, dict[str, int]] = {}
        for kind, members in groups.items():
            self.offset[kind] = len(ids)
            self._index[kind] = {device: i for i, (device, _) in enumerate(members)}
            ids += [m[0] for m in members]
            districts += [m[1] for m in members]
            kinds += [kind] * len(members)
        self.ids = np.array(ids, dtype=object)
        self.district = np.array(districts, dtype=object)
        self.kind = np.array(kinds, dtype=object)

    def index_of(self, kind: str) -> dict[str, int]:
        return self._index[kind]


def by_occurrence(entity: Array, ts_ns: Array) -> list[Array]:
    """Row indices in rounds: each entity's oldest reading first, then its next, ...; so a
    state machine sees one entity's readings in event-time order, and most batches need one
    round."""
    order = np.lexsort((ts_ns, entity))
    sorted_entity = entity[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = sorted_entity[1:] != sorted_entity[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - first
    return [order[rank == r] for r in range(int(rank.max()) + 1)] if len(order) else []
