"""``cityflux city generate``, ``simulate``, ``record`` and ``replay``."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.table import Table

from cityflux.cli import stream_replay
from cityflux.cli.common import (
    ConfigOption,
    DataDirOption,
    app,
    broker_error,
    console,
    load_with_data_dir,
    progress_bar,
)
from cityflux.config import Config
from cityflux.errors import CityfluxError
from cityflux.simulators.citygen import CitySpec, generate_city, to_geojson
from cityflux.simulators.recording import Recorder, ReplayPlan, read_recording
from cityflux.simulators.runner import RunSummary, parse_speed, run_replay, run_simulation
from cityflux.simulators.scenario import Scenario, list_scenarios, load_scenario
from cityflux.simulators.simulation import Simulation

city_app = typer.Typer(no_args_is_help=True, help="City maps: generate one from a seed.")

SpeedOption = Annotated[
    str, typer.Option(help="multiple of real time (1 = real time), or 'max' for no waiting")
]
MqttUrl = Annotated[str | None, typer.Option("--mqtt-url", help="broker (default: config)")]


def _fail(exc: Exception | str) -> typer.Exit:
    console.print(f"[red]{exc}[/]", soft_wrap=True, highlight=False)  # copy-paste: no wraps
    return typer.Exit(1)


@city_app.command("generate")
def city_generate(
    out: Annotated[Path, typer.Argument(help="city map JSON to write")],
    seed: int = 1,
    devices: Annotated[int, typer.Option(help="about this many devices (0: use the sizes)")] = 0,
    districts: int = 4,
    road_km: float = 60.0,
    poles: int = 200,
    manholes: int = 100,
    geojson: Annotated[Path | None, typer.Option(help="also write GeoJSON here")] = None,
    scenario: Annotated[
        str | None, typer.Option(help="the city of this scenario (overrides the sizes)")
    ] = None,
) -> None:
    """Generate a city map (deterministic for a seed), optionally with a GeoJSON export."""
    if scenario:  # the same map the simulator's run of that scenario uses
        try:
            city = Simulation(load_scenario(scenario), time.time()).city
        except CityfluxError as exc:
            raise _fail(exc) from exc
    elif devices:
        city = generate_city(CitySpec.for_devices(devices, seed))
    else:
        spec = CitySpec(
            seed=seed, districts=districts, road_km=road_km, poles=poles, manholes=manholes
        )
        city = generate_city(spec)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(city)))
    if geojson:
        geojson.write_bytes(msgspec.json.encode(to_geojson(city)))
    total = len(city.detectors) + len(city.poles) + len(city.manholes)
    console.print(
        f"{out}: {len(city.districts)} districts, {len(city.segments)} segments, "
        f"{len(city.detectors)} detectors, {len(city.poles)} poles, {len(city.manholes)} "
        f"manholes ({total:,} devices)"
    )


def mqtt_config(config: Config, mqtt_url: str | None) -> Config:
    return config.with_overrides({"mqtt.url": mqtt_url}) if mqtt_url else config


def make_simulation(
    scenario_name: str,
    *,
    speed: float,
    duration_s: float | None = None,
    devices: int = 0,
    topic_root: str = "cityflux/v1",
    start: str | None = None,
) -> Simulation:
    """Load a scenario (optionally shortened, started at another time, or on a bigger
    generated city) and set its start."""
    overrides: dict[str, object] = {}
    if duration_s:
        overrides["clock.duration_s"] = duration_s
    if start:
        overrides["clock.start"] = start
    scenario: Scenario = load_scenario(scenario_name, overrides)
    city = generate_city(CitySpec.for_devices(devices, scenario.city.seed)) if devices else None
    start_s = scenario.start_epoch_s(time.time(), speed)
    return Simulation(scenario, start_s, topic_root, city=city)


def write_outputs(sim: Simulation, out_dir: Path) -> tuple[Path, Path]:
    """The ground truth and the expected counts, as JSON files in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = out_dir / "truth.json"
    expected = out_dir / "expected.json"
    truth.write_bytes(msgspec.json.format(msgspec.json.encode(sim.truth)))
    expected.write_bytes(msgspec.json.format(msgspec.json.encode(sim.expected.as_dict())))
    return truth, expected


@app.command()
def simulate(
    scenario: Annotated[str, typer.Argument(help=f"name ({', '.join(list_scenarios())}) or file")],
    speed: SpeedOption = "max",
    duration: Annotated[float, typer.Option(help="simulated seconds (0: the scenario's)")] = 0,
    devices: Annotated[int, typer.Option(help="simulate a generated city this big")] = 0,
    start: Annotated[
        str | None,
        typer.Option(help="local start HH:MM, or 'now' (live at --speed 1); default: scenario's"),
    ] = None,
    mqtt_url: MqttUrl = None,
    data_dir: DataDirOption = None,
    out_dir: Annotated[Path, typer.Option(help="ground truth and expected counts")] = Path(
        "var/scenarios"
    ),
    config: ConfigOption = None,
) -> None:
    """Publish a scenario's simulated city to the broker, with progress and a summary."""
    loaded = mqtt_config(load_with_data_dir(config, data_dir), mqtt_url)
    try:
        sim = make_simulation(
            scenario,
            speed=parse_speed(speed),
            duration_s=duration or None,
            devices=devices,
            topic_root=loaded.mqtt.topic_root,
            start=start,
        )
        summary = _withprogress_bar(sim, loaded, parse_speed(speed))
    except (CityfluxError, OSError, ValueError) as exc:
        raise _fail(broker_error(exc, loaded.mqtt.url)) from exc
    truth, expected = write_outputs(sim, out_dir / sim.scenario.name)
    console.print(_summary_table(sim, summary))
    console.print(f"ground truth: {truth}\nexpected counts: {expected}")


def _withprogress_bar(sim: Simulation, config: Config, speed: float) -> RunSummary:
    stop = threading.Event()
    with progress_bar() as progress:
        task = progress.add_task(sim.scenario.name, total=sim.end_s - sim.start_s, rate="")
        began = time.monotonic()

        def update(sim_now: float, published: int) -> None:
            progress.update(task, completed=sim_now - sim.start_s, rate=_counts(published, began))

        try:
            return run_simulation(sim, config.mqtt, speed, stop=stop, on_progress=update)
        except KeyboardInterrupt:
            stop.set()
            raise


def _counts(messages: int, began: float) -> str:
    rate = messages / max(time.monotonic() - began, 1e-3)
    return f"{messages:,} msgs {rate:,.0f}/s"


def _summary_table(sim: Simulation, summary: RunSummary) -> Table:
    table = Table(title=f"simulated {sim.scenario.name}", show_header=False)
    table.add_row("simulated", f"{summary.sim_s / 3600:.2f} h from {sim.truth.start}")
    table.add_row("messages published", f"{summary.messages:,}")
    table.add_row("wall time", f"{summary.wall_s:.1f} s ({summary.rate:,.0f} msg/s)")
    for kind, count in sorted(sim.expected.readings.items()):
        table.add_row(f"readings: {kind}", f"{count:,}")
    for reason, count in sorted(sim.expected.rejections.items()):
        table.add_row(f"malformed: {reason}", f"{count:,}")
    table.add_row("ground-truth events", f"{len(sim.truth.events):,}")
    return table


@app.command()
def record(
    out: Annotated[Path, typer.Argument(help="recording to write (.cfxrec)")],
    topic: Annotated[str, typer.Option(help="topic filter")] = "cityflux/v1/#",
    duration: Annotated[float, typer.Option(help="stop after seconds (0: Ctrl-C)")] = 0,
    count: Annotated[int, typer.Option(help="stop after this many messages (0: no limit)")] = 0,
    mqtt_url: MqttUrl = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Capture a broker's traffic (topics, payloads, receive times) into a compressed file."""
    loaded = mqtt_config(load_with_data_dir(config, data_dir), mqtt_url)
    recorder = Recorder(loaded.mqtt, out, topic)
    try:
        recorder.start()
    except (CityfluxError, OSError) as exc:
        raise _fail(broker_error(exc, loaded.mqtt.url)) from exc
    console.print(f"subscribed to {topic} on {loaded.mqtt.url}; recording to {out}")
    deadline = time.monotonic() + duration if duration else math.inf
    began = time.monotonic()
    # the bar runs against the duration (or the message count); with neither, it pulses
    total = duration or count or None
    try:
        with progress_bar(percent=total is not None) as progress:
            task = progress.add_task(f"recording {topic}", total=total, rate="")
            while time.monotonic() < deadline and not (count and recorder.count >= count):
                time.sleep(0.2)
                elapsed = time.monotonic() - began
                against = f" · {min(elapsed, duration):.0f}/{duration:.0f} s" if duration else ""
                progress.update(
                    task,
                    completed=min(elapsed, duration) if duration else recorder.count,
                    rate=_counts(recorder.count, began) + against,
                )
    except KeyboardInterrupt:
        pass
    recorder.stop()
    console.print(
        f"recorded {recorder.count:,} messages in {time.monotonic() - began:.1f} s "
        f"to {out} ({out.stat().st_size:,} bytes)"
    )


@app.command()
def replay(
    recording: Annotated[
        Path | None, typer.Argument(help="a file written by `cityflux record`")
    ] = None,
    speed: SpeedOption = "1",
    shift_to_now: Annotated[bool, typer.Option(help="move timestamps so the run starts now")] = (
        False
    ),
    loop: Annotated[int, typer.Option(help="play it this many times")] = 1,
    mqtt_url: MqttUrl = None,
    from_stream: stream_replay.FromStreamOption = False,
    since: stream_replay.SinceOption = None,
    partition: stream_replay.PartitionOption = None,
    database: stream_replay.DatabaseOption = None,
    replace: stream_replay.ReplaceOption = False,
    rules: stream_replay.RulesOption = None,
    city_map: stream_replay.CityMapOption = None,
    state_dir: stream_replay.StateDirOption = None,
    batch_span: stream_replay.BatchSpanOption = None,
    nats_url: stream_replay.NatsUrlOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Re-publish a recording in its original order, inter-arrival times scaled by --speed;
    or, with --from-stream, re-run what the JetStream stream keeps through the pipeline into
    another database (docs/scale.md, "Replay from the stream")."""
    if from_stream or recording is None:
        stream_replay.command(
            recording,
            stream_replay.StreamArgs(
                from_stream, since, partition, database, replace, rules, city_map, state_dir,
                batch_span, nats_url,
            ),
            load_with_data_dir(config, data_dir),
        )  # fmt: skip
        return
    if not recording.is_file():  # before connecting anywhere: the file is what is missing
        raise _fail(f"no recording at {recording} (write one with `cityflux record FILE`)")
    loaded = mqtt_config(load_with_data_dir(config, data_dir), mqtt_url)
    plan = ReplayPlan(speed=parse_speed(speed), loops=loop, shift_to_now=shift_to_now)
    try:  # one pass to count: the bar is the share of the messages published
        total = sum(1 for _ in read_recording(recording)[1]) * loop
    except (CityfluxError, OSError, ValueError) as exc:
        raise _fail(exc) from exc
    began = time.monotonic()
    try:
        with progress_bar() as progress:
            task = progress.add_task(f"replaying {recording.name}", total=total, rate="")

            def update(at: float, published: int) -> None:
                progress.update(task, completed=published, rate=_counts(published, began))

            summary = run_replay(recording, plan, loaded.mqtt, on_progress=update)
    except (CityfluxError, OSError, ValueError) as exc:
        raise _fail(broker_error(exc, loaded.mqtt.url)) from exc
    console.print(
        f"replayed {summary.messages:,} messages in {summary.wall_s:.1f} s "
        f"({summary.rate:,.0f} msg/s)"
    )


app.add_typer(city_app, name="city")
