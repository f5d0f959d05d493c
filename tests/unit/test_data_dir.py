"""One notion of where the data lives: a data directory's paths, its city map, the servers
running on it and the time range of its data (real files, real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from cityflux.cli import app
from cityflux.cli.common import (
    SERVERS_FILE,
    Servers,
    _announce,
    data_range,
    load_with_data_dir,
    running_servers,
)
from cityflux.config import Config


def test_the_data_dirs_paths_and_city_map(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    config = load_with_data_dir(None, data)
    assert config.analytics.alerts_db == str(data / "analytics" / "alerts.sqlite")
    assert config.spool.dir == str(data / "spool")
    assert config.analytics.city_map == Config().analytics.city_map  # none there yet
    data.mkdir()
    (data / "city-map.json").write_text("{}")
    config = load_with_data_dir(None, data)
    assert config.analytics.city_map == str((data / "city-map.json").resolve())


def test_servers_of_a_live_process_are_found_and_a_dead_ones_are_not(tmp_path: Path) -> None:
    config = Config().with_overrides(
        {"mqtt.url": "mqtt://127.0.0.1:4242", "influx.url": "http://127.0.0.1:4343"}
    )
    with ExitStack() as stack:
        _announce(stack, tmp_path, config)
        found = running_servers(tmp_path)
        assert found is not None and found.mqtt_url == "mqtt://127.0.0.1:4242"
        loaded = load_with_data_dir(None, tmp_path)
        assert loaded.mqtt.url == "mqtt://127.0.0.1:4242"
        assert loaded.influx.url == "http://127.0.0.1:4343"
    assert not (tmp_path / SERVERS_FILE).exists()  # removed with the servers
    session = data_range(tmp_path).wall
    assert session is not None and session[0] < session[1]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True, text=True)  # fmt: skip
    stale = Servers("mqtt://127.0.0.1:1", "http://127.0.0.1:1", int(dead.stdout))
    (tmp_path / SERVERS_FILE).write_bytes(msgspec.json.encode(stale))
    assert running_servers(tmp_path) is None  # a killed `up` left it behind
    assert os.getpid() > 0


def test_the_simulated_range_comes_from_the_newest_ground_truth(tmp_path: Path) -> None:
    scenarios = tmp_path / "scenarios" / "rush-hour-incident"
    scenarios.mkdir(parents=True)
    truth = {"scenario": "rush-hour-incident", "start": "", "start_ms": 1_000, "end_ms": 61_000}
    (scenarios / "truth.json").write_bytes(msgspec.json.encode(truth))
    found = data_range(tmp_path)
    assert found.sim == (1_000_000_000, 121_000_000_000)  # the last windows: +1 min
    assert found.scenario == "rush-hour-incident" and not found.scenario_run


def test_verify_rejects_a_bad_time_and_an_empty_data_dir(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["dashboards", "verify", "--from", "yesterday"])
    assert result.exit_code == 2 and "not an ISO 8601 time" in result.output
    result = runner.invoke(app, ["dashboards", "verify", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "holds no simulated run" in result.output


@pytest.mark.parametrize("state", ["active", "all"])
def test_alerts_list_in_an_empty_data_dir_creates_nothing(tmp_path: Path, state: str) -> None:
    result = CliRunner().invoke(app, ["alerts", "list", "--state", state,
                                      "--data-dir", str(tmp_path / "d")])  # fmt: skip
    assert result.exit_code == 0 and "no alert database" in result.output
    assert not (tmp_path / "d").exists()
