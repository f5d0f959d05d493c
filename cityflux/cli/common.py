"""What every command shares: the console, logging, and loading the configuration."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cityflux.config import Config, load_config
from cityflux.errors import CityfluxError
from cityflux.servers import LocalInfluxDB, LocalMosquitto

if TYPE_CHECKING:
    from cityflux.pipeline.pipeline import Pipeline

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="cityflux: street-level IoT -> validated readings -> analytics -> InfluxDB.",
)
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file (default: $CITYFLUX_CONFIG)")
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="CITYFLUX_DATA_DIR",
        help="where this city's data lives, as `cityflux up`/`demo` lay it out: alerts, "
        "analytics, spool, city-map.json, and the servers running on it (default: the "
        "configuration's paths)",
    ),
]
# written into a data directory while `up`, `demo` or `scenario run` serve it: how other
# commands given the same --data-dir find its broker and database
SERVERS_FILE = "servers.json"
SESSION_FILE = "session.json"
CITY_MAP_FILE = "city-map.json"


class Servers(msgspec.Struct, frozen=True):
    mqtt_url: str
    influx_url: str
    pid: int


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def exit_if_failed(pipeline: Pipeline) -> None:
    """A component the supervisor gave up on ends the command with status 1 (systemd and
    compose restart `cityflux run`); the reason is printed, never a silent stop."""
    if pipeline.failure is not None:
        console.print(f"[red]cityflux stopped: {pipeline.failure}[/]")
        raise typer.Exit(1)


def load_or_exit(path: Path | None) -> Config:
    try:
        return load_config(path)
    except CityfluxError as exc:
        console.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from exc


def data_dir_overrides(data_dir: Path) -> dict[str, object]:
    """The configuration's paths inside ``data_dir``: the spool, the analytics checkpoint,
    the alert database, and the city map when the directory has one (`demo` and
    `scenario run` write the simulated city's there: the checkpoint belongs to that map)."""
    overrides: dict[str, object] = {
        "spool.dir": str(data_dir / "spool"),
        "analytics.checkpoint_dir": str(data_dir / "analytics"),
        "analytics.alerts_db": str(data_dir / "analytics" / "alerts.sqlite"),
    }
    city_map = data_dir / CITY_MAP_FILE
    if city_map.is_file():
        overrides["analytics.city_map"] = str(city_map.resolve())
    return overrides


def running_servers(data_dir: Path) -> Servers | None:
    """The broker and database serving ``data_dir`` now (its servers file, written by the
    process that started them, if that process is still alive)."""
    try:
        servers = msgspec.json.decode((data_dir / SERVERS_FILE).read_bytes(), type=Servers)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    try:
        os.kill(servers.pid, 0)
    except ProcessLookupError:
        return None  # left behind by a process that was killed
    except PermissionError:
        pass  # alive, another user's
    return servers


def load_with_data_dir(config_path: Path | None, data_dir: Path | None) -> Config:
    """The configuration; with ``data_dir``, its paths there and the URLs of the servers
    running on it (`cityflux up --data-dir` in another shell), if any."""
    loaded = load_or_exit(config_path)
    if data_dir is None:
        return loaded
    overrides = data_dir_overrides(data_dir)
    servers = running_servers(data_dir)
    if servers is not None:
        overrides |= {"mqtt.url": servers.mqtt_url, "influx.url": servers.influx_url}
    return loaded.with_overrides(overrides)


def local_stack(
    stack: ExitStack,
    data_dir: Path,
    mqtt_url: str | None = None,
    influx_url: str | None = None,
    config_path: Path | None = None,
) -> Config:
    """The configuration, with a mosquitto and an InfluxDB 1.x started as child processes on
    free loopback ports (data under ``data_dir``) unless their URLs are given; ``stack``
    stops what was started. While they run, ``data_dir/servers.json`` names them."""
    overrides = data_dir_overrides(data_dir)
    overrides["metrics.port"] = 0  # any free port: 9108 may be taken by a `cityflux run`
    if mqtt_url:
        overrides["mqtt.url"] = mqtt_url
    else:
        overrides["mqtt.url"] = stack.enter_context(LocalMosquitto(data_dir / "mosquitto")).url
    if influx_url:
        overrides["influx.url"] = influx_url
    else:
        overrides["influx.url"] = stack.enter_context(LocalInfluxDB(data_dir / "influxdb")).url
        overrides["influx.api"] = "v1"
    config = load_or_exit(config_path).with_overrides(overrides)
    _announce(stack, data_dir, config)
    return config


def _announce(stack: ExitStack, data_dir: Path, config: Config) -> None:
    """Write the servers file, and remove it when ``stack`` stops them; keep the wall-clock
    span of the session (cityflux's own metrics are stamped with it)."""
    path = data_dir / SERVERS_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    servers = Servers(config.mqtt.url, config.influx.url, os.getpid())
    path.write_bytes(msgspec.json.encode(servers))
    session = data_dir / SESSION_FILE
    began = time.time_ns()
    session.write_bytes(msgspec.json.encode(Session(began, 0)))
    stack.callback(lambda: session.write_bytes(msgspec.json.encode(Session(began, time.time_ns()))))
    stack.callback(path.unlink, missing_ok=True)


class Session(msgspec.Struct, frozen=True):
    started_ns: int
    ended_ns: int  # 0 while it runs


class DataRange(msgspec.Struct, frozen=True):
    """The time ranges of a data directory's data: the simulated city's event time, and the
    wall clock of the last session on it (the pipeline's own health points)."""

    sim: tuple[int, int] | None
    wall: tuple[int, int] | None
    scenario: str = ""
    scenario_run: bool = False  # `scenario run` layout: its own database per scenario


def data_range(data_dir: Path) -> DataRange:
    """Read from the newest ground truth the simulators wrote there (the demo's
    ``scenarios/NAME/truth.json``, a scenario run's ``truth.json``) and the session file."""
    truths = [*data_dir.glob("scenarios/*/truth.json"), data_dir / "truth.json"]
    found = sorted((p for p in truths if p.is_file()), key=lambda p: p.stat().st_mtime)
    sim, scenario = None, ""
    if found:
        try:
            truth = msgspec.json.decode(found[-1].read_bytes())
            # the last windows close a minute after the last reading
            sim = (truth["start_ms"] * 1_000_000, (truth["end_ms"] + 60_000) * 1_000_000)
            scenario = str(truth.get("scenario", ""))
        except (msgspec.DecodeError, KeyError, TypeError):
            sim = None
    wall = None
    try:
        session = msgspec.json.decode((data_dir / SESSION_FILE).read_bytes(), type=Session)
        wall = (session.started_ns, session.ended_ns or time.time_ns())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        pass
    run_layout = bool(found) and found[-1] == data_dir / "truth.json"
    return DataRange(sim, wall, scenario, run_layout)


def scenario_database(scenario: str) -> str:
    """The InfluxDB database `scenario run` writes a scenario into (its own InfluxDB)."""
    return f"scenario_{scenario.replace('-', '_')}"


def broker_error(exc: BaseException, url: str) -> str:
    """What went wrong reaching the broker at ``url``, and what to do about it: a refused
    connection names the URL and the command that starts a broker."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, ConnectionRefusedError):
        return (
            f"no MQTT broker at {url} (connection refused). Start one with `cityflux up` "
            "(in another shell; it prints the URL), then pass --mqtt-url URL or "
            "export CITYFLUX_MQTT__URL=URL, or give --data-dir DIR of a running `cityflux up`"
        )
    if isinstance(cause, OSError) and not isinstance(exc, OSError):
        return str(exc)  # an MqttError already says where
    if isinstance(cause, OSError):
        return f"cannot reach the MQTT broker at {url}: {cause}"
    return str(exc)


def redraw_while(
    live: Live, worker: threading.Thread, duration: float, render: Callable[[], RenderableType]
) -> None:
    """Redraw ``live`` twice a second while ``worker`` runs, for at most ``duration`` seconds
    (0: until it ends)."""
    deadline = time.monotonic() + duration if duration else float("inf")
    while worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
        live.update(render())


def progress_bar(percent: bool = True) -> Progress:
    """A bar with counts and rates (a task's ``rate`` field); ``percent`` only when there is a
    total to be a share of (without one the bar pulses instead of standing at 0 %)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *([TextColumn("{task.percentage:>3.0f}%")] if percent else []),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
