"""Every dashboard cityflux ships, rendered to the JSON files in deploy/grafana/dashboards/.

The JSON is generated, committed, and checked against this generator (``cityflux dashboards
generate --check``, and a test), so what Grafana provisions is always what this code says.
Installed cityflux has no deploy/ tree and needs none: the dashboards are rendered from this
code wherever no directory of JSON files is given (:func:`dashboards`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard

from cityflux.dashboards import alerts, influxql, manholes, overview, pipeline, poles, traffic

# file name -> builder, in the order the dashboards link to each other
DASHBOARDS: dict[str, Callable[[], dash.Dashboard]] = {
    "overview.json": overview.build,
    "traffic.json": traffic.build,
    "poles.json": poles.build,
    "manholes.json": manholes.build,
    "alerts.json": alerts.build,
    "pipeline.json": pipeline.build,
}
# The committed copy Grafana provisions from, relative to the working directory: where
# `cityflux dashboards generate [--check]` writes and looks by default, run from a checkout's
# root as `make` and docs/dashboards.md do (an installed cityflux has no deploy/ tree).
DEFAULT_DIR = Path("deploy") / "grafana" / "dashboards"


def render(builder: Callable[[], dash.Dashboard]) -> str:
    """A dashboard as the text of its JSON file (stable: same code, same bytes)."""
    built = builder().build()
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number  # Grafana links, embeds and remembers panels by id
    return json.dumps(built, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    return {name: render(builder) for name, builder in DASHBOARDS.items()}


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path = DEFAULT_DIR) -> list[str]:
    """Files in ``directory`` that differ from the generator (or are missing or extra)."""
    expected = render_all()
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    problems = [f"{name}: extra (not generated)" for name in sorted(present - set(expected))]
    for name, text in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: differs from the generator")
    return problems


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def dashboards(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every dashboard by file name, in name order: the ``*.json`` files in ``directory``, or
    without one what the generator renders (the same JSON as the committed files)."""
    if directory is None:
        return {name: json.loads(text) for name, text in sorted(render_all().items())}
    return {path.name: load(path) for path in sorted(directory.glob("*.json"))}


def parse(data: dict[str, Any]) -> dashboard.Dashboard:
    """Read dashboard JSON through the foundation SDK's models (with our InfluxQL queries
    registered), the schema check of the builder library."""
    register_default_plugins()
    cogruntime.register_dataquery_variant(influxql.variant_config())
    return dashboard.Dashboard.from_json(data)


def schema_problems(data: dict[str, Any]) -> list[str]:
    """Where ``data`` departs from the foundation SDK's dashboard schema: every key and value
    must survive being read by its models and written back. Annotation targets are the one
    place the schema types Grafana's built-in annotations only, so ours are checked against
    the InfluxDB annotation target instead."""
    data = json.loads(json.dumps(data))
    targets = [a.pop("target", None) for a in data.get("annotations", {}).get("list", [])]
    again = json.loads(json.dumps(parse(data), cls=JSONEncoder))
    for annotation in again.get("annotations", {}).get("list", []):
        annotation.pop("target", None)
    problems = _differences(data, again, "")
    expected_keys = set(influxql.AnnotationTarget("", "", "").to_json())
    for index, target in enumerate(targets):
        if not isinstance(target, dict) or set(target) != expected_keys:
            problems.append(f"annotations.list[{index}].target: not an InfluxQL annotation")
    return problems


def _differences(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: not in the schema" for k in a.keys() - b.keys()]
        out += [f"{path}.{k}: added by the schema" for k in b.keys() - a.keys()]
        for key in a.keys() & b.keys():
            out += _differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            p
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for p in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} read back as {b!r}"]
