"""The wheel carries what an installed cityflux reads at run time, and it runs without a
checkout: the packaged city map and rules through importlib.resources, the dashboards rendered
from code (no deploy/ tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import msgspec

from cityflux.model.citymap import load_city_map

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DATA = {
    "cityflux/py.typed",
    "cityflux/analytics/city-map.json",  # the default city map (analytics/citymapfile.py)
    "cityflux/analytics/rules.toml",  # the alert rules (analytics/alerts.py)
    "cityflux/simulators/scenarios/rush-hour-incident.toml",  # the named scenarios
}

# Run inside the unpacked wheel, from a directory with no checkout in it.
PROBE = """
import json, sys
from importlib import resources
import cityflux
from cityflux.analytics.citymapfile import load_configured_map
from cityflux.config import Config
from cityflux.dashboards import catalog
from cityflux.simulators.scenario import list_scenarios, load_scenario
city = load_configured_map(Config().analytics.city_map)
rules = resources.files("cityflux.analytics").joinpath("rules.toml").read_text()
print(json.dumps({
    "package": cityflux.__file__,
    "map": [city.name, len(city.poles), len(city.manholes), len(city.detectors)],
    "rules": len(rules),
    "dashboards": catalog.dashboards(),  # what `dashboards push|verify` use by default
    "scenarios": list_scenarios(),
    "incident": load_scenario("rush-hour-incident").name,
}))
"""


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the sources (an in-tree build would leave build/ behind, whose
    stale files setuptools can pack into later wheels)."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "cityflux", source / "cityflux", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = dist.glob("cityflux-*.whl")
    return wheel


def test_an_installed_wheel_finds_its_data_and_renders_the_dashboards(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert names >= PACKAGE_DATA, PACKAGE_DATA - names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cityflux").rglob("*.py")}
    assert names >= modules, sorted(modules - names)  # every subpackage, dashboards included
    assert not [n for n in names if n.startswith(("deploy/", "tests/", "bench/", "examples/"))]

    site, elsewhere, out = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "out"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=elsewhere, env=env,
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    found = msgspec.json.decode(probe.stdout)
    assert Path(found["package"]).is_relative_to(site)  # the wheel's code, not the checkout's
    shipped = load_city_map(ROOT / "examples" / "city-map.json")
    assert found["map"] == [
        shipped.name, len(shipped.poles), len(shipped.manholes), len(shipped.detectors)
    ]  # fmt: skip
    assert found["rules"] == len((ROOT / "cityflux/analytics/rules.toml").read_text())
    shipped_scenarios = sorted(
        p.stem for p in (ROOT / "cityflux/simulators/scenarios").glob("*.toml")
    )
    assert found["scenarios"] == shipped_scenarios and len(shipped_scenarios) == 6
    assert found["incident"] == "rush-hour-incident"
    committed = ROOT / "deploy" / "grafana" / "dashboards"
    expected = {p.name: p.read_bytes() for p in committed.glob("*.json")}
    assert len(expected) == 6
    assert found["dashboards"] == {name: msgspec.json.decode(b) for name, b in expected.items()}

    command = "from cityflux.cli import main; main()"
    generate = ["dashboards", "generate", "--out", str(out)]
    subprocess.run(
        [sys.executable, "-c", command, *generate], cwd=elsewhere, env=env,
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.glob("*.json")} == expected
    assert not list(elsewhere.iterdir())  # nothing was written where it ran
