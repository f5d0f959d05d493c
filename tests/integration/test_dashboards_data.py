"""Every query of every shipped dashboard, run the way Grafana runs it against a real InfluxDB
filled by a simulated run (city-tour: traffic, an incident, a storm, haze, dusk, outages and bad
payloads) through the real pipeline: simulator -> mosquitto -> cityflux -> InfluxDB."""

from __future__ import annotations

import math
import time
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from cityflux.analytics.alerts import AlertStore
from cityflux.cli import app
from cityflux.cli.scenario import execute
from cityflux.config import Config
from cityflux.dashboards import catalog
from cityflux.dashboards.overview import CITY_CONGESTED, CITY_CV, CITY_TPI
from cityflux.dashboards.verify import Check, targets, verify
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter
from tests.support import select


@pytest.fixture
def toured(config: Config, tmp_path: Path) -> tuple[Config, Simulation, int, int]:
    """The city-tour scenario through the pipeline; the wall-clock span of the run."""
    scenario = load_scenario("city-tour")
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), math.inf))
    city_map = tmp_path / "city-map.json"
    city_map.write_bytes(msgspec.json.encode(sim.city))
    # 0.5 s health points: the pipeline panels' rates need several per bucket
    run_config = config.with_overrides(
        {"analytics.city_map": str(city_map), "metrics.health_interval_s": 0.5}
    )
    wall_start = time.time_ns()
    execute(run_config, sim)
    return run_config, sim, wall_start, time.time_ns()


def dashboards() -> dict[str, dict]:
    return {p.name: catalog.load(p) for p in sorted(catalog.DEFAULT_DIR.glob("*.json"))}


def test_every_panel_query_returns_data(
    toured: tuple[Config, Simulation, int, int], db: InfluxWriter
) -> None:
    _, sim, wall_start, wall_end = toured
    sim_start, sim_end = sim.truth.start_ms * 1_000_000, (sim.truth.end_ms + 60_000) * 1_000_000
    checks: list[Check] = []
    for name, dashboard in dashboards().items():
        if name == "pipeline.json":  # cityflux's own metrics are stamped with the wall clock
            checks += verify(db, name, dashboard, wall_start, wall_end, min_interval_s=1)
        else:
            checks += verify(db, name, dashboard, sim_start, sim_end)
    failed = [f"{c.dashboard} / {c.panel} / {c.ref_id}: {c.error or 'no data'}\n  {c.query}"
              for c in checks if not c.ok]  # fmt: skip
    assert not failed, "\n".join(failed)
    city_tpi_matches(db)
    # every panel and every annotation of every dashboard was run
    expected = {(name, p["title"]) for name, d in dashboards().items() for p in d["panels"]}
    expected |= {(name, f"annotation: {a['name']}") for name, d in dashboards().items()
                 for a in d.get("annotations", {}).get("list", [])}  # fmt: skip
    assert {(c.dashboard, c.panel) for c in checks} == expected and len(expected) >= 45


def test_panels_show_what_the_pipeline_wrote(
    toured: tuple[Config, Simulation, int, int], db: InfluxWriter
) -> None:
    """The numbers on the panels are the run's: the active-alert stat counts the alert
    database's active alerts, and the map puts every segment inside the city."""
    config, sim, _, _ = toured
    start, end = sim.truth.start_ms * 1_000_000, (sim.truth.end_ms + 60_000) * 1_000_000
    overview = dashboards()["overview.json"]
    by_title = {p["title"]: p for p in overview["panels"]}

    store = AlertStore(config.analytics.alerts_db)
    active = store.select("state=?", ("active",))
    store.close()
    stat = _sent(db, overview, by_title["Active alerts now"], "A", start, end)
    per_severity = {r["severity"]: r["count"] for r in select(db, stat)}
    expected: dict[str, int] = {}
    for alert in active:
        expected[alert.severity] = expected.get(alert.severity, 0) + 1
    assert per_severity == expected and sum(expected.values()) > 10

    segments = select(db, _sent(db, overview, by_title["Congestion and alerts"], "A", start, end))
    lons = [p[0] for s in sim.city.segments for p in s.geometry]
    lats = [p[1] for s in sim.city.segments for p in s.geometry]
    assert len(segments) == len({(r["segment"], r["direction"]) for r in segments}) > 100
    for row in segments:
        assert min(lats) <= row["lat"] <= max(lats) and min(lons) <= row["lon"] <= max(lons)
        assert 1 <= row["level"] <= 5


def _sent(db: InfluxWriter, dashboard: dict, panel: dict, ref_id: str, start: int,
          end: int) -> str:  # fmt: skip
    checks = verify(db, "overview", {**dashboard, "panels": [panel], "annotations": {}},
                    start, end)  # fmt: skip
    return next(c.query for c in checks if c.ref_id == ref_id)


def test_verify_command_fails_on_empty_panels(config: Config, db: InfluxWriter) -> None:
    """`cityflux dashboards verify` against a database with nothing in it: every query runs
    without an error, none has data, and the command says so and exits 1."""
    env = {"CITYFLUX_INFLUX__URL": config.influx.url,
           "CITYFLUX_INFLUX__DATABASE": config.influx.database, "COLUMNS": "200"}  # fmt: skip
    db.ensure_database()
    result = CliRunner().invoke(app, ["dashboards", "verify", "--since", "1"], env=env)
    assert result.exit_code == 1, result.output
    queries = sum(len(list(targets(d))) for d in dashboards().values())
    assert f"0/{queries} queries return data" in result.output
    assert "error" not in result.output.lower()
    assert result.output.count("no data") == queries


def city_tpi_matches(db: InfluxWriter) -> None:
    """The overview's city TPI, congested share and CV, computed from the district rows (so
    that they hold on the cluster, where no worker writes the city row), equal the engine's
    city row."""
    window = """"district" = 'city' AND "window" = '5m' AND "vkt" > 0"""
    city = select(
        db, f'SELECT "tpi", "congested_share", "cv" FROM "traffic_district" WHERE {window}'
    )
    assert len(city) > 10
    for query, field in ((CITY_TPI, "tpi"), (CITY_CONGESTED, "congested_share"), (CITY_CV, "cv")):
        derived = select(
            db, query.replace("$timeFilter", "time > 0") + " GROUP BY time(1m) fill(none)"
        )
        by_time = {row["time"]: row[field] for row in derived}
        assert len({row[field] for row in city}) > 1, field  # the figure moves in the run
        for row in city:
            assert by_time[row["time"]] == pytest.approx(row[field], rel=2e-3, abs=2e-3), (
                field, row, by_time[row["time"]],
            )  # fmt: skip
