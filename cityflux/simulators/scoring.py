"""Score alerts against a scenario's ground truth: precision, recall, time to detect.

Each ground-truth event type is detected by some alert rules; an alert *matches* an event
when its rule is one of them, its entity (or district, for area-wide episodes) is the event's,
and it started between the event's start and its end plus a grace period. Precision counts the
alerts of those rules that match some event; recall counts the events that some alert matched;
time to detect is from the event's start to the first matching alert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from cityflux.analytics.alerts import Alert
from cityflux.model.units import NS
from cityflux.simulators.simulation import GroundTruth, TruthEvent

GRACE_S: Final = 900.0  # an alert up to 15 minutes after the episode ended still counts


@dataclass(frozen=True, slots=True)
class Detector:
    rules: tuple[str, ...]
    by: str  # "entity", "entity_prefix" (alert entity "<segment>:<station>"), or "district"
    device_kind: str = ""  # only events of devices of this kind (details["device_kind"])


DETECTORS: Final[dict[str, Detector]] = {
    "incident": Detector(("traffic_incident",), "entity_prefix"),
    "flood": Detector(("manhole_water_high",), "entity"),
    "outage": Detector(
        ("device_offline", "traffic_detector_silent", "pole_silent", "manhole_silent"), "entity"
    ),
    "haze": Detector(("air_quality_heavy",), "district"),
    "lamp_fault": Detector(("lamp_fault",), "entity"),
    "cover_open": Detector(("manhole_cover_open",), "entity"),
    "gas": Detector(("manhole_gas_ch4", "manhole_gas_h2s"), "entity"),
    # stuck traffic detectors and stuck pole PM sensors; drifting pole PM sensors
    "stuck": Detector(("detector_stuck", "sensor_stuck"), "entity"),
    "drift": Detector(("sensor_drift",), "entity"),
}


class Score(msgspec.Struct):
    event_type: str
    events: int
    detected: int
    alerts: int
    matching_alerts: int
    precision: float | None  # None: no alerts of these rules at all
    recall: float | None  # None: no events of this type
    mean_time_to_detect_s: float | None
    max_time_to_detect_s: float | None


@dataclass(slots=True)
class Matching:
    events: list[TruthEvent]
    alerts: list[Alert]
    detected_at: dict[int, int] = field(default_factory=dict)  # event index -> first alert ns
    matched_alerts: set[int] = field(default_factory=set)


def _matches(detector: Detector, event: TruthEvent, alert: Alert, end_ns: int) -> bool:
    if detector.by == "district":
        same = alert.district == event.entity
    elif detector.by == "entity_prefix":
        same = alert.entity.split(":", 1)[0] == event.entity
    else:
        same = alert.entity == event.entity
    until = (event.end_ms * 1_000_000 if event.end_ms else end_ns) + round(GRACE_S * NS)
    return (
        same
        and event.start_ms * 1_000_000 <= alert.started_ns + 60 * NS
        and (alert.started_ns <= until)
    )


def score(truth: GroundTruth, alerts: list[Alert]) -> list[Score]:
    """A score per event type that has a detector (whether or not the scenario has events)."""
    end_ns = truth.end_ms * 1_000_000
    scores = []
    for event_type, detector in DETECTORS.items():
        events = [
            e
            for e in truth.events
            if e.type == event_type
            and (not detector.device_kind or e.details.get("device_kind") == detector.device_kind)
        ]
        candidates = [a for a in alerts if a.rule in detector.rules]
        match = Matching(events, candidates)
        for i, event in enumerate(events):
            for j, alert in enumerate(candidates):
                if _matches(detector, event, alert, end_ns):
                    match.matched_alerts.add(j)
                    first = match.detected_at.get(i)
                    if first is None or alert.started_ns < first:
                        match.detected_at[i] = alert.started_ns
        if not events and not candidates:
            continue
        delays = [
            max(0.0, (match.detected_at[i] - events[i].start_ms * 1_000_000) / NS)
            for i in match.detected_at
        ]
        scores.append(
            Score(
                event_type=event_type,
                events=len(events),
                detected=len(match.detected_at),
                alerts=len(candidates),
                matching_alerts=len(match.matched_alerts),
                precision=len(match.matched_alerts) / len(candidates) if candidates else None,
                recall=len(match.detected_at) / len(events) if events else None,
                mean_time_to_detect_s=sum(delays) / len(delays) if delays else None,
                max_time_to_detect_s=max(delays) if delays else None,
            )
        )
    return scores


def as_dicts(scores: list[Score]) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(s) for s in scores]
