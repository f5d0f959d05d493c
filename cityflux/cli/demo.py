"""``cityflux demo``: a simulated city through the real pipeline, watched live."""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from cityflux.analytics.alerts import Alert, AlertStore
from cityflux.analytics.indices import TPI_LEVELS
from cityflux.cli.common import (
    ConfigOption,
    app,
    console,
    exit_if_failed,
    local_stack,
    redraw_while,
    setup_logging,
)
from cityflux.cli.simulate import make_simulation, write_outputs
from cityflux.config import Config
from cityflux.errors import CityfluxError
from cityflux.pipeline.pipeline import Pipeline
from cityflux.simulators.runner import RunSummary, parse_speed, run_simulation
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter

STORED_FIELDS = {"pole": "noise_dba", "manhole": "battery_pct", "traffic": "occupancy_pct"}


@dataclass(slots=True)
class DemoState:
    sim: Simulation
    pipeline: Pipeline
    writer: InfluxWriter
    began: float = field(default_factory=time.monotonic)
    sim_now: float = 0.0
    published: int = 0
    stored: dict[str, dict[str, int]] = field(default_factory=dict)  # district -> kind -> n
    last_query: float = 0.0
    rate: float = 0.0
    alerts: AlertStore | None = None  # its own connection: the demo reads, the engine writes
    active: list[Alert] = field(default_factory=list)
    _last: tuple[float, float] = (0.0, 0.0)

    def refresh(self) -> None:
        now = time.monotonic()
        received = self.pipeline.metrics.value("messages_received_total")
        then, before = self._last
        if now - then >= 1.0:
            self.rate = (received - before) / (now - then) if then else 0.0
            self._last = (now, received)
        if now - self.last_query >= 2.0:
            self.last_query = now
            self.stored = stored_by_district(self.writer)
            if self.alerts is not None:
                rank = {"critical": 0, "major": 1, "minor": 2, "warning": 3}
                active = self.alerts.select("state='active'")
                self.active = sorted(active, key=lambda a: (rank.get(a.severity, 9), -a.id))


def stored_by_district(writer: InfluxWriter) -> dict[str, dict[str, int]]:
    """Readings in InfluxDB per district and kind (traffic: one per lane)."""
    counts: dict[str, dict[str, int]] = {}
    for kind, field_name in STORED_FIELDS.items():
        try:
            result = writer.query(f'SELECT count("{field_name}") FROM "{kind}" GROUP BY district')
        except CityfluxError:
            return counts
        for series in result.get("results", [{}])[0].get("series", []):
            district = series.get("tags", {}).get("district", "?")
            counts.setdefault(district, {})[kind] = int(series["values"][0][1])
    return counts


@app.command()
def demo(
    scenario: Annotated[str, typer.Option(help="scenario name or file")] = "rush-hour-incident",
    speed: Annotated[str, typer.Option(help="x real time, or 'max'")] = "60",
    duration: Annotated[
        float, typer.Option(help="stop after this many seconds (0: at the end)")
    ] = (0),
    mqtt_url: Annotated[str | None, typer.Option(help="use this broker")] = None,
    influx_url: Annotated[str | None, typer.Option(help="use this InfluxDB")] = None,
    data_dir: Annotated[Path, typer.Option(help="data of the servers the demo starts")] = Path(
        "var/demo"
    ),
    config: ConfigOption = None,
) -> None:
    """Start mosquitto and InfluxDB (unless URLs are given), run a simulated city through the
    real pipeline, and show it live; on exit, stop what was started."""
    setup_logging(False)
    with ExitStack() as stack:
        try:
            loaded = local_stack(stack, data_dir, mqtt_url, influx_url, config)
            sim = make_simulation(
                scenario, speed=parse_speed(speed), topic_root=loaded.mqtt.topic_root
            )
            data_dir.mkdir(parents=True, exist_ok=True)
            # each demo replays its scenario from the start: yesterday's windows and alerts
            # would make today's readings look late
            shutil.rmtree(loaded.analytics.checkpoint_dir, ignore_errors=True)
            Path(loaded.analytics.alerts_db).unlink(missing_ok=True)
            city_map = data_dir / "city-map.json"  # the analytics read the simulated city
            city_map.write_bytes(msgspec.json.encode(sim.city))
            loaded = loaded.with_overrides({"analytics.city_map": str(city_map.resolve())})
            pipeline = stack.enter_context(Pipeline(loaded, connect_timeout_s=15))
        except (CityfluxError, OSError, ValueError) as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
        summary = _run(sim, pipeline, loaded, parse_speed(speed), duration)
        write_outputs(sim, data_dir / "scenarios" / sim.scenario.name)
        _print_epilogue(sim, summary, loaded, data_dir, influx_url is None)


def _run(
    sim: Simulation, pipeline: Pipeline, config: Config, speed: float, duration: float
) -> RunSummary | None:
    state = DemoState(sim, pipeline, InfluxWriter(config.influx))
    if pipeline.analytics is not None:
        state.alerts = AlertStore(config.analytics.alerts_db)
    stop = threading.Event()
    outcome: list[RunSummary] = []

    def progress(sim_now: float, published: int) -> None:
        state.sim_now, state.published = sim_now, published

    def simulate() -> None:
        outcome.append(run_simulation(sim, config.mqtt, speed, stop=stop, on_progress=progress))

    def redraw() -> Group:
        state.refresh()
        return _view(state)

    simulator = threading.Thread(target=simulate, name="simulator", daemon=True)
    simulator.start()
    try:
        with Live(_view(state), console=console, refresh_per_second=2) as live:
            redraw_while(live, simulator, duration, redraw)
            stop.set()
            simulator.join(timeout=60)
            pipeline.drain(at_least=outcome[0].messages if outcome else 0)
            state.last_query = 0.0
            state.refresh()
            live.update(_view(state))
    except KeyboardInterrupt:
        stop.set()
        simulator.join(timeout=60)
        pipeline.drain()
    exit_if_failed(pipeline)
    return outcome[0] if outcome else None


def _view(state: DemoState) -> Group:
    metrics = state.pipeline.metrics
    sim = state.sim
    overview = Table(title=f"cityflux demo: {sim.scenario.name}", show_header=False)
    clock = (
        time.strftime("%H:%M", time.gmtime(state.sim_now + _offset_s(sim)))
        if state.sim_now
        else "-"
    )
    overview.add_row("simulated time (local)", clock)
    overview.add_row("messages/s into cityflux", f"{state.rate:,.0f}")
    overview.add_row("messages published", f"{state.published:,}")
    overview.add_row("messages acknowledged", f"{metrics.value('messages_acked_total'):,.0f}")
    devices = len(sim.devices.ids)
    overview.add_row("devices online", f"{devices - sim.expected.offline_now:,} / {devices:,}")
    overview.add_row("points written", f"{metrics.value('lines_written_total'):,.0f}")
    overview.add_row("spooled (InfluxDB down)", f"{metrics.value('lines_spooled_total'):,.0f}")
    rejections = Table(title="rejections by reason", min_width=40)
    rejections.add_column("reason")
    rejections.add_column("count", justify="right")
    for key, value in sorted(metrics.snapshot().items()):
        if key.startswith("rejections_total.") and value:
            rejections.add_row(key.split(".", 1)[1], f"{value:,.0f}")
    if not rejections.row_count:
        rejections.add_row("(none)", "0")
    districts = Table(title="per district: readings published, points in InfluxDB")
    for column in ("district", "published", "pole", "manhole", "traffic (per lane)"):
        districts.add_column(column, justify="right")
    published = sim.expected.readings_by_district
    for district in sorted(set(state.stored) | set(published)):
        row = state.stored.get(district, {})
        districts.add_row(
            district, f"{published[district]:,}", *(f"{row.get(k, 0):,}" for k in STORED_FIELDS)
        )
    return Group(overview, rejections, districts, *_analytics_view(state))


def _analytics_view(state: DemoState) -> list[Table]:
    if state.pipeline.analytics is None:
        return []
    tpi = Table(title="congestion (GB/T 33171 TPI, last minute)")
    for column in ("district", "TPI", "level", "congested length", "CV"):
        tpi.add_column(column, justify="right")
    top = Table(title="most congested segments")
    for column in ("segment", "direction", "TPI", "speed km/h", "LOS"):
        top.add_column(column, justify="right")
    latest = state.pipeline.latest_traffic()
    if latest is not None:
        links, rollup = latest.links, latest.rollup
        names = [*latest.district_ids, "city"]
        for i, name in enumerate(names):
            value = rollup.tpi[i]
            if not np.isnan(value):
                level = TPI_LEVELS[min(int(value // 2), 4)]
                tpi.add_row(name, f"{value:.1f}", level, f"{rollup.congested_share[i]:.0%}",
                            f"{rollup.cv[i]:.2f}")  # fmt: skip
        order = np.argsort(-np.nan_to_num(links.tpi, nan=-1.0))[:5]
        for i in order.tolist():
            if not np.isnan(links.tpi[i]):
                top.add_row(latest.link_segment[i], latest.link_direction[i],
                            f"{links.tpi[i]:.1f}", f"{links.speed_kmh[i]:.0f}",
                            str(links.los[i]))  # fmt: skip
    alerts = Table(title=f"active alerts ({len(state.active)})")
    for column in ("id", "severity", "rule", "entity", "message"):
        alerts.add_column(column)
    for alert in state.active[:8]:
        alerts.add_row(str(alert.id), alert.severity, alert.rule, alert.entity, alert.message)
    return [tpi, top, alerts]


def _offset_s(sim: Simulation) -> float:
    return sim.scenario.clock.utc_offset_h * 3600


def _print_epilogue(
    sim: Simulation, summary: RunSummary | None, config: Config, data_dir: Path, embedded: bool
) -> None:
    if summary is not None:
        console.print(
            f"published {summary.messages:,} messages in {summary.wall_s:.1f} s; "
            f"{sum(sim.expected.points.values()):,} points expected in InfluxDB "
            f"({dict(sim.expected.points)})"
        )
    db = config.influx.database
    if embedded:
        console.print(
            f"The servers the demo started are stopped; the data stays in {data_dir}.\n"
            f"To query it:  cityflux up --data-dir {data_dir}   (prints the InfluxDB URL)\n"
            f"then e.g.:    curl -G URL/query --data-urlencode db={db} "
            "--data-urlencode 'q=SELECT mean(occupancy_pct) FROM traffic GROUP BY district'"
        )
    else:
        console.print(
            f"Query it:  curl -G {config.influx.url}/query --data-urlencode db={db} "
            "--data-urlencode 'q=SELECT mean(occupancy_pct) FROM traffic GROUP BY district'"
        )
