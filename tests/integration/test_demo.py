"""`cityflux demo`, the README's main command, run as a user runs it."""

from __future__ import annotations

import os
import re
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


def expected_points(data_dir: Path, scenario: str = "rush-hour-incident") -> dict[str, int]:
    points: dict[str, int] = expected(data_dir, scenario)["points"]
    return points


def expected(data_dir: Path, scenario: str) -> dict[str, object]:
    path = data_dir / "scenarios" / scenario / "expected.json"
    decoded: dict[str, object] = msgspec.json.decode(path.read_bytes())
    return decoded


RECONCILIATION = re.compile(
    r"published ([\d,]+) = landed ([\d,]+) \+ rejected ([\d,]+) "
    r"\(\+ ([\d,]+) duplicates after redelivery\)"
)


def number(text: str) -> int:
    return int(text.replace(",", ""))


def term(output: str, label: str) -> int:
    """The count on the epilogue's row that starts with ``label``."""
    match = re.search(rf"^{re.escape(label)}\s+([\d,]+)", output, re.MULTILINE)
    assert match, f"no row {label!r} in:\n{output}"
    return number(match.group(1))


def reconciliation(output: str) -> tuple[int, int, int, int]:
    """The demo's last figures: published, landed, rejected, duplicates after redelivery;
    checked against the message terms above them (each measured on its own)."""
    match = RECONCILIATION.search(output)
    assert match, output
    published, landed, rejected, duplicates = (number(g) for g in match.groups())
    assert published == landed + rejected
    by_devices = term(output, "  published by the simulated devices")
    wills = term(output, "+ wills, published by the broker")
    own = term(output, "+ cityflux's own, on its subscription")
    again = term(output, "+ received again after a redelivery")
    assert published == by_devices + wills and again == duplicates
    assert term(output, "= received by cityflux") == published + own + duplicates
    assert term(output, "  acknowledged after a durable write") == published + own
    assert "not accounted for" not in output
    written = term(output, "= points written by cityflux")
    parts = ("  readings", "+ analytics", "+ alerts", "+ dead letters", "+ health")
    stored = sum(term(output, label) for label in parts)
    assert written == stored + term(output, "+ rewrites of a stored point")
    return published, landed, rejected, duplicates


def test_demo_from_a_clean_environment_leaves_its_data_in_influxdb(tmp_path: Path) -> None:
    output = run_demo(tmp_path, "--duration", "20")
    data_dir = tmp_path / "var" / "demo"
    assert "published" in output and "To query it" in output
    assert "devices online" in output and "rejections by reason" in output
    assert "districts: messages published, points stored, congestion" in output
    assert "active alerts (" in output
    published, landed, rejected, duplicates = reconciliation(output)
    truth = expected(data_dir, "rush-hour-incident")
    # no faults in this scenario: every message the simulator counted landed, once
    assert published == landed == truth["messages"] and rejected == duplicates == 0
    points = expected_points(data_dir)
    assert term(output, "  readings") == sum(points.values())
    with LocalInfluxDB(data_dir / "influxdb") as influx:  # the demo stopped its own
        db = InfluxWriter(Config().with_overrides({"influx.url": influx.url}).influx)
        counts = stored(db)
        db.close()
    assert counts == {m: points.get(m, 0) for m in counts}
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
    points = expected_points(tmp_path / "var" / "demo")
    assert counts == {m: points.get(m, 0) for m in counts}
    assert counts["traffic"] > 0


def test_demo_figures_add_up_with_faults(tmp_path: Path) -> None:
    """Outages (births on the devices' own connections, wills from the broker), malformed
    payloads, duplicates and late delivery: the reconciliation line still adds up, each
    term as the simulator counted it."""
    output = run_demo(tmp_path, "--scenario", "device-failure", "--speed", "max")
    published, landed, rejected, _ = reconciliation(output)
    truth = expected(tmp_path / "var" / "demo", "device-failure")
    rejections = truth["rejections"]
    assert isinstance(rejections, dict)
    assert rejected == sum(rejections.values()) > 0
    wills = term(output, "+ wills, published by the broker")
    assert wills > 0 and published == truth["messages"] + wills
    assert landed == published - rejected
    assert re.search(r"sent\s+twice\s+[1-9]", output)
    points = expected_points(tmp_path / "var" / "demo", "device-failure")
    assert term(output, "  readings") == sum(points.values())
    assert term(output, "+ dead letters") > 0
