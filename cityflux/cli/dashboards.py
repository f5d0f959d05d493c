"""``cityflux dashboards generate|verify|push``: the Grafana dashboards as code."""

from __future__ import annotations

import datetime as dt
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cityflux.cli.common import (
    ConfigOption,
    DataDirOption,
    app,
    console,
    data_range,
    load_or_exit,
    load_with_data_dir,
    running_servers,
    scenario_database,
)
from cityflux.cli.extras import require
from cityflux.config import Config
from cityflux.errors import CityfluxError
from cityflux.servers import LocalInfluxDB
from cityflux.store.influx import InfluxWriter

if TYPE_CHECKING:
    from cityflux.dashboards.verify import Check

# cityflux.dashboards needs the [dashboards] extra: imported inside the commands, after require()
DirectoryOption = Annotated[
    Path | None,
    typer.Option(
        help="a directory of dashboard JSON files (default: the generator's dashboards, the "
        "same as deploy/grafana/dashboards/)"
    ),
]

dashboards_app = typer.Typer(
    no_args_is_help=True, help="Grafana dashboards: generate the JSON, check it, push it."
)
app.add_typer(dashboards_app, name="dashboards")


@dashboards_app.command("generate")
def generate(
    out: Annotated[
        Path | None,
        typer.Option(
            help="where the JSON files go (default: deploy/grafana/dashboards/ under the "
            "current directory, a checkout's committed copy)"
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="only compare the files with the generator")
    ] = False,
) -> None:
    """Write every dashboard's JSON (to deploy/grafana/dashboards/ under the current directory
    by default), or with --check fail if the files there are not what the generator makes."""
    require("dashboards")
    from cityflux.dashboards import catalog

    out = out or catalog.DEFAULT_DIR
    if check:
        problems = catalog.stale(out)
        for problem in problems:
            console.print(f"[red]{out}/{problem}[/]")
        if problems:
            console.print("run `cityflux dashboards generate` and commit the result")
            raise typer.Exit(1)
        console.print(f"{len(catalog.DASHBOARDS)} dashboards in {out} match the generator")
        return
    for path in catalog.write(out):
        console.print(f"wrote {path}")


@dashboards_app.command("verify")
def verify_command(
    since: Annotated[float, typer.Option(help="check the last this many hours")] = 6.0,
    until_ns: Annotated[int, typer.Option(help="end of the range (default: now)")] = 0,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="start of the range, ISO 8601 (UTC unless it says)"),
    ] = None,
    to: Annotated[
        str | None, typer.Option(help="end of the range, ISO 8601 (default: now)")
    ] = None,
    min_interval: Annotated[
        int, typer.Option(help="the data source's min interval, s (default: health interval)")
    ] = 0,
    allow_empty: Annotated[
        bool,
        typer.Option(
            help="list empty panels without failing: a run without, e.g., open covers or "
            "rejected messages leaves their panels empty; errors still fail"
        ),
    ] = False,
    directory: DirectoryOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Run every panel's query against InfluxDB (from the configuration) as Grafana would;
    fail when one errors or comes back empty (empty: unless --allow-empty).

    With --data-dir (a demo's or `up`'s) and no --from: its InfluxDB (the running one, or
    started for the check) over its data's time range: the simulated city's for the city
    dashboards, the wall clock of its last session for the pipeline dashboard."""
    require("dashboards")
    from cityflux.dashboards import catalog

    loaded = load_with_data_dir(config, data_dir)
    ranges = _ranges(since, until_ns, from_, to, data_dir)
    with ExitStack() as stack:
        if data_dir is not None:
            loaded = _data_dir_influx(stack, loaded, data_dir)
        console.print(f"InfluxDB {loaded.influx.url}, database {loaded.influx.database}")
        floor = min_interval or max(1, round(loaded.metrics.health_interval_s))
        checks = _verify_all(loaded, catalog.dashboards(directory), ranges, floor)
    table = Table(title=f"{sum(c.ok for c in checks)}/{len(checks)} queries return data")
    for column in ("dashboard", "panel", "query", "series", "rows", "problem"):
        table.add_column(column)
    for c in checks:
        problem = c.error or ("" if c.ok else "no data")
        style = "" if c.ok else "red"
        table.add_row(c.dashboard, c.panel, c.ref_id, str(c.series), str(c.rows), problem,
                      style=style)  # fmt: skip
    console.print(table)
    if any(c.error for c in checks) or not (allow_empty or all(c.ok for c in checks)):
        raise typer.Exit(1)


# the dashboard of cityflux's own metrics, stamped with the wall clock, not event time
WALL_CLOCK_DASHBOARD = "pipeline"


def _ranges(
    since: float, until_ns: int, from_: str | None, to: str | None, data_dir: Path | None
) -> dict[str, tuple[int, int]]:
    """The range per kind of dashboard ("city" and "pipeline"), printed."""
    if from_ is not None or data_dir is None:
        end = _parse_time(to) if to else (until_ns or time.time_ns())
        start = _parse_time(from_) if from_ else end - round(since * 3600e9)
        ranges = {"city": (start, end), WALL_CLOCK_DASHBOARD: (start, end)}
    else:
        found = data_range(data_dir)
        if found.sim is None and found.wall is None:
            console.print(
                f"[red]{data_dir} holds no simulated run nor session to check[/]", soft_wrap=True
            )
            raise typer.Exit(2)
        wall = found.wall or found.sim
        assert wall is not None
        ranges = {"city": found.sim or wall, WALL_CLOCK_DASHBOARD: wall}
    for name, (start, end) in ranges.items():
        console.print(f"{name} dashboards: {_iso(start)} .. {_iso(end)}")
    return ranges


def _parse_time(text: str) -> int:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        console.print(f"[red]{text!r} is not an ISO 8601 time (e.g. 2025-03-01T07:30Z)[/]")
        raise typer.Exit(2) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return round(moment.timestamp() * 1e9)


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _data_dir_influx(stack: ExitStack, config: Config, data_dir: Path) -> Config:
    """The data directory's InfluxDB: the one serving it now, or one started on its files for
    the check; the database a scenario run wrote to."""
    overrides: dict[str, object] = {}
    found = data_range(data_dir)
    if found.scenario_run and found.scenario:
        overrides["influx.database"] = scenario_database(found.scenario)
    if running_servers(data_dir) is None and (data_dir / "influxdb").is_dir():
        overrides["influx.url"] = stack.enter_context(LocalInfluxDB(data_dir / "influxdb")).url
        overrides["influx.api"] = "v1"
    return config.with_overrides(overrides) if overrides else config


def _verify_all(
    config: Config, dashboards: dict[str, Any], ranges: dict[str, tuple[int, int]], floor: int
) -> list[Check]:
    from cityflux.dashboards.verify import verify

    influx = InfluxWriter(config.influx)
    checks: list[Check] = []
    try:
        for name, dashboard in dashboards.items():
            kind = WALL_CLOCK_DASHBOARD if Path(name).stem == WALL_CLOCK_DASHBOARD else "city"
            start, end = ranges[kind]
            checks += verify(influx, name, dashboard, start, end, floor)
    except CityfluxError as exc:
        console.print(f"[red]cannot query InfluxDB:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        influx.close()
    return checks


@dashboards_app.command("push")
def push_command(
    grafana_url: Annotated[str, typer.Option(help="e.g. http://grafana:3000")],
    token: Annotated[
        str | None, typer.Option(envvar="GRAFANA_TOKEN", help="service-account token")
    ] = None,
    user: Annotated[str | None, typer.Option(envvar="GRAFANA_USER", help="basic auth")] = None,
    password: Annotated[str | None, typer.Option(envvar="GRAFANA_PASSWORD")] = None,
    influx_url: Annotated[
        str | None, typer.Option(help="InfluxDB as Grafana reaches it (default: influx.url)")
    ] = None,
    directory: DirectoryOption = None,
    config: ConfigOption = None,
) -> None:
    """Create or update the InfluxDB data source, the cityflux folder and the dashboards in
    Grafana (idempotent)."""
    require("dashboards")
    from cityflux.dashboards import catalog
    from cityflux.dashboards.push import PushError, connect, datasource, push

    loaded = load_or_exit(config)
    dashboards = catalog.dashboards(directory)
    if not dashboards:
        console.print(f"[red]no dashboards in {directory}[/]")
        raise typer.Exit(2)
    try:
        source = datasource(loaded.influx, influx_url, loaded.metrics.health_interval_s)
        with connect(grafana_url, token=token, user=user, password=password) as api:
            report = push(api, source, dashboards)
    except PushError as exc:
        console.print(f"[red]push failed:[/] {exc}")
        raise typer.Exit(1) from exc
    for item in report.created:
        console.print(f"created {item}")
    for item in report.updated:
        console.print(f"updated {item}")
