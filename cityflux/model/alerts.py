"""An alert as it is stored and published, and what acknowledging it did.

These are data shared by the alert stores: SQLite in cityflux/analytics/alerts.py (one process)
and the JetStream KV bucket in cityflux/nats/alerts.py (the workers of a city). They live in the
model layer so both stores use them without importing each other (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from cityflux.errors import CityfluxError


class Alert(msgspec.Struct, kw_only=True):
    id: int = 0
    rule: str
    entity: str
    district: str
    severity: str
    state: Literal["active", "cleared"] = "active"
    acknowledged: bool = False
    flapping: bool = False
    value: float
    message: str
    started_ns: int
    updated_ns: int
    cleared_ns: int = 0
    count: int = 1
    acknowledged_by: str = ""
    acknowledged_ns: int = 0  # wall clock of the acknowledgement in force (0: none)


AckStatus = Literal["acknowledged", "already", "refused", "unknown"]


@dataclass(slots=True, frozen=True)
class Ack:
    """What an acknowledgement did. ``acknowledged``: recorded (``previous_by`` is set when it
    overrode another operator's with force); ``already``: the same operator had acknowledged
    it, nothing changed; ``refused``: someone else had, and force was not given; ``unknown``:
    no such alert. ``alert`` is the alert as stored afterwards (None when unknown)."""

    status: AckStatus
    alert: Alert | None
    previous_by: str = ""
    previous_ns: int = 0

    @property
    def applied(self) -> bool:
        return self.status == "acknowledged"


class AckRecord(msgspec.Struct, frozen=True):
    """One acknowledgement as recorded (every one is kept, the overridden ones too)."""

    alert_id: int
    by: str
    at_ns: int
    forced: bool
    alert_state: str  # the alert's state when it was acknowledged: active or cleared


class AckRefused(CityfluxError):
    """An alert acknowledged by another operator, acknowledged again without force."""
