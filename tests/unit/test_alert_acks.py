"""Acknowledgements: a second operator is refused unless forced, every acknowledgement is kept
(who, when, forced), a cleared alert says so, an old alert database gains the new columns, and
`cityflux alerts` reads a data directory without creating files (a real SQLite file, the CLI
through typer's CliRunner)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityflux.analytics.alerts import AckRefused, Alert, AlertEngine, AlertStore
from cityflux.cli import app
from tests.unit.test_alerts import TPI, engine_at, observe

S = 1_000_000_000


def raised(tmp_path: Path) -> tuple[AlertEngine, Alert]:
    engine = engine_at(tmp_path)
    observe(engine, 0, {"s1": 9.0})
    (alert,) = observe(engine, 120, {"s1": 9.0})
    return engine, alert


def test_another_operator_is_refused_unless_forced_and_both_are_recorded(
    tmp_path: Path,
) -> None:
    engine, alert = raised(tmp_path)
    first = engine.store.acknowledge(alert.id, "ops-1", at_ns=10 * S)
    assert first.status == "acknowledged" and first.previous_by == ""
    again = engine.store.acknowledge(alert.id, "ops-1", at_ns=11 * S)
    assert again.status == "already" and again.previous_ns == 10 * S
    refused = engine.store.acknowledge(alert.id, "ops-2", at_ns=12 * S)
    assert refused.status == "refused" and refused.previous_by == "ops-1"
    (stored,) = engine.store.select()
    assert stored.acknowledged_by == "ops-1" and stored.acknowledged_ns == 10 * S
    forced = engine.store.acknowledge(alert.id, "ops-2", force=True, at_ns=13 * S)
    assert forced.status == "acknowledged" and forced.previous_by == "ops-1"
    assert forced.alert is not None and forced.alert.acknowledged_by == "ops-2"
    history = [(r.by, r.at_ns, r.forced, r.alert_state)
               for r in engine.store.acknowledgements(alert.id)]  # fmt: skip
    assert history == [("ops-1", 10 * S, False, "active"), ("ops-2", 13 * S, True, "active")]
    assert engine.store.acknowledge(999, "ops-1").status == "unknown"


def test_the_engine_follows_the_store_and_refuses_without_force(tmp_path: Path) -> None:
    engine, alert = raised(tmp_path)
    engine.store.acknowledge(alert.id, "cli-user")  # `cityflux alerts ack`, another process
    ack = engine.ack(alert.id, "cli-user")  # ... then its MQTT message reaches the engine
    assert ack.status == "already"
    live = engine.trackers["tpi_high"]["s1"].alert
    assert live is not None and live.acknowledged and live.acknowledged_by == "cli-user"
    with pytest.raises(AckRefused, match="already acknowledged by cli-user"):
        engine.acknowledge(alert.id, "ops-9")
    assert live.acknowledged_by == "cli-user"
    assert engine.acknowledge(alert.id, "ops-9", force=True) is live
    assert live.acknowledged_by == "ops-9"


def test_a_cleared_alert_is_acknowledged_for_the_record(tmp_path: Path) -> None:
    engine, alert = raised(tmp_path)
    observe(engine, 180, {"s1": 1.0})  # clears
    ack = engine.store.acknowledge(alert.id, "ops-1")
    assert ack.status == "acknowledged" and ack.alert is not None
    assert ack.alert.state == "cleared"
    assert [r.alert_state for r in engine.store.acknowledgements(alert.id)] == ["cleared"]


OLD_SCHEMA = (
    "CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT, entity TEXT,"
    " district TEXT, severity TEXT, state TEXT, acknowledged INTEGER, flapping INTEGER,"
    " value REAL, message TEXT, started_ns INTEGER, updated_ns INTEGER, cleared_ns INTEGER,"
    " count INTEGER, acknowledged_by TEXT)"
)


def test_an_alert_database_of_the_previous_version_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite"
    db = sqlite3.connect(path)
    db.execute(OLD_SCHEMA)
    db.execute(
        "INSERT INTO alerts VALUES (7, 'tpi_high', 's1', 'd01', 'major', 'active', 1, 0, 9.0,"
        " 'tpi 9.0', 1, 2, 0, 3, 'ops-old')"
    )
    db.commit()
    db.close()
    store = AlertStore(path)
    (old,) = store.select()
    assert old.id == 7 and old.acknowledged_by == "ops-old" and old.acknowledged_ns == 0
    assert store.acknowledge(7, "ops-new").status == "refused"
    assert store.acknowledge(7, "ops-new", force=True).previous_by == "ops-old"
    store.close()
    # the engine inserts rows with the new column
    engine = AlertEngine([TPI], AlertStore(path))
    observe(engine, 0, {"s2": 9.0})
    assert [a.entity for a in observe(engine, 120, {"s2": 9.0})] == ["s2"]


runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_ack_refuses_a_second_operator_and_names_a_cleared_alert(tmp_path: Path) -> None:
    data = tmp_path / "city"
    (data / "analytics").mkdir(parents=True)
    engine = engine_at(data / "analytics")
    observe(engine, 0, {"s1": 9.0, "s2": 9.0})
    first, second = observe(engine, 120, {"s1": 9.0, "s2": 9.0})
    observe(engine, 180, {"s1": 1.0, "s2": 9.0})  # s1 clears
    engine.store.acknowledge(second.id, "ops-1")
    engine.store.close()
    code, out = cli("alerts", "ack", str(second.id), "--by", "ops-2", "--data-dir", str(data))
    assert code == 1
    assert "was acknowledged by ops-1" in out and "--force" in out
    store = AlertStore(data / "analytics" / "alerts.sqlite")
    assert store.select("id=?", (second.id,))[0].acknowledged_by == "ops-1"
    # the same operator again: nothing changes in the database, it says so, and it is sent to
    # the broker again (a retry after the broker was unreachable; none listens on port 9)
    result = runner.invoke(
        app, ["alerts", "ack", str(second.id), "--by", "ops-1", "--data-dir", str(data)],
        env={"CITYFLUX_MQTT__URL": "mqtt://127.0.0.1:9"},
    )  # fmt: skip
    assert result.exit_code == 1
    assert "was already acknowledged by ops-1 at" in result.output
    assert "not sent to the broker" in result.output
    assert [r.by for r in store.acknowledgements(second.id)] == ["ops-1"]
    # a cleared alert: acknowledged in the database, and the line says it had cleared (no
    # broker listens on port 9: exit 1, and that is in the same line)
    result = runner.invoke(
        app, ["alerts", "ack", str(first.id), "--by", "ops-1", "--data-dir", str(data)],
        env={"CITYFLUX_MQTT__URL": "mqtt://127.0.0.1:9"},
    )  # fmt: skip
    assert result.exit_code == 1
    assert "acknowledged in the database but not sent to the broker" in result.output
    assert "it had already cleared at" in result.output
    (cleared,) = store.select("id=?", (first.id,))
    assert cleared.acknowledged and cleared.state == "cleared"
    store.close()


def test_cli_list_reads_the_data_dir_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = cli("alerts", "list")
    assert code == 0 and "no alert database at var/analytics/alerts.sqlite" in out
    assert not (tmp_path / "var").exists()
    data = tmp_path / "var" / "demo"
    (data / "analytics").mkdir(parents=True)
    engine = engine_at(data / "analytics")
    observe(engine, 0, {"seg-42": 9.0})
    observe(engine, 120, {"seg-42": 9.0})
    engine.store.close()
    code, out = cli("alerts", "list", "--data-dir", "var/demo")
    assert code == 0 and "1 active alerts" in out and "seg-42" in out
    code, out = cli("alerts", "list", "--state", "bogus")
    assert code == 2
