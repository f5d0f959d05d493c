"""Run every query of the dashboards against InfluxDB, as Grafana would, and report which come
back empty or with an error (``cityflux dashboards verify``).

Grafana expands its macros before InfluxDB sees a query: ``$timeFilter`` becomes
``time >= <from>ms and time <= <to>ms``, ``$__interval`` the bucket width it picks for the
panel (time range / max data points, at least the panel's or data source's minimum), and each
template variable its current value (an "All" with an ``allValue`` is inserted as is; a value
inside ``/.../`` is regex-escaped). This module does the same, so a query that passes here is
the query Grafana sends."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cityflux.errors import StoreError
from cityflux.store.influx import InfluxWriter

MAX_DATA_POINTS = 1_000  # Grafana's resolution for a panel about 1,000 pixels wide
MIN_INTERVAL_S = 10  # the data source's "min time interval" (deploy/grafana/provisioning)
# Grafana's roundInterval (rangeutil.ts): (below this many ms, round to this many ms)
ROUNDING_MS = [
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1_500, 1_000),
    (3_500, 2_000), (7_500, 5_000), (12_500, 10_000), (17_500, 15_000), (25_000, 20_000),
    (45_000, 30_000), (90_000, 60_000), (210_000, 120_000), (450_000, 300_000),
    (750_000, 600_000), (1_050_000, 900_000), (1_500_000, 1_200_000), (2_700_000, 1_800_000),
    (5_400_000, 3_600_000), (9_000_000, 7_200_000), (16_200_000, 10_800_000),
    (32_400_000, 21_600_000), (86_400_000, 43_200_000), (604_800_000, 86_400_000),
    (1_814_400_000, 604_800_000), (3_628_800_000, 2_592_000_000),
]  # fmt: skip
YEAR_MS = 31_536_000_000


@dataclass(slots=True)
class Check:
    dashboard: str
    panel: str
    ref_id: str
    query: str  # as sent, macros expanded
    series: int = 0
    rows: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rows > 0


@dataclass(slots=True)
class Target:
    panel: str
    ref_id: str
    query: str
    min_interval: str | None
    time_from: str | None = None  # the panel's own range: the last this long of the dashboard's


def targets(dashboard: dict[str, Any]) -> Iterator[Target]:
    """Every query the dashboard runs: panels' targets (rows included) and annotations."""
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if not target.get("hide"):
                yield Target(
                    panel.get("title", ""),
                    target.get("refId", "A"),
                    target["query"],
                    panel.get("interval"),
                    panel.get("timeFrom"),
                )
    for annotation in dashboard.get("annotations", {}).get("list", []):
        target = annotation.get("target") or {}
        if "query" in target:
            name = f"annotation: {annotation.get('name', '')}"
            yield Target(name, target.get("refId", "Anno"), target["query"], None)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def interval_for(
    start_ns: int, end_ns: int, min_interval: str | None, floor_s: int = MIN_INTERVAL_S
) -> str:
    """Grafana's ``$__interval``: the range over the resolution, rounded by its table, then
    raised to the panel's minimum or the data source's (``floor_s``) if below."""
    raw_ms = (end_ns - start_ns) / 1e6 / MAX_DATA_POINTS
    rounded_ms = next((to for below, to in ROUNDING_MS if raw_ms < below), YEAR_MS)
    floor_ms = 1000 * max(floor_s, _seconds(min_interval) if min_interval else 0)
    return _duration(max(rounded_ms, floor_ms))


def _seconds(duration: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([smhd])", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def expand(query: str, start_ns: int, end_ns: int, interval: str, values: dict[str, str]) -> str:
    """The query with Grafana's macros and the variables' values substituted."""
    text = query.replace(
        "$timeFilter", f"time >= {start_ns // 1_000_000}ms and time <= {end_ns // 1_000_000}ms"
    )
    text = text.replace("$__interval", interval).replace("$interval", interval)
    for name in sorted(values, key=len, reverse=True):  # $segment before $seg
        text = text.replace(f"${name}", values[name]).replace(f"${{{name}}}", values[name])
    return text


def variable_values(
    influx: InfluxWriter, dashboard: dict[str, Any], start_ns: int, end_ns: int
) -> dict[str, str]:
    """The value each template variable starts with, as Grafana picks it: "All" (its
    ``allValue``) when offered, else the first value its query returns."""
    values: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        name = variable["name"]
        if variable.get("includeAll") and variable.get("allValue"):
            values[name] = variable["allValue"]
            continue
        query = variable["query"]
        query = query if isinstance(query, str) else query["query"]  # both forms are valid
        found = _tag_values(influx.query(expand(query, start_ns, end_ns, "1m", values)))
        values[name] = re.escape(found[0]) if found else "__none__"
    return values


def _tag_values(result: dict[str, Any]) -> list[str]:
    return sorted(
        str(row[-1])
        for r in result.get("results", [])
        for series in r.get("series", [])
        for row in series.get("values", [])
    )


def verify(
    influx: InfluxWriter,
    name: str,
    dashboard: dict[str, Any],
    start_ns: int,
    end_ns: int,
    min_interval_s: int = MIN_INTERVAL_S,
) -> list[Check]:
    """One check per query of ``dashboard`` over [start_ns, end_ns], with the data source's
    minimum interval ``min_interval_s`` (set it to ``metrics.health_interval_s``)."""
    values = variable_values(influx, dashboard, start_ns, end_ns)
    checks = []
    for target in targets(dashboard):
        start = start_ns
        if target.time_from:  # as Grafana's relative time override, from the range's end
            start = max(start_ns, end_ns - _seconds(target.time_from) * 1_000_000_000)
        interval = interval_for(start, end_ns, target.min_interval, min_interval_s)
        sent = expand(target.query, start, end_ns, interval, values)
        check = Check(name, target.panel, target.ref_id, sent)
        try:
            _count(influx.query(sent), check)
        except StoreError as exc:
            check.error = str(exc)
        checks.append(check)
    return checks


def _count(result: dict[str, Any], check: Check) -> None:
    for r in result.get("results", []):
        if "error" in r:
            check.error = r["error"]
        for series in r.get("series", []):
            check.series += 1
            # a row whose every value is null shows nothing
            check.rows += sum(
                1 for row in series.get("values", []) if any(v is not None for v in row[1:])
            )
