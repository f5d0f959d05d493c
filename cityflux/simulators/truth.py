"""The scenario's ground truth: every event the analytics could be asked to find, with its
entity, district and time span, written as the simulation places or observes it; scoring
(:mod:`cityflux.simulators.scoring`) compares the analytics' detections with it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import numpy as np

from cityflux.model.citymap import CityMap


class TruthEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str  # incident, flood, rain, haze, outage, lamp_fault, cover_open, gas, stuck, drift
    entity: str
    district: str
    start: str  # RFC 3339
    end: str | None = None
    start_ms: int
    end_ms: int | None = None
    details: dict[str, Any] = {}


class GroundTruth(msgspec.Struct, kw_only=True):
    scenario: str
    start: str
    start_ms: int
    end_ms: int
    events: list[TruthEvent] = []


def iso(epoch_s: float, offset_h: float) -> str:
    tz = dt.timezone(dt.timedelta(hours=offset_h))
    return dt.datetime.fromtimestamp(epoch_s, tz).isoformat(timespec="seconds")


class TruthLog:
    """Appends events to ``truth``; called as ``log(kind, entity, district, start, end,
    **details)`` with epoch seconds (``end`` None: still going when the run ends)."""

    def __init__(self, truth: GroundTruth, utc_offset_h: float) -> None:
        self.truth = truth
        self.utc_offset_h = utc_offset_h

    def __call__(
        self, kind: str, entity: str, district: str, start: float, end: float | None, **details: Any
    ) -> None:
        offset = self.utc_offset_h
        self.truth.events.append(
            TruthEvent(
                type=kind,
                entity=entity,
                district=district,
                start=iso(start, offset),
                end=iso(end, offset) if end is not None else None,
                start_ms=round(start * 1000),
                end_ms=round(end * 1000) if end is not None else None,
                details=details,
            )
        )


class Floods:
    """Manholes whose water tops their depth: each spell is a ``flood`` truth event."""

    def __init__(self, city: CityMap, log: TruthLog) -> None:
        self.city = city
        self.log = log
        self.flooded = np.zeros(len(city.manholes), dtype=bool)
        self.start = np.zeros(len(city.manholes))

    def track(self, now: np.ndarray, t: float) -> None:
        """``now``: which manholes are flooded at ``t``."""
        for index in np.flatnonzero(now & ~self.flooded).tolist():
            self.start[index] = t
        for index in np.flatnonzero(~now & self.flooded).tolist():
            self._event(index, t)
        self.flooded = now

    def close(self) -> None:
        """The end of the run: floods still going have no end."""
        for index in np.flatnonzero(self.flooded).tolist():
            self._event(index, None)

    def _event(self, index: int, end: float | None) -> None:
        hole = self.city.manholes[index]
        self.log(
            "flood", hole.id, hole.district, float(self.start[index]), end,
            depth_cm=hole.depth_cm,
        )  # fmt: skip
