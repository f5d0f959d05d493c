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
from rich.console import RenderableType
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
from cityflux.cli.demo_figures import (
    PARTS,
    Counted,
    Points,
    Published,
    Reconciliation,
    points_in_influxdb,
)
from cityflux.cli.demo_view import Frame, SegmentRow, TpiRow, render
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
    published: int = 0  # messages the simulator published so far (births on own links too)
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

    def figures(self, summary: RunSummary | None = None) -> Reconciliation:
        """Live: the simulator's count so far; at the end: its summary (with the wills)."""
        messages = summary.messages if summary is not None else self.published
        wills = summary.wills if summary is not None else 0
        per_message = self.sim.scenario.publish.readings_per_message
        return Reconciliation(
            Published.of(self.sim, messages, wills), Counted.of(self.pipeline.metrics, per_message)
        )

    def frame(self) -> Frame:
        sim = self.sim
        devices = len(sim.devices.ids)
        metrics = self.pipeline.metrics
        rejections = {
            key.split(".", 1)[1]: int(value)
            for key, value in metrics.snapshot().items()
            if key.startswith("rejections_total.") and value
        }
        frame = Frame(
            scenario=sim.scenario.name,
            clock=_clock(self.sim_now, sim),
            elapsed_s=time.monotonic() - self.began,
            rate=self.rate,
            devices=devices,
            online=devices - sim.expected.offline_now,
            figures=self.figures(),
            published_by_district=dict(sim.expected.readings_by_district),
            stored=self.stored,
            rejections=rejections,
            analytics=self.pipeline.analytics is not None,
            alerts=self.active,
        )
        _add_traffic(frame, self.pipeline)
        return frame


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
    speed: Annotated[
        str, typer.Option(envvar="CITYFLUX_DEMO_SPEED", help="x real time, or 'max'")
    ] = "60",
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
            if mqtt_url is None:
                # the demo's own broker starts empty too: births and alerts it retained in an
                # earlier demo would reach cityflux again, beyond what this run published
                shutil.rmtree(data_dir / "mosquitto", ignore_errors=True)
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
        summary, figures, points = _run(sim, pipeline, loaded, parse_speed(speed), duration)
        write_outputs(sim, data_dir / "scenarios" / sim.scenario.name)
        _print_epilogue(sim, summary, figures, points)
        _print_hints(loaded, data_dir, influx_url is None)


def _run(
    sim: Simulation, pipeline: Pipeline, config: Config, speed: float, duration: float
) -> tuple[RunSummary | None, Reconciliation, Points | None]:
    """Simulate while the live view redraws; then the final figures (all delivered and
    durable) and the points in InfluxDB by what they are."""
    state = DemoState(sim, pipeline, InfluxWriter(config.influx))
    if pipeline.analytics is not None:
        state.alerts = AlertStore(config.analytics.alerts_db)
    stop = threading.Event()
    outcome: list[RunSummary] = []

    def progress(sim_now: float, published: int) -> None:
        state.sim_now, state.published = sim_now, published

    def simulate() -> None:
        outcome.append(run_simulation(sim, config.mqtt, speed, stop=stop, on_progress=progress))

    def redraw() -> RenderableType:
        state.refresh()
        return render(state.frame(), console)

    simulator = threading.Thread(target=simulate, name="simulator", daemon=True)
    simulator.start()
    try:
        with Live(render(state.frame(), console), console=console, refresh_per_second=2) as live:
            redraw_while(live, simulator, duration, redraw)
            stop.set()
            simulator.join(timeout=60)
            pipeline.drain(at_least=outcome[0].messages if outcome else 0)
            state.last_query = 0.0
            state.refresh()
            live.update(render(state.frame(), console))
    except KeyboardInterrupt:
        stop.set()
        simulator.join(timeout=60)
        pipeline.drain()
    exit_if_failed(pipeline)
    summary = outcome[0] if outcome else None
    try:
        points: Points | None = Points(
            int(pipeline.metrics.value("lines_written_total")), points_in_influxdb(state.writer)
        )
    except CityfluxError:  # the database is down: the points are in the spool
        points = None
    state.writer.close()
    return summary, state.figures(summary), points


def _clock(sim_now: float, sim: Simulation) -> str:
    return time.strftime("%H:%M", time.gmtime(sim_now + _offset_s(sim))) if sim_now else "-"


def _add_traffic(frame: Frame, pipeline: Pipeline) -> None:
    """The last closed minute's congestion per district and its worst segments."""
    latest = pipeline.latest_traffic()
    if latest is None:
        return
    links, rollup = latest.links, latest.rollup
    for i, name in enumerate([*latest.district_ids, "city"]):
        value = float(rollup.tpi[i])
        if not np.isnan(value):
            level = TPI_LEVELS[min(int(value // 2), 4)]
            frame.tpi[name] = TpiRow(value, level, float(rollup.congested_share[i]),
                                     float(rollup.cv[i]))  # fmt: skip
    order = np.argsort(-np.nan_to_num(links.tpi, nan=-1.0))[:5]
    for i in order.tolist():
        if not np.isnan(links.tpi[i]):
            frame.segments.append(SegmentRow(latest.link_segment[i], latest.link_direction[i],
                                             float(links.tpi[i]), float(links.speed_kmh[i]),
                                             str(links.los[i])))  # fmt: skip


def _offset_s(sim: Simulation) -> float:
    return sim.scenario.clock.utc_offset_h * 3600


def _print_epilogue(
    sim: Simulation, summary: RunSummary | None, figures: Reconciliation, points: Points | None
) -> None:
    """Where every message and every point went, each term measured, and the line that
    checks them: published = landed + rejected."""
    if not console.is_terminal:
        console.line()  # a live view's last frame ends without one there
    if summary is not None:
        console.print(
            f"published {summary.messages:,} messages in {summary.wall_s:.1f} s "
            f"({summary.rate:,.0f} msg/s)"
        )
    console.print(_messages_table(figures))
    if points is not None:
        console.print(_points_table(sim, points))
    colour = "green" if figures.adds_up else "red"
    console.print(f"[bold {colour}]{figures.line()}[/]", soft_wrap=True)


def _terms(title: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=None,
                  show_header=False, pad_edge=False)  # fmt: skip
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(overflow="fold", style="dim")
    return table


def _messages_table(figures: Reconciliation) -> Table:
    p, c = figures.published, figures.counted
    readings = p.messages - p.births - p.malformed - p.sent_twice
    table = _terms("MQTT messages: where each one went")
    table.add_row("  published by the simulated devices", f"{p.messages:,}",
                  f"readings {readings:,}, status births {p.births:,}, malformed "
                  f"{p.malformed:,}, sent twice {p.sent_twice:,}")  # fmt: skip
    table.add_row("+ wills, published by the broker", f"{p.wills:,}", "dropped connections")
    table.add_row("+ cityflux's own, on its subscription", f"{c.own:,}",
                  "alerts, dead letters, its status: not readings")  # fmt: skip
    table.add_row("+ received again after a redelivery", f"{c.redelivered:,}",
                  "stored once")  # fmt: skip
    if figures.unexplained:
        table.add_row("+ not accounted for", f"{figures.unexplained:,}",
                      "e.g. retained by the broker from an earlier run")  # fmt: skip
    table.add_row("= received by cityflux", f"{c.received:,}")
    table.add_row("  acknowledged after a durable write", f"{c.acked:,}")
    table.add_row("  devices' messages landed (stored)", f"{c.landed:,}")
    table.add_row("  devices' messages rejected", f"{c.rejected:,}", "dead-lettered, with why")
    return table


def _points_table(sim: Simulation, points: Points) -> Table:
    table = _terms("InfluxDB points: what the lines written are")
    expected = sim.expected.points
    per_kind = ", ".join(f"{kind} {points.stored.get(kind, 0):,}" for kind in sorted(expected))
    notes = {
        "readings": f"{per_kind} (expected {sum(expected.values()):,}; traffic: one per lane)",
        "analytics": "indices, air quality, noise... per window",
        "alerts": "a point per alert change",
        "dead letters": "a point per rejection",
        "health": "cityflux's own metrics",
    }
    for index, part in enumerate(PARTS):
        label = f"{'  ' if index == 0 else '+ '}{part}"
        table.add_row(label, f"{points.part(part):,}", notes[part])
    if points.rewritten >= 0:
        table.add_row("+ rewrites of a stored point", f"{points.rewritten:,}",
                      "same series and time, stored once: alert updates, duplicates")  # fmt: skip
    else:
        table.add_row("- points stored before this run", f"{-points.rewritten:,}")
    table.add_row("= points written by cityflux", f"{points.written:,}")
    return table


def _print_hints(config: Config, data_dir: Path, embedded: bool) -> None:
    """Commands one per line, continued with backslashes: copy-paste survives any width."""
    db = config.influx.database
    query = [
        f"    --data-urlencode db={db} \\",
        "    --data-urlencode 'q=SELECT mean(speed_kmh) FROM traffic GROUP BY district'",
    ]
    if embedded:
        lines = [
            f"The servers the demo started are stopped; the data stays in {data_dir}.",
            "To query it, start them again (this prints the InfluxDB URL):",
            f"  cityflux up --data-dir {data_dir}",
            "then, in another shell:",
            "  curl -G URL/query \\",
            *query,
        ]
    else:
        lines = ["Query it:", f"  curl -G {config.influx.url}/query \\", *query]
    lines += [
        "Its alerts, and its dashboards' queries checked against its data:",
        f"  cityflux alerts list --data-dir {data_dir}",
        f"  cityflux dashboards verify --data-dir {data_dir} --allow-empty",
    ]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
