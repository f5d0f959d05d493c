"""The device contract as data: kinds, their fields, units and valid ranges.

This module is the single source of truth: the msgspec decoders, the range validation, the
InfluxDB field types and the tables in ``docs/contract.md`` (checked by a test) all come from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import msgspec

FieldType = Literal["float", "int", "bool"]


class Reason(StrEnum):
    """Why a message or reading was rejected; the last level of the dead-letter topic."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    TOO_LARGE = "too_large"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_KIND = "unknown_kind"
    SCHEMA = "schema"
    OUT_OF_RANGE = "out_of_range"
    BAD_TIMESTAMP = "bad_timestamp"
    MISMATCH = "mismatch"
    WRITE_REJECTED = "write_rejected"
    TOO_LATE = "too_late"  # stored, but after its analytics window closed (docs/analytics.md)
    INTERNAL_ERROR = "internal_error"  # decoding or validating this payload raised: our bug
    REDELIVERED = "redelivered"  # JetStream: delivered nats.max_deliver times, never settled


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: FieldType
    unit: str
    low: float | None
    high: float | None
    description: str

    @property
    def python_type(self) -> Any:
        return {"float": float, "int": Int64, "bool": bool}[self.type]


def _f(name: str, unit: str, low: float, high: float, description: str) -> FieldSpec:
    return FieldSpec(name, "float", unit, low, high, description)


def _b(name: str, description: str) -> FieldSpec:
    return FieldSpec(name, "bool", "-", None, None, description)


POLE_FIELDS: Final = (
    _b("lamp_on", "lamp switched on"),
    _f("lamp_power_w", "W", 0, 2_000, "electrical power drawn by the lamp"),
    _b("lamp_fault", "the lamp driver reports a fault"),
    _f("pm25_ugm3", "µg/m³", 0, 1_000, "PM2.5 mass concentration"),
    _f("pm10_ugm3", "µg/m³", 0, 2_000, "PM10 mass concentration"),
    _f("noise_dba", "dB(A)", 20, 140, "A-weighted sound level over the reading interval (Leq)"),
    _f("temperature_c", "°C", -50, 70, "air temperature"),
    _f("humidity_pct", "%", 0, 100, "relative humidity"),
    # added in v1 (optional, like every field): a micro air station's gases and the noise
    # meter's maximum; ranges reach past HJ 633's last breakpoint (IAQI 500) of each
    _f("so2_ugm3", "µg/m³", 0, 5_000, "sulphur dioxide"),
    _f("no2_ugm3", "µg/m³", 0, 5_000, "nitrogen dioxide"),
    _f("co_mgm3", "mg/m³", 0, 200, "carbon monoxide"),
    _f("o3_ugm3", "µg/m³", 0, 2_000, "ozone"),
    _f("noise_lmax_dba", "dB(A)", 20, 140, "maximum A-weighted sound level (fast) in the interval"),
)

MANHOLE_FIELDS: Final = (
    _b("cover_open", "the cover is lifted off its seat"),
    _f("tilt_deg", "°", 0, 90, "cover tilt from horizontal"),
    _f("water_level_cm", "cm", 0, 1_000, "water level above the chamber floor"),
    _f("ch4_pct_lel", "% LEL", 0, 100, "methane, percent of the lower explosive limit"),
    _f("h2s_ppm", "ppm", 0, 500, "hydrogen sulphide"),
    _f("battery_pct", "%", 0, 100, "battery state of charge"),
    _f("temperature_c", "°C", -50, 100, "chamber temperature"),
)

TRAFFIC_FIELDS: Final = (
    FieldSpec("interval_s", "int", "s", 1, 3_600, "length of the counting interval"),
)

LANE_FIELDS: Final = (
    FieldSpec("lane", "int", "-", 1, 16, "lane number, 1 = kerb-side lane, per direction"),
    FieldSpec("count", "int", "vehicles", 0, 10_000, "vehicles counted in the interval"),
    _f("occupancy_pct", "%", 0, 100, "share of the interval the detector was occupied"),
    _f("speed_kmh", "km/h", 0, 250, "arithmetic mean of spot speeds; null when count is 0"),
)

# A lane cannot carry more than one vehicle per second (capacity is about 0.6/s): counts above
# interval_s * MAX_VEHICLES_PER_LANE_SECOND are out of range.
MAX_VEHICLES_PER_LANE_SECOND: Final = 1.0
MAX_LANES: Final = 16

KIND_FIELDS: Final[dict[str, tuple[FieldSpec, ...]]] = {
    "pole": POLE_FIELDS,
    "manhole": MANHOLE_FIELDS,
    "traffic": TRAFFIC_FIELDS + LANE_FIELDS,
}
KINDS: Final = ("pole", "manhole", "traffic")
STATUS_STATES: Final = ("online", "offline")
# Retained payloads on a device's or cityflux's status topic (the offline one as MQTT will).
ONLINE: Final = b'{"state":"online"}'
OFFLINE: Final = b'{"state":"offline"}'

# Ids become InfluxDB tag values and MQTT topic levels: a strict charset means no escaping
# surprises downstream and hostile ids (spaces, commas, '=', quotes, newlines) are rejected.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")

# -- msgspec types the decoder produces -----------------------------------------------------
# Integer fields become int64 columns (and InfluxDB integers, which are int64 too): msgspec
# accepts JSON integers of any size, so the bound is part of the type. Out of it is a failed
# typed decode, which the slow path names out_of_range. Timestamps stay unbounded here: the
# timestamp conversion turns what int64 nanoseconds cannot hold into bad_timestamp.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
Timestamp = int | str | None


class _Common(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    ts: Timestamp = None  # int: epoch milliseconds; str: RFC 3339
    ts_ns: int | None = None  # epoch nanoseconds
    device_id: str | None = None  # optional; must equal the topic's
    kind: str | None = None  # optional; must equal the topic's


def _optional_fields(specs: tuple[FieldSpec, ...]) -> list[tuple[str, Any, Any]]:
    return [(spec.name, spec.python_type | None, None) for spec in specs]


PoleReading: Any = msgspec.defstruct(
    "PoleReading", _optional_fields(POLE_FIELDS), bases=(_Common,), frozen=True, gc=False
)
ManholeReading: Any = msgspec.defstruct(
    "ManholeReading", _optional_fields(MANHOLE_FIELDS), bases=(_Common,), frozen=True, gc=False
)


class Lane(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    lane: Int64
    count: Int64
    occupancy_pct: float
    speed_kmh: float | None = None


class TrafficReading(_Common, frozen=True, kw_only=True, gc=False):
    interval_s: Int64
    lanes: list[Lane]


class StatusMessage(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    state: str
    ts: Timestamp = None
    ts_ns: int | None = None


READING_TYPES: Final[dict[str, Any]] = {
    "pole": PoleReading,
    "manhole": ManholeReading,
    "traffic": TrafficReading,
}
