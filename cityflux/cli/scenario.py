"""``cityflux scenario run NAME --report report.html``: a scenario through the whole pipeline,
scored against its ground truth."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cityflux.analytics.alerts import Alert
from cityflux.cli.common import (
    ConfigOption,
    app,
    console,
    local_stack,
    scenario_database,
    setup_logging,
)
from cityflux.cli.extras import require
from cityflux.cli.simulate import make_simulation
from cityflux.config import Config
from cityflux.errors import CityfluxError
from cityflux.pipeline.pipeline import Pipeline
from cityflux.simulators.runner import RunSummary, run_simulation
from cityflux.simulators.scenario import list_scenarios
from cityflux.simulators.scoring import as_dicts, score
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter

scenario_app = typer.Typer(no_args_is_help=True, help="Run scenarios end to end and score them.")
app.add_typer(scenario_app, name="scenario")
COUNTED = {"pole": "noise_dba", "manhole": "battery_pct", "traffic": "occupancy_pct",
           "device_status": "online"}  # fmt: skip


@scenario_app.command("list")
def list_command() -> None:
    """The scenarios shipped with cityflux (cityflux/simulators/scenarios/)."""
    for name in list_scenarios():
        typer.echo(name)


@scenario_app.command("run")
def run_command(
    name: Annotated[str, typer.Argument(help="scenario name or file")],
    report: Annotated[Path | None, typer.Option(help="write an HTML report here")] = None,
    duration: Annotated[float, typer.Option(help="simulated seconds (0: the scenario's)")] = 0,
    mqtt_url: Annotated[str | None, typer.Option(help="use this broker")] = None,
    influx_url: Annotated[str | None, typer.Option(help="use this InfluxDB")] = None,
    data_dir: Annotated[Path, typer.Option(help="servers' data, alerts, checkpoints")] = Path(
        "var/scenario-runs"
    ),
    config: ConfigOption = None,
) -> None:
    """Replay a scenario at full speed through MQTT, ingest and analytics into InfluxDB, then
    score the alerts against the scenario's ground truth (and write the report)."""
    if report is not None:
        require("report")  # before the run, not after it
    setup_logging(False)
    run_dir = data_dir / f"{Path(name).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    with ExitStack() as stack:
        try:
            loaded, sim = _prepare(stack, name, duration, run_dir, mqtt_url, influx_url, config)
            figures = execute(loaded, sim, show_progress=True)
        except (CityfluxError, OSError, ValueError) as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
    _print_scores(figures)
    console.print(
        f"data in {run_dir}: `cityflux alerts list --state all --data-dir {run_dir}`",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    if report is not None:
        from cityflux.simulators.report import render  # matplotlib: the [report] extra

        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render(figures))
        console.print(f"report: {report}")


def _prepare(
    stack: ExitStack,
    name: str,
    duration: float,
    run_dir: Path,
    mqtt_url: str | None,
    influx_url: str | None,
    config: Path | None,
) -> tuple[Config, Simulation]:
    loaded = local_stack(stack, run_dir, mqtt_url, influx_url, config)
    sim = make_simulation(
        name, speed=math.inf, duration_s=duration or None, topic_root=loaded.mqtt.topic_root
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    city_map = run_dir / "city-map.json"
    city_map.write_bytes(msgspec.json.encode(sim.city))
    (run_dir / "truth.json").write_bytes(msgspec.json.encode(sim.truth))
    overrides = {"analytics.city_map": str(city_map.resolve())}
    if influx_url is None:  # our own InfluxDB: a database per scenario
        overrides["influx.database"] = scenario_database(sim.scenario.name)
    return loaded.with_overrides(overrides), sim


def execute(
    config: Config, sim: Simulation, speed: float = math.inf, *, show_progress: bool = False
) -> dict[str, Any]:
    """Run the simulation through a pipeline with analytics; return the report's figures.
    ``show_progress``: bars for publishing and for cityflux acknowledging, with counts and
    rates, then the closing of the windows."""
    with Pipeline(config, connect_timeout_s=15) as pipeline, _bars(show_progress) as bars:
        began = time.monotonic()
        publish = bars.add_task("publishing (simulated time)", total=sim.end_s - sim.start_s,
                                counts="")  # fmt: skip
        stored = bars.add_task("acknowledged by cityflux", total=None, counts="")
        done = threading.Event()

        def acked() -> None:  # the pipeline's own counter, while it catches up
            while not done.wait(0.25):
                count = int(pipeline.metrics.value("messages_acked_total"))
                bars.update(stored, completed=count, counts=_counts(count, began))

        def published(sim_now: float, count: int) -> None:
            bars.update(publish, completed=sim_now - sim.start_s, counts=_counts(count, began))
            bars.update(stored, total=count)

        watcher = threading.Thread(target=acked, name="scenario-progress", daemon=True)
        watcher.start()
        try:
            summary = run_simulation(sim, config.mqtt, speed, on_progress=published)
            bars.update(publish, completed=sim.end_s - sim.start_s)
            pipeline.drain(timeout_s=300, at_least=summary.messages)
        finally:
            done.set()
            watcher.join()
        received = int(pipeline.metrics.value("messages_received_total"))
        bars.update(stored, total=received, completed=received, counts=_counts(received, began))
        closing = bars.add_task("closing the analytics windows", total=1, counts="")
        pipeline.stop_running()
        pipeline.finish_windows()  # the end of the run: close every window
        bars.update(closing, completed=1)
        return figures(config, sim, summary, pipeline.alert_history())


def _bars(show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<30}"),
        BarColumn(bar_width=24),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
    )


def _counts(messages: int, began: float) -> str:
    return f"{messages:,} msgs {messages / max(time.monotonic() - began, 1e-3):,.0f}/s"


def figures(
    config: Config, sim: Simulation, summary: RunSummary, alerts: list[Alert]
) -> dict[str, Any]:
    """Everything the report shows, read back from InfluxDB and the alert database."""
    writer = InfluxWriter(config.influx)
    start_ns, end_ns = sim.truth.start_ms * 1_000_000, sim.truth.end_ms * 1_000_000
    window = f"time >= {start_ns} AND time <= {end_ns + 600 * 1_000_000_000}"
    result = writer.query(
        f'SELECT "tpi" FROM "traffic_district" WHERE "window" = \'1m\' AND {window} '
        'GROUP BY "district"'
    )
    district_tpi: dict[str, list[list[float]]] = {}
    for series in result.get("results", [{}])[0].get("series", []):
        district_tpi[series["tags"]["district"]] = [
            [v[0] / 1e6, v[1]] for v in series["values"] if v[1] is not None
        ]
    air_quality = _air_quality(writer, window)
    points = {}
    for measurement, field in COUNTED.items():
        rows = writer.query(f'SELECT count("{field}") FROM "{measurement}" WHERE {window}')
        series = rows.get("results", [{}])[0].get("series", [])
        points[measurement] = int(series[0]["values"][0][1]) if series else 0
    writer.close()
    return {
        "scenario": sim.scenario.name,
        "description": sim.scenario.description,
        "start": sim.truth.start,
        "start_ms": sim.truth.start_ms,
        "end_ms": sim.truth.end_ms,
        "duration_s": (sim.truth.end_ms - sim.truth.start_ms) / 1000,
        "utc_offset_h": sim.scenario.clock.utc_offset_h,
        "messages": summary.messages,
        "points": points,
        "district_tpi": district_tpi,
        "air_quality": air_quality,
        "truth": msgspec.to_builtins(sim.truth.events),
        "alerts": msgspec.to_builtins(alerts),
        "alert_counts": dict(Counter(a.rule for a in alerts)),
        "scores": as_dicts(score(sim.truth, alerts)),
    }


def _air_quality(writer: InfluxWriter, window: str) -> dict[str, dict[str, Any]]:
    """Per district, the run's highest hourly HJ 633 AQI and what made it: the primary
    pollutants (all tied ones), those over IAQI 100, the category (air_quality_district,
    flagged sensors left out)."""
    result = writer.query(
        'SELECT max("aqi") AS "aqi", "primary", "exceeding", "category" '
        f'FROM "air_quality_district" WHERE {window} GROUP BY "district"'
    )
    peaks: dict[str, dict[str, Any]] = {}
    for series in result.get("results", [{}])[0].get("series", []):
        at = {name: i for i, name in enumerate(series["columns"])}
        row = series["values"][0]
        peaks[series["tags"]["district"]] = {
            "time_ms": row[at["time"]] / 1e6,
            "aqi": row[at["aqi"]],
            "primary": row[at["primary"]] or "",
            "exceeding": row[at["exceeding"]] or "",
            "category": row[at["category"]],
        }
    return peaks


def _print_scores(figures: dict[str, Any]) -> None:
    table = Table(title=f"{figures['scenario']}: detection scores")
    for column in ("event", "events", "detected", "alerts", "precision", "recall",
                   "mean TTD s"):  # fmt: skip
        table.add_column(column)
    for s in figures["scores"]:
        table.add_row(
            s["event_type"], str(s["events"]), str(s["detected"]), str(s["alerts"]),
            _fmt(s["precision"]), _fmt(s["recall"]), _fmt(s["mean_time_to_detect_s"]),
        )  # fmt: skip
    console.print(table)
    counts = Table(title="alerts by rule")
    counts.add_column("rule")
    counts.add_column("alerts", justify="right")
    for rule, count in sorted(figures["alert_counts"].items(), key=lambda item: -item[1]):
        counts.add_row(rule, f"{count:,}")
    if not counts.row_count:
        counts.add_row("(none)", "0")
    console.print(counts)
    if figures.get("air_quality"):
        air = Table(title="air quality: each district's highest hourly AQI (HJ 633)")
        for column in ("district", "AQI", "category", "primary", "over 100"):
            air.add_column(column, justify="right" if column in ("AQI", "category") else "left")
        for district, peak in sorted(figures["air_quality"].items()):
            air.add_row(district, _fmt(peak["aqi"]), str(peak["category"]),
                        peak["primary"] or "-", peak["exceeding"] or "-")  # fmt: skip
        console.print(air)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
