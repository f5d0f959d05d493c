"""Every device of the city map numbered once, and per-entity ordering of a batch's rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.model.citymap import CityMap
from cityflux.model.devices import number_devices

Array = npt.NDArray[Any]


class DeviceIndex:
    """Every device of the map as numbered by :func:`cityflux.model.devices.number_devices`
    (the simulator's numbering too), with a lookup from device id per kind."""

    def __init__(self, city: CityMap) -> None:
        numbers = number_devices(city)
        self.offset: dict[str, int] = numbers.offset
        self.ids = np.array(numbers.ids, dtype=object)
        self.district = np.array(numbers.district, dtype=object)
        self.kind = np.array(numbers.kind, dtype=object)
        self._index: dict[str, dict[str, int]] = {kind: {} for kind in numbers.offset}
        for number, (kind, device) in enumerate(zip(numbers.kind, numbers.ids, strict=True)):
            self._index[kind][device] = number - numbers.offset[kind]

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
