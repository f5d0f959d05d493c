"""`cityflux demo`, the README's main command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec

from cityflux.config import Config
from cityflux.servers import LocalInfluxDB, LocalMosquitto
from cityflux.store.influx import InfluxWriter
from tests.integration.test_scenarios_e2e import stored


def run_demo(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CITYFLUX_")}
    result = subprocess.run(
        [sys.executable, "-m", "cityflux", "demo", *args],
        cwd=cwd,
        env=clean | (env or {}),
        capture_output=True,
        timeout=180,
        check=False,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    return output


def expected_points(data_dir: Path) -> dict[str, int]:
    path = data_dir / "scenarios" / "rush-hour-incident" / "expected.json"
    points: dict[str, int] = msgspec.json.decode(path.read_bytes())["points"]
    return points


def test_demo_from_a_clean_environment_leaves_its_data_in_influxdb(tmp_path: Path) -> None:
    output = run_demo(tmp_path, "--duration", "20")
    data_dir = tmp_path / "var" / "demo"
    assert "published" in output and "To query it" in output
    assert "devices online" in output and "rejections by reason" in output
    expected = expected_points(data_dir)
    with LocalInfluxDB(data_dir / "influxdb") as influx:  # the demo stopped its own
        db = InfluxWriter(Config().with_overrides({"influx.url": influx.url}).influx)
        counts = stored(db)
        db.close()
    assert counts == {m: expected.get(m, 0) for m in counts}
    assert counts["traffic"] > 1_000 and counts["pole"] > 100


def test_demo_against_external_servers(
    tmp_path: Path, broker: LocalMosquitto, influxdb: LocalInfluxDB
) -> None:
    database = f"demo_{uuid.uuid4().hex[:8]}"
    run_demo(
        tmp_path,
        "--duration", "8", "--speed", "120", "--mqtt-url", broker.url, "--influx-url", influxdb.url,
        env={"CITYFLUX_INFLUX__DATABASE": database},
    )  # fmt: skip
    assert not (tmp_path / "var" / "demo" / "influxdb").exists()  # it started no InfluxDB
    db_config = Config().with_overrides({"influx.url": influxdb.url, "influx.database": database})
    db = InfluxWriter(db_config.influx)
    counts = stored(db)
    db.query(f'DROP DATABASE "{database}"', method="POST")
    db.close()
    expected = expected_points(tmp_path / "var" / "demo")
    assert counts == {m: expected.get(m, 0) for m in counts}
    assert counts["traffic"] > 0
