"""The demo's figures, each saying what it counts, and how they add up.

Two counts of different things were shown side by side before: MQTT *messages* (a traffic
detector's message holds one reading per lane) and InfluxDB *points* (a point per lane, plus
everything the analytics compute). Here every figure is one of those, and the terms are kept
apart so that the sums can be checked on screen:

- messages: what the simulated devices published (their readings, malformed payloads and
  retained ``online`` births, on the simulator's connection or their own) and the wills the
  broker published for them, plus cityflux's own messages (alerts, dead letters, its status)
  that its ``{root}/#`` subscription sees too, plus copies received again after a
  redelivery, is what cityflux received. Of the devices' messages, each either landed (its
  readings stored) or was rejected (dead-lettered): ``published = landed + rejected``.
- points: the lines cityflux wrote are the readings' points in InfluxDB, the analytics' results,
  the alerts, the dead letters, cityflux's health points, and lines that rewrote a point already
  stored (same series and time: an alert updated in place, a duplicate reading).
"""

from __future__ import annotations

from dataclasses import dataclass

from cityflux.model.contract import Reason
from cityflux.observability import Metrics
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter

READING_MEASUREMENTS = ("pole", "manhole", "traffic", "device_status")
# rejections that are not a message's fate: too_late readings are stored anyway (only the
# analytics window missed them), write_rejected counts lines the database refused
NOT_MESSAGE_REJECTIONS = (Reason.TOO_LATE.value, Reason.WRITE_REJECTED.value)


@dataclass(frozen=True, slots=True)
class Published:
    """What the simulated devices sent (the simulator's own count)."""

    messages: int  # on the simulator's connection and the devices' own ones
    wills: int  # published by the broker when a device's connection dropped
    births: int  # retained "online" statuses (at the start and on reconnects)
    malformed: int  # payloads made to be rejected
    sent_twice: int  # second copies (gateway retries): both land, stored once

    @property
    def total(self) -> int:
        return self.messages + self.wills

    @classmethod
    def of(cls, sim: Simulation, messages: int, wills: int) -> Published:
        """``messages``/``wills``: the runner's counts (the whole run, or so far)."""
        expected = sim.expected
        # status points: the births (at the start, on reconnects) and one per will
        births = expected.points["device_status"] - wills
        return cls(
            messages=messages,
            wills=wills,
            births=max(0, births),
            malformed=sum(expected.rejections.values()),
            sent_twice=expected.duplicates,
        )


@dataclass(frozen=True, slots=True)
class Counted:
    """What cityflux counted (its metrics), in messages."""

    received: int
    acked: int  # after a durable write
    own: int  # on cityflux's own topics (alerts, dead letters, status): seen, not stored
    landed: int  # device messages whose readings were stored
    rejected: int  # device messages dead-lettered
    written: int  # line-protocol points the database accepted
    spooled: int

    @classmethod
    def of(cls, metrics: Metrics, readings_per_message: int) -> Counted:
        snapshot = metrics.snapshot()
        rejected = sum(
            int(value)
            for key, value in snapshot.items()
            if key.startswith("rejections_total.")
            and key.split(".", 1)[1] not in NOT_MESSAGE_REJECTIONS
        )
        accepted = sum(
            int(value) for key, value in snapshot.items() if key.startswith("readings_accepted")
        )
        acked = int(metrics.value("messages_acked_total"))
        own = int(metrics.value("messages_ignored_total"))
        # one reading a message: the readings counter counts the landed messages itself (a
        # check independent of the acks); arrays of readings: the acknowledged remainder
        landed = accepted if readings_per_message == 1 else acked - own - rejected
        return cls(
            received=int(metrics.value("messages_received_total")),
            acked=acked,
            own=own,
            landed=landed,
            rejected=rejected,
            written=int(metrics.value("lines_written_total")),
            spooled=int(metrics.value("lines_spooled_total")),
        )

    @property
    def redelivered(self) -> int:
        """Copies received again: a batch in hand when the connection dropped is discarded,
        unacknowledged, and the broker sends it again (counted once more on receipt)."""
        return max(0, self.received - self.acked)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    published: Published
    counted: Counted

    @property
    def unexplained(self) -> int:
        """Received beyond every term (0 when it adds up; e.g. retained messages an external
        broker kept from an earlier run)."""
        c = self.counted
        return c.received - self.published.total - c.own - c.redelivered

    @property
    def adds_up(self) -> bool:
        c = self.counted
        return self.published.total == c.landed + c.rejected and self.unexplained == 0

    def line(self) -> str:
        """The final line: published = landed + rejected (+ duplicates), with the numbers."""
        c, p = self.counted, self.published
        sign = "=" if p.total == c.landed + c.rejected else "!="
        return (
            f"published {p.total:,} {sign} landed {c.landed:,} + rejected {c.rejected:,} "
            f"(+ {c.redelivered:,} duplicates after redelivery)"
        )


@dataclass(frozen=True, slots=True)
class Points:
    """The points in InfluxDB by what they are, against the lines cityflux wrote."""

    written: int  # lines the database accepted
    stored: dict[str, int]  # points per measurement, read back

    def part(self, which: str) -> int:
        return sum(n for name, n in self.stored.items() if _part(name) == which)

    @property
    def readings(self) -> int:
        return self.part("readings")

    @property
    def rewritten(self) -> int:
        """Lines that replaced a point already stored (same series and time): an alert's
        point updated in place, the second copy of a duplicate reading."""
        return self.written - sum(self.stored.values())


def _part(measurement: str) -> str:
    if measurement in READING_MEASUREMENTS:
        return "readings"
    return {
        "cityflux_alert": "alerts",
        "cityflux_deadletter": "dead letters",
        "cityflux_pipeline": "health",
    }.get(measurement, "analytics")


PARTS = ("readings", "analytics", "alerts", "dead letters", "health")


def points_in_influxdb(writer: InfluxWriter) -> dict[str, int]:
    """Points per measurement. A point has at least one field, and the widest field count is
    the number of points when some field is in every point (true of cityflux's measurements)."""
    result = writer.query("SHOW MEASUREMENTS")
    series = result.get("results", [{}])[0].get("series", [])
    names = [row[0] for row in series[0]["values"]] if series else []
    counts: dict[str, int] = {}
    for name in names:
        rows = writer.query(f'SELECT count(*) FROM "{name}"').get("results", [{}])[0]
        values = rows.get("series", [{}])[0].get("values", [[0, 0]])[0][1:] if rows else [0]
        counts[name] = max((int(v) for v in values if v is not None), default=0)
    return counts
