"""Device status: online/offline announcements (and last wills) on arrival, and the deadman
(devices silent too long) once per minute of event time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics.alerts import Observation
from cityflux.analytics.citymodel import lookup
from cityflux.analytics.devices import by_occurrence
from cityflux.analytics.results import Output
from cityflux.model.columns import Columns
from cityflux.model.units import NS

if TYPE_CHECKING:
    from cityflux.analytics.engine import AnalyticsEngine

Array = npt.NDArray[Any]
NewestBefore = Callable[[Array], Array]


def add(engine: AnalyticsEngine, cols: Columns, entity: Array, out: Output) -> None:
    online = cols.fields["online"].astype(np.float64)
    ids = cols.tags["device_id"]
    # A last will carries no clock: ingest stamps it on arrival. During a replay faster
    # than real time that is far ahead of event time, so it is taken as the newest event
    # time of the readings that arrived before it (the same instant when running live).
    ts = cols.ts_ns
    before = engine.newest_before(cols.message_index)
    ts = np.where(before > 0, np.minimum(ts, before), ts)
    for at in by_occurrence(lookup({d: i for i, d in enumerate(set(ids))}, ids), ts):
        engine.observe(out, Observation(
            "status", int(ts[at].max()), ids[at], cols.tags["district"][at],
            {"online": online[at]},
        ))  # fmt: skip


def observe_silence(engine: AnalyticsEngine, end: int, out: Output) -> None:
    with engine.panes_lock:  # a consistent pair: ingest updates both under this lock
        observed, last_seen = engine.watermark.observed_ns, engine.last_seen.copy()
    silent = np.where(last_seen > 0, (observed - last_seen) / NS, np.nan)
    devices = engine.devices
    engine.observe(out, Observation(
        "silence", max(observed, end), devices.ids, devices.district,
        {"silent_s": silent}, kind=devices.kind,
    ))  # fmt: skip


def newest_before(readings: list[Columns], newest_ns: int) -> NewestBefore:
    """A function: message positions -> the newest event time among the readings of the
    messages before them in the batch (or ``newest_ns`` of earlier batches)."""
    rows = [c for c in readings if len(c)]
    if not rows:
        return lambda positions: np.full(len(positions), newest_ns, dtype=np.int64)
    messages = np.concatenate([c.message_index for c in rows])
    times = np.concatenate([c.ts_ns for c in rows])
    size = int(messages.max()) + 2
    newest = np.full(size, newest_ns, dtype=np.int64)
    np.maximum.at(newest, messages + 1, times)  # +1: strictly before
    running = np.maximum.accumulate(newest)

    def lookup_before(positions: Array) -> Array:
        result: Array = running[np.clip(positions, 0, size - 1)]
        return result

    return lookup_before
