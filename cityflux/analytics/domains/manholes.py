"""Manholes: every reading checked on arrival (cover, level, rise), no windows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from cityflux.analytics.alerts import Observation
from cityflux.analytics.devices import by_occurrence
from cityflux.analytics.results import Output
from cityflux.model.columns import Columns

if TYPE_CHECKING:
    from cityflux.analytics.engine import AnalyticsEngine

Array = npt.NDArray[Any]


def add(engine: AnalyticsEngine, cols: Columns, entity: Array, out: Output) -> None:
    rows = {"entity": entity, "ts_ns": cols.ts_ns, **cols.fields}
    metrics = engine.manholes.metrics(rows)
    for at in by_occurrence(entity, cols.ts_ns):
        engine.observe(out, Observation(
            "manhole", int(cols.ts_ns[at].max()), cols.tags["device_id"][at],
            cols.tags["district"][at], {k: v[at] for k, v in metrics.items()},
        ))  # fmt: skip
