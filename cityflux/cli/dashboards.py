"""``cityflux dashboards generate|verify|push``: the Grafana dashboards as code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cityflux.cli.common import ConfigOption, app, console, load_or_exit
from cityflux.cli.extras import require
from cityflux.errors import CityfluxError
from cityflux.store.influx import InfluxWriter

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
    min_interval: Annotated[
        int, typer.Option(help="the data source's min interval, s (default: health interval)")
    ] = 0,
    directory: DirectoryOption = None,
    config: ConfigOption = None,
) -> None:
    """Run every panel's query against InfluxDB (from the configuration) as Grafana would;
    fail when one errors or comes back empty."""
    require("dashboards")
    from cityflux.dashboards import catalog
    from cityflux.dashboards.verify import Check, verify

    loaded = load_or_exit(config)
    end = until_ns or time.time_ns()
    start = end - round(since * 3600e9)
    influx = InfluxWriter(loaded.influx)
    floor = min_interval or max(1, round(loaded.metrics.health_interval_s))
    checks: list[Check] = []
    try:
        for name, dashboard in catalog.dashboards(directory).items():
            checks += verify(influx, name, dashboard, start, end, floor)
    except CityfluxError as exc:
        console.print(f"[red]cannot query InfluxDB:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        influx.close()
    table = Table(title=f"{sum(c.ok for c in checks)}/{len(checks)} queries return data")
    for column in ("dashboard", "panel", "query", "series", "rows", "problem"):
        table.add_column(column)
    for c in checks:
        problem = c.error or ("" if c.ok else "no data")
        style = "" if c.ok else "red"
        table.add_row(c.dashboard, c.panel, c.ref_id, str(c.series), str(c.rows), problem,
                      style=style)  # fmt: skip
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


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
