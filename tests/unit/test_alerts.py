"""The alert engine: for-duration, hysteresis, one alert per rule and entity, acknowledgement,
deadman, flapping, and state that survives a restart (a real SQLite file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cityflux.analytics.alerts import (
    AlertEngine,
    AlertStore,
    Observation,
    Rule,
    load_rules,
)
from cityflux.errors import ConfigError

S = 1_000_000_000
TPI = Rule(name="tpi_high", source="segment", metric="tpi", when=">= 8", clear="< 6",
           for_s=120, severity="major")  # fmt: skip


def observe(engine: AlertEngine, t_s: float, values: dict[str, float], source: str = "segment",
            kind: list[str] | None = None) -> list:  # fmt: skip
    ids = np.array(list(values), dtype=object)
    return engine.evaluate(
        Observation(
            source, round(t_s * S), ids, np.full(len(ids), "d01", dtype=object),
            {TPI.metric if source == "segment" else "silent_s": np.array(list(values.values()))},
            kind=np.array(kind, dtype=object) if kind else None,
        )
    )  # fmt: skip


def engine_at(path: Path, rules: list[Rule] | None = None) -> AlertEngine:
    return AlertEngine(rules or [TPI], AlertStore(path / "alerts.sqlite"))


def test_for_duration_then_one_alert_updated_by_repeats(tmp_path: Path) -> None:
    engine = engine_at(tmp_path)
    assert observe(engine, 0, {"s1": 9.0}) == []  # pending
    assert observe(engine, 60, {"s1": 9.5}) == []  # 60 s < 120 s
    (raised,) = observe(engine, 120, {"s1": 9.1})
    assert (raised.rule, raised.entity, raised.state, raised.started_ns) == (
        "tpi_high", "s1", "active", 0,
    )  # fmt: skip
    assert observe(engine, 180, {"s1": 9.9}) == []  # a repeat updates, no new alert
    (stored,) = engine.store.select()
    assert stored.count == 2 and stored.value == 9.9


def test_a_blip_shorter_than_the_duration_raises_nothing(tmp_path: Path) -> None:
    engine = engine_at(tmp_path)
    observe(engine, 0, {"s1": 9.0})
    observe(engine, 60, {"s1": 3.0})
    assert observe(engine, 120, {"s1": 9.0}) == []  # the clock restarted at 120
    assert engine.store.select() == []


def test_hysteresis_clears_only_below_the_clear_threshold(tmp_path: Path) -> None:
    engine = engine_at(tmp_path)
    observe(engine, 0, {"s1": 9.0})
    observe(engine, 120, {"s1": 9.0})
    assert observe(engine, 180, {"s1": 7.0}) == []  # below 8 but not below 6: still active
    (cleared,) = observe(engine, 240, {"s1": 5.0})
    assert cleared.state == "cleared" and cleared.cleared_ns == 240 * S
    observe(engine, 300, {"s1": 9.0})
    (again,) = observe(engine, 420, {"s1": 9.0})
    assert again.id != cleared.id  # a new episode is a new alert


def test_acknowledgement_and_restart_keep_state(tmp_path: Path) -> None:
    engine = engine_at(tmp_path)
    observe(engine, 0, {"s1": 9.0, "s2": 9.0})
    first, _ = observe(engine, 120, {"s1": 9.0, "s2": 9.0})
    acked = engine.acknowledge(first.id, "ops-1")
    assert acked is not None and acked.acknowledged and acked.acknowledged_by == "ops-1"
    engine.store.close()
    restarted = engine_at(tmp_path)  # same SQLite file
    assert observe(restarted, 180, {"s1": 9.0, "s2": 9.0}) == []  # carries on, no re-fire
    stored = {a.entity: a for a in restarted.store.select()}
    assert stored["s1"].acknowledged and not stored["s2"].acknowledged
    assert stored["s1"].count == 2
    (cleared,) = observe(restarted, 240, {"s1": 1.0, "s2": 9.0})
    assert cleared.entity == "s1" and cleared.state == "cleared" and cleared.acknowledged
    assert restarted.acknowledge(999, "x") is None


def test_deadman_by_device_kind(tmp_path: Path) -> None:
    silence = Rule(name="silent", source="silence", kind="traffic", metric="silent_s",
                   when=">= 300", clear="< 120", severity="major")  # fmt: skip
    engine = engine_at(tmp_path, [silence])
    raised = observe(engine, 1000, {"det-1": 400.0, "pole-1": 900.0, "det-2": 30.0},
                     source="silence", kind=["traffic", "pole", "traffic"])  # fmt: skip
    assert [a.entity for a in raised] == ["det-1"]
    (back,) = observe(engine, 1100, {"det-1": 60.0, "pole-1": 1000.0, "det-2": 30.0},
                      source="silence", kind=["traffic", "pole", "traffic"])  # fmt: skip
    assert back.state == "cleared"


def test_flapping_is_flagged(tmp_path: Path) -> None:
    rule = Rule(name="flappy", source="segment", metric="tpi", when=">= 8", clear="< 8")
    engine = engine_at(tmp_path, [rule])
    changes = []
    for step in range(12):
        changes += observe(engine, step * 60, {"s1": 9.0 if step % 2 == 0 else 1.0})
    assert any(a.flapping for a in changes)


def test_shipped_rules_load_and_bad_rules_are_refused(tmp_path: Path) -> None:
    rules = load_rules()
    names = {r.name for r in rules}
    assert {"traffic_incident", "manhole_water_high", "device_offline"} <= names
    bad = tmp_path / "rules.toml"
    bad.write_text('[[rule]]\nname="x"\nsource="segment"\nmetric="tpi"\nwhen="bigger 3"\n')
    with pytest.raises(ConfigError, match="expected '<op> <number>'"):
        load_rules(bad)


def test_a_flapping_alert_stays_up_instead_of_churning(tmp_path: Path) -> None:
    rule = Rule(name="flappy", source="segment", metric="tpi", when=">= 8", clear="< 8")
    engine = engine_at(tmp_path, [rule])
    for step in range(20):
        observe(engine, step * 60, {"s1": 9.0 if step % 2 == 0 else 1.0})
    episodes = engine.store.select()
    assert len(episodes) < 5  # not one alert per blink
    assert episodes[-1].state == "active" and episodes[-1].flapping
    for step in range(20, 45):  # it settles below the threshold: the alert clears
        observe(engine, step * 60, {"s1": 1.0})
    assert engine.store.select()[-1].state == "cleared"


def test_a_corrupt_alert_database_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite"
    store = AlertStore(path)
    store.close()
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # a torn header and garbage
    fresh = AlertStore(path)
    try:
        assert fresh.select() == []
        assert (tmp_path / "alerts.sqlite.corrupt").exists()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    finally:
        fresh.close()
    path.write_bytes(b"not a database at all" * 100)
    again = AlertStore(path)
    again.close()
    assert (tmp_path / "alerts.sqlite.corrupt").exists()  # the first one is kept
    (later,) = tmp_path.glob("alerts.sqlite.*Z-0.corrupt")  # as checkpoints (cityflux/files.py)
    assert later.read_bytes().startswith(b"not a database at all")
