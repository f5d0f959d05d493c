from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import cityflux
from cityflux import errors
from cityflux.model.citymap import load_city_map
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from tests.support import ROOT


def test_public_names_are_the_intended_ones() -> None:
    assert sorted(cityflux.__all__) == sorted(
        [
            "CityfluxError",
            "Config",
            "ConfigError",
            "MqttError",
            "Pipeline",
            "ServerError",
            "SpoolError",
            "SpoolFull",
            "StoreError",
            "WriteRejected",
            "WriteRetryable",
            "__version__",
            "load_config",
        ]
    )
    for name in cityflux.__all__:
        assert hasattr(cityflux, name)


def test_one_error_tree() -> None:
    raised = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ]
    assert all(issubclass(error, errors.CityfluxError) for error in raised)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityflux", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **env},
        timeout=60,
    )


def test_check_config_prints_the_effective_config_with_secrets_masked() -> None:
    result = run_cli(
        "check-config", CITYFLUX_INFLUX__TOKEN="t0ps3cret", CITYFLUX_INFLUX__URL="http://db:8086"
    )
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stderr
    assert "http://db:8086" in result.stderr
    assert "t0ps3cret" not in result.stderr + result.stdout


def test_check_config_fails_with_the_key_named() -> None:
    result = run_cli("check-config", CITYFLUX_INGEST__BATCH_SIZE="lots")
    assert result.returncode == 2
    assert "batch_size" in result.stderr


def test_city_generate_writes_the_map_a_scenario_simulates(tmp_path: Path) -> None:
    out = tmp_path / "city.json"
    result = run_cli("city", "generate", str(out), "--scenario", "city-tour")
    assert result.returncode == 0, result.stderr
    scenario = load_scenario("city-tour")
    expected = Simulation(scenario, scenario.start_epoch_s(time.time(), math.inf)).city
    assert load_city_map(out) == expected
    assert len(expected.poles) == scenario.city.poles
