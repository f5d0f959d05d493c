"""Faults real devices have: outages (with a real MQTT last will), stuck and drifting sensors,
clock skew, duplicates, out-of-order and late delivery, malformed payloads.

Every fault is drawn once, from the scenario's seed, when the simulation starts, and each one
that the analytics could be asked to find is written to the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from cityflux.simulators.scenario import Faults

if TYPE_CHECKING:
    from cityflux.simulators.simulation import Devices

# Rejection reasons the simulator provokes, in rotation (docs/contract.md names them).
MALFORMED: Final = (
    "invalid_json",
    "invalid_utf8",
    "schema",
    "out_of_range",
    "bad_timestamp",
    "unknown_kind",
    "mismatch",
)
_OUT_OF_RANGE: Final = {
    "pole": b'"pm25_ugm3":-5.0',
    "manhole": b'"battery_pct":150.0',
    "traffic": b'"interval_s":60,"lanes":[{"lane":1,"count":3,"occupancy_pct":150.0}]',
}
_VALID: Final = {
    "pole": b'"noise_dba":55.0',
    "manhole": b'"battery_pct":50.0',
    "traffic": b'"interval_s":60,"lanes":[{"lane":1,"count":3,"occupancy_pct":5.0}]',
}
YEAR_2100_MS: Final = 4_102_444_800_000


def malformed_message(reason: str, topic: str, kind: str, ts_ms: int) -> tuple[str, bytes, bool]:
    """A message cityflux must reject with ``reason`` (and nothing else)."""
    ts = b'"ts":%d' % ts_ms
    valid = _VALID[kind]
    payload = {
        "invalid_json": b"{" + ts + b"," + valid[:7],
        "invalid_utf8": b'{"ts":%d,"device_id":"\xff\xfe"}' % ts_ms,
        "schema": b"{" + ts + b',"battery_level":"high"}',
        "out_of_range": b"{" + ts + b"," + _OUT_OF_RANGE[kind] + b"}",
        "bad_timestamp": b'{"ts":%d,' % YEAR_2100_MS + valid + b"}",
        "unknown_kind": b"{" + ts + b"," + valid + b"}",
        "mismatch": b"{" + ts + b',"device_id":"someone-else",' + valid + b"}",
    }[reason]
    if reason == "unknown_kind":
        root, device = topic.rsplit("/", 2)[0], topic.rsplit("/", 1)[1]
        topic = f"{root}/streetlight/{device}"
    return topic, payload, False


class FaultPlan:
    def __init__(
        self,
        faults: Faults,
        devices: Devices,
        rng: np.random.Generator,
        start_s: float,
        duration_s: float,
        truth: Callable[..., None],
    ) -> None:
        self.faults = faults
        self.devices = devices
        self._truth = truth
        n = len(devices.ids)
        self.offline: set[int] = set()
        self._outages: list[tuple[int, float, float]] = []  # device, start, end
        for outage in faults.outages:
            matching = [
                i
                for i in range(n)
                if devices.kind[i] == outage.kind
                and (not outage.district or devices.district[i] == outage.district)
            ]
            chosen = rng.choice(matching, size=round(len(matching) * outage.share), replace=False)
            start = start_s + outage.start_s
            self._outages += [(int(i), start, start + outage.duration_s) for i in chosen]
        self.own_connection = {device for device, _, _ in self._outages}
        self._skew = np.where(rng.random(n) < faults.clock_skew_share, faults.clock_skew_s, 0.0)
        self._stuck = rng.random(n) < faults.stuck_share
        self._stuck_from = start_s + rng.uniform(0.1, 0.5, n) * duration_s
        self._frozen = np.full(n, np.nan)
        self._drift = rng.random(n) < faults.drift_share
        self._fates = np.cumsum(
            [faults.duplicate_share, faults.out_of_order_share, faults.late_share]
        )
        for number in np.flatnonzero(self._stuck | self._drift).tolist():
            kind = devices.kind[number]
            if kind == "manhole":
                continue
            if self._stuck[number]:
                field = "speed_kmh" if kind == "traffic" else "pm25_ugm3"
                self._truth_device("stuck", number, float(self._stuck_from[number]), field=field)
            elif kind == "pole":
                self._truth_device("drift", number, start_s, per_hour=faults.drift_per_hour)
        for number in np.flatnonzero(self._skew).tolist():
            self._truth_device("clock_skew", number, start_s, skew_s=faults.clock_skew_s)

    def _truth_device(self, kind: str, number: int, start: float, **details: Any) -> None:
        self._truth(
            kind, self.devices.ids[number], self.devices.district[number], start, None,
            device_kind=self.devices.kind[number], **details,
        )  # fmt: skip

    def transitions(self, previous: float, t: float) -> tuple[list[int], list[int]]:
        """Devices whose outage starts / ends in (previous, t]."""
        down = [d for d, start, _ in self._outages if previous < start <= t]
        up = [d for d, _, end in self._outages if previous < end <= t]
        self.offline.update(down)
        self.offline.difference_update(up)
        return down, up

    def close_truth(self, end_s: float) -> None:
        for device, start, end in self._outages:
            if start < end_s:
                self._truth(
                    "outage", self.devices.ids[device], self.devices.district[device], start,
                    end if end <= end_s else None, device_kind=self.devices.kind[device],
                )  # fmt: skip

    def skew_s(self, number: int) -> float:
        return float(self._skew[number])

    def stuck_values(
        self, kind: str, index: np.ndarray, values: np.ndarray, t: float
    ) -> np.ndarray:
        """Values of stuck sensors replaced by the first value they had once stuck."""
        numbers = index + self.devices.offset[kind]
        stuck = self._stuck[numbers] & (self._stuck_from[numbers] <= t)
        if not stuck.any():
            return values
        out = values.copy()
        for row in np.flatnonzero(stuck).tolist():
            number = int(numbers[row])
            if np.isnan(self._frozen[number]):
                self._frozen[number] = values[row]
            out[row] = self._frozen[number]
        return out

    def drifted(self, index: np.ndarray, values: np.ndarray, hours: float) -> np.ndarray:
        numbers = index + self.devices.offset["pole"]
        drifted: np.ndarray = np.round(
            values + self._drift[numbers] * self.faults.drift_per_hour * hours, 1
        )
        return drifted

    def fate(self, rng: np.random.Generator) -> str:
        if not self._fates[-1]:
            return "normal"
        draw = rng.random()
        for name, bound in zip(
            ("duplicate", "out_of_order", "late"), self._fates.tolist(), strict=True
        ):
            if draw < bound:
                return name
        return "normal"
