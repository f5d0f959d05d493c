"""Alert rules and the alert engine: one active alert per rule and entity, with for-durations,
hysteresis, flapping suppression, acknowledgement, and SQLite persistence.

Semantics follow the peers operators know (docs/analytics.md): Kapacitor's levels, reset
conditions and flapping detection; ThingsBoard's active/cleared x acknowledged/unacknowledged
states and "one active alarm per originator and type". Unlike ThingsBoard's default, the state
survives a restart: every change is written to SQLite before it is published.
"""

from __future__ import annotations

import itertools
import logging
import operator
import sqlite3
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from cityflux.errors import ConfigError
from cityflux.files import private_sqlite_file, set_aside

# the records are shared with the JetStream store (cityflux/nats/alerts.py); re-exported
# here (`as`: explicit for mypy) so importers of cityflux.analytics.alerts keep working
from cityflux.model.alerts import Ack as Ack  # noqa: PLC0414
from cityflux.model.alerts import AckRecord as AckRecord  # noqa: PLC0414
from cityflux.model.alerts import AckRefused as AckRefused  # noqa: PLC0414
from cityflux.model.alerts import AckStatus as AckStatus  # noqa: PLC0414
from cityflux.model.alerts import Alert as Alert  # noqa: PLC0414
from cityflux.model.units import NS

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
Severity = Literal["critical", "major", "minor", "warning"]
OPERATORS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
FLAPPING_WINDOW: Final = 20


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``when`` and ``clear`` are "<op> <number>", e.g. ">= 8"; ``clear`` defaults to not-when."""

    name: str
    source: str  # segment | district | incident | air | noise | lamp | manhole | status | silence
    metric: str
    when: str
    clear: str = ""
    for_s: float = 0.0  # the condition must hold this long (event time) before the alert
    severity: Severity = "warning"
    kind: str = ""  # source "silence": only devices of this kind
    flapping: tuple[float, float] = (0.25, 0.5)  # (low, high) share of state changes
    message: str = "{metric} {value:.1f} {when}"

    def test(self, values: Array) -> tuple[Array, Array]:
        """(condition holds, clear condition holds); NaN satisfies neither."""
        holds = _compare(self.when, values)
        clears = _compare(self.clear, values) if self.clear else ~holds & ~np.isnan(values)
        return holds, clears


def _compare(expression: str, values: Array) -> Array:
    op, number = _parse(expression)
    with np.errstate(invalid="ignore"):
        result: Array = OPERATORS[op](values, number) & ~np.isnan(values)
    return result


def _parse(expression: str) -> tuple[str, float]:
    parts = expression.split()
    if len(parts) != 2 or parts[0] not in OPERATORS:
        raise ConfigError(
            f"condition {expression!r}: expected '<op> <number>', op in {list(OPERATORS)}"
        )
    return parts[0], float(parts[1])


class RuleFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rule: list[Rule]


def load_rules(path: str | Path | None = None) -> list[Rule]:
    """Rules from a TOML file (``[[rule]]`` tables), or the defaults shipped with cityflux."""
    try:
        if path is None:
            text = resources.files("cityflux.analytics").joinpath("rules.toml").read_text()
        else:
            text = Path(path).read_text()
        rules = msgspec.convert(tomllib.loads(text), RuleFile).rule
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"alert rules {path or '(defaults)'}: {exc}") from exc
    for rule in rules:
        rule.test(np.zeros(1))  # conditions parse
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ConfigError("alert rules: duplicate rule names")
    return rules


@dataclass(slots=True)
class Observation:
    """Values of one source at one event time, one row per entity."""

    source: str
    ts_ns: int
    entity: Array  # ids (str)
    district: Array
    metrics: dict[str, Array]
    kind: Array | None = None  # device kinds, for deadman rules
    labels: dict[str, Array] = field(default_factory=dict)  # extra message fields


@dataclass(slots=True)
class Tracker:
    pending_since: int = -1
    alert: Alert | None = None


class AlertStorage(Protocol):
    """What the engine and ``cityflux alerts`` need of an alert store: :class:`AlertStore`
    (SQLite, one process) or ``cityflux.nats.alerts.KvAlertStore`` (a JetStream KV bucket
    shared by the workers of a city). Both apply the same acknowledgement rule."""

    def save(self, alerts: list[Alert]) -> None: ...

    def acknowledge(
        self, alert_id: int, by: str, force: bool = False, at_ns: int | None = None
    ) -> Ack: ...

    def acknowledgements(self, alert_id: int) -> list[AckRecord]: ...

    def select(self) -> list[Alert]: ...  # all, oldest first

    def with_state(self, state: str) -> list[Alert]: ...

    def active(self) -> list[Alert]: ...

    def close(self) -> None: ...


class AlertStore:
    """SQLite: every alert, active or cleared, with its acknowledgement."""

    COLUMNS: Final = tuple(Alert.__struct_fields__)

    def __init__(self, path: str | Path) -> None:
        private_sqlite_file(Path(path))
        try:
            self.db = self._open(Path(path))
        except sqlite3.DatabaseError as exc:
            # a torn or overwritten file must not stop ingest: set it aside for forensics and
            # start afresh. Alert history is also in InfluxDB (cityflux_alert); conditions that
            # still hold raise their alerts again; acknowledgements in the file are lost.
            aside = set_aside(Path(path))
            log.error("alert database %s is unreadable (%s): moved to %s", path, exc, aside)
            private_sqlite_file(Path(path))
            self.db = self._open(Path(path))

    def _open(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._prepare(db)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (the WAL fsynced) before the change is published; NORMAL
        # would let a power cut roll back an alert operators already received
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT,"
            " entity TEXT, district TEXT, severity TEXT, state TEXT, acknowledged INTEGER,"
            " flapping INTEGER, value REAL, message TEXT, started_ns INTEGER, updated_ns INTEGER,"
            " cleared_ns INTEGER, count INTEGER, acknowledged_by TEXT)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, rule, entity)")
        db.execute("SELECT count(*) FROM alerts").fetchone()  # reads the pages: finds garbage
        # files written before acknowledgements had a time and a history: add what is missing
        have = {row[1] for row in db.execute("PRAGMA table_info(alerts)")}
        if "acknowledged_ns" not in have:
            db.execute("ALTER TABLE alerts ADD COLUMN acknowledged_ns INTEGER NOT NULL DEFAULT 0")
        db.execute(
            "CREATE TABLE IF NOT EXISTS acknowledgements (alert_id INTEGER, by TEXT,"
            " at_ns INTEGER, forced INTEGER, alert_state TEXT)"
        )

    @classmethod
    def open_existing(cls, path: str | Path) -> AlertStore | None:
        """The store at ``path`` if the file exists, else None: reading must not leave an
        empty database behind (``cityflux alerts list`` in the wrong directory)."""
        return cls(path) if Path(path).is_file() else None

    def save(self, alerts: list[Alert]) -> None:
        """Insert new alerts (id 0: assigned here) and update known ones, in one transaction.
        Acknowledgement is never written here: only :meth:`acknowledge` sets it, so an ack from
        the CLI is not undone by a running engine."""
        if not alerts:
            return
        self.db.execute("BEGIN")  # isolation_level=None: transactions are explicit
        try:
            self._save(alerts)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _save(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if alert.id:
                self.db.execute(
                    "UPDATE alerts SET state=?, flapping=?, value=?, message=?, updated_ns=?,"
                    " cleared_ns=?, count=? WHERE id=?",
                    (alert.state, alert.flapping, alert.value, alert.message,
                     alert.updated_ns, alert.cleared_ns, alert.count, alert.id),
                )  # fmt: skip
            else:
                values = msgspec.structs.astuple(alert)[1:]
                cursor = self.db.execute(
                    f"INSERT INTO alerts ({', '.join(self.COLUMNS[1:])}) VALUES "
                    f"({', '.join('?' * len(values))})",
                    values,
                )
                alert.id = int(cursor.lastrowid or 0)

    def acknowledge(
        self, alert_id: int, by: str, force: bool = False, at_ns: int | None = None
    ) -> Ack:
        """Acknowledge an alert, active or cleared. Another operator's acknowledgement is
        overridden only with ``force``; every applied acknowledgement is kept in
        ``acknowledgements`` (who, when, forced), so an override loses nothing."""
        at_ns = time.time_ns() if at_ns is None else at_ns
        self.db.execute("BEGIN IMMEDIATE")  # the check and the update see the same row
        try:
            ack = self._acknowledge(alert_id, by, force, at_ns)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return ack

    def _acknowledge(self, alert_id: int, by: str, force: bool, at_ns: int) -> Ack:
        found = self.select(where="id=?", args=(alert_id,))
        if not found:
            return Ack("unknown", None)
        alert = found[0]
        previous = (alert.acknowledged_by or "", alert.acknowledged_ns or 0)
        if alert.acknowledged and alert.acknowledged_by == by:
            return Ack("already", alert, *previous)
        if alert.acknowledged and not force:
            return Ack("refused", alert, *previous)
        self.db.execute(
            "UPDATE alerts SET acknowledged=1, acknowledged_by=?, acknowledged_ns=? WHERE id=?",
            (by, at_ns, alert_id),
        )
        self.db.execute(
            "INSERT INTO acknowledgements VALUES (?, ?, ?, ?, ?)",
            (alert_id, by, at_ns, int(alert.acknowledged), alert.state),
        )
        alert.acknowledged, alert.acknowledged_by, alert.acknowledged_ns = True, by, at_ns
        return Ack("acknowledged", alert, *previous)  # previous: ("", 0) if it was not acked

    def acknowledgements(self, alert_id: int) -> list[AckRecord]:
        """Every acknowledgement of the alert, oldest first."""
        rows = self.db.execute(
            "SELECT alert_id, by, at_ns, forced, alert_state FROM acknowledgements"
            " WHERE alert_id=? ORDER BY rowid",
            (alert_id,),
        ).fetchall()
        return [AckRecord(a, b, t, bool(f), s) for a, b, t, f, s in rows]

    def select(self, where: str = "1=1", args: tuple[Any, ...] = ()) -> list[Alert]:
        cursor = self.db.execute(
            f"SELECT {', '.join(self.COLUMNS)} FROM alerts WHERE {where} ORDER BY id", args
        )
        return [
            Alert(**dict(zip(self.COLUMNS, row, strict=True)) | {"acknowledged": bool(row[6]),
                                                                "flapping": bool(row[7])})
            for row in cursor.fetchall()
        ]  # fmt: skip

    def with_state(self, state: str) -> list[Alert]:
        return self.select("state=?", (state,))

    def active(self) -> list[Alert]:
        return self.select("state='active'")

    def close(self) -> None:
        self.db.close()


class AlertEngine:
    """Evaluates rules on observations; returns the alerts whose state changed."""

    def __init__(self, rules: list[Rule], store: AlertStorage) -> None:
        self.rules = rules
        self.by_source: dict[str, list[Rule]] = {}
        for rule in rules:
            self.by_source.setdefault(rule.source, []).append(rule)
        self.store = store
        # per rule, per entity: only entities whose condition holds or whose alert is active
        self.trackers: dict[str, dict[str, Tracker]] = {rule.name: {} for rule in rules}
        self._rows: dict[int, tuple[Array, dict[str, int]]] = {}
        self._lock = threading.Lock()
        # recent condition results per rule and entity, for flapping (outlives the trackers)
        self.history: dict[str, dict[str, deque[bool]]] = {rule.name: {} for rule in rules}
        for alert in store.active():  # restart: active alerts carry on, nothing re-fires
            self.trackers.setdefault(alert.rule, {})[alert.entity] = Tracker(
                alert.started_ns, alert
            )

    def evaluate(self, observation: Observation) -> list[Alert]:
        with self._lock:  # per-reading rules and window rules come from different threads
            return self._evaluate(observation)

    def _evaluate(self, observation: Observation) -> list[Alert]:
        changed: list[Alert] = []
        dirty: list[Alert] = []
        for rule in self.by_source.get(observation.source, []):
            values = observation.metrics.get(rule.metric)
            if values is None:
                continue
            selected = np.ones(len(values), dtype=bool)
            if rule.kind and observation.kind is not None:
                selected = observation.kind == rule.kind
            holds, clears = rule.test(values)
            holds &= selected
            tracked = self.trackers[rule.name]
            rows = np.flatnonzero(holds).tolist()
            if tracked:
                entity_rows = self._rows_of(observation.entity)
                rows = sorted(set(rows) | {entity_rows[e] for e in tracked if e in entity_rows})
            for row in rows:
                self._step(rule, observation, row, bool(holds[row]), bool(clears[row]),
                           changed, dirty)  # fmt: skip
        self.store.save(changed + [a for a in dirty if a not in changed])
        return [msgspec.structs.replace(alert) for alert in changed]  # as they were now

    def _rows_of(self, entity: Array) -> dict[str, int]:
        """Entity id -> row. Sources that send the same entity array every window (links,
        poles, devices) get it built once; the array is kept so its id stays unique."""
        cached = self._rows.get(id(entity))
        if cached is None or cached[0] is not entity:
            cached = (entity, {e: i for i, e in enumerate(entity.tolist())})
            if len(self._rows) > 64:
                self._rows.clear()
            self._rows[id(entity)] = cached
        return cached[1]

    def _step(
        self,
        rule: Rule,
        obs: Observation,
        row: int,
        holds: bool,
        clears: bool,
        changed: list[Alert],
        dirty: list[Alert],
    ) -> None:
        entity = str(obs.entity[row])
        trackers = self.trackers[rule.name]
        tracker = trackers.get(entity)
        if tracker is None:
            tracker = trackers[entity] = Tracker()
        history = self.history[rule.name].setdefault(entity, deque(maxlen=FLAPPING_WINDOW))
        history.append(holds)
        value = float(obs.metrics[rule.metric][row])
        alert = tracker.alert
        flapping = self._flapping(rule, history, alert)
        if alert is not None and flapping != alert.flapping:
            alert.flapping = flapping
            changed.append(alert)
        if holds:
            if tracker.pending_since < 0:
                tracker.pending_since = obs.ts_ns
            if alert is not None:  # a repeat updates the one active alert
                alert.value, alert.updated_ns, alert.count = value, obs.ts_ns, alert.count + 1
                alert.message = self._message(rule, obs, row, value)
                dirty.append(alert)
            elif obs.ts_ns - tracker.pending_since >= rule.for_s * NS:
                tracker.alert = self._raise(rule, obs, row, value, tracker.pending_since)
                tracker.alert.flapping = flapping
                changed.append(tracker.alert)
            return
        if alert is None:
            del trackers[entity]  # the condition broke before the for-duration: forget it
            if not any(history):
                del self.history[rule.name][entity]
        elif clears and not alert.flapping:  # a flapping alert stays up until it settles
            alert.state, alert.cleared_ns, alert.updated_ns = "cleared", obs.ts_ns, obs.ts_ns
            alert.value = value
            changed.append(alert)
            del trackers[entity]

    def _flapping(self, rule: Rule, history: deque[bool], alert: Alert | None) -> bool:
        """Nagios-style: the share of state changes over the recent evaluations."""
        if len(history) < 4:
            return alert.flapping if alert else False
        changes = sum(a != b for a, b in itertools.pairwise(history))
        share = changes / (len(history) - 1)
        low, high = rule.flapping
        was = alert.flapping if alert else False
        return share >= high or (was and share > low)

    def _raise(self, rule: Rule, obs: Observation, row: int, value: float, since: int) -> Alert:
        return Alert(
            rule=rule.name,
            entity=str(obs.entity[row]),
            district=str(obs.district[row]),
            severity=rule.severity,
            value=value,
            message=self._message(rule, obs, row, value),
            started_ns=since,
            updated_ns=obs.ts_ns,
        )

    def _message(self, rule: Rule, obs: Observation, row: int, value: float) -> str:
        labels = {name: column[row] for name, column in obs.labels.items()}
        try:
            return rule.message.format(metric=rule.metric, value=value, when=rule.when, **labels)
        except (KeyError, ValueError, IndexError):
            return f"{rule.metric} {value:.1f} {rule.when}"

    def acknowledge(self, alert_id: int, by: str, force: bool = False) -> Alert | None:
        """Mark an alert acknowledged (active or cleared); None if there is no such alert.
        Raises AckRefused when another operator acknowledged it and ``force`` is not given."""
        ack = self.ack(alert_id, by, force)
        if ack.status == "refused":
            raise AckRefused(_refusal(alert_id, by, ack))
        return ack.alert

    def ack(self, alert_id: int, by: str, force: bool = False) -> Ack:
        """:meth:`AlertStore.acknowledge`, and the active alert in memory follows the store."""
        with self._lock:
            ack = self.store.acknowledge(alert_id, by, force)
            if ack.alert is None:
                return ack
            for trackers in self.trackers.values():
                for tracker in trackers.values():
                    live = tracker.alert
                    if live is not None and live.id == alert_id:
                        live.acknowledged = ack.alert.acknowledged
                        live.acknowledged_by = ack.alert.acknowledged_by
                        live.acknowledged_ns = ack.alert.acknowledged_ns
                        return Ack(ack.status, live, ack.previous_by, ack.previous_ns)
            return ack


def _refusal(alert_id: int, by: str, ack: Ack) -> str:
    return (
        f"alert {alert_id} was already acknowledged by {ack.previous_by}: not acknowledged "
        f"again by {by} without force"
    )
