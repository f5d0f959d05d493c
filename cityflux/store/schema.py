"""The InfluxDB schema cityflux writes: measurement and tag names per kind (docs/schema.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Measurement:
    measurement: str
    tags: tuple[str, ...]  # from the topic
    field_tags: tuple[str, ...] = ()  # payload fields that identify a series (traffic lane)


MEASUREMENTS: Final = {
    "pole": Measurement("pole", ("district", "device_id")),
    "manhole": Measurement("manhole", ("district", "device_id")),
    "traffic": Measurement("traffic", ("district", "device_id"), field_tags=("lane",)),
    "status": Measurement("device_status", ("district", "kind", "device_id")),
}

# Pipeline health, one series per worker (see cityflux.observability).
PIPELINE_MEASUREMENT: Final = "cityflux_pipeline"
# Every rejection, so a dashboard can show them: reason is the only tag (bounded cardinality);
# the offending topic and the message are string fields, never tags.
DEADLETTER_MEASUREMENT: Final = "cityflux_deadletter"
