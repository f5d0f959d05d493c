"""What every command shares: the console, logging, and loading the configuration."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.logging import RichHandler

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


def local_stack(
    stack: ExitStack,
    data_dir: Path,
    mqtt_url: str | None = None,
    influx_url: str | None = None,
    config_path: Path | None = None,
) -> Config:
    """The configuration, with a mosquitto and an InfluxDB 1.x started as child processes on
    free loopback ports (data under ``data_dir``) unless their URLs are given; ``stack``
    stops what was started."""
    overrides: dict[str, object] = {
        "spool.dir": str(data_dir / "spool"),
        "analytics.checkpoint_dir": str(data_dir / "analytics"),
        "analytics.alerts_db": str(data_dir / "analytics" / "alerts.sqlite"),
        "metrics.port": 0,  # any free port: 9108 may be taken by a `cityflux run`
    }
    if mqtt_url:
        overrides["mqtt.url"] = mqtt_url
    else:
        overrides["mqtt.url"] = stack.enter_context(LocalMosquitto(data_dir / "mosquitto")).url
    if influx_url:
        overrides["influx.url"] = influx_url
    else:
        overrides["influx.url"] = stack.enter_context(LocalInfluxDB(data_dir / "influxdb")).url
        overrides["influx.api"] = "v1"
    return load_or_exit(config_path).with_overrides(overrides)


def redraw_while(
    live: Live, worker: threading.Thread, duration: float, render: Callable[[], RenderableType]
) -> None:
    """Redraw ``live`` twice a second while ``worker`` runs, for at most ``duration`` seconds
    (0: until it ends)."""
    deadline = time.monotonic() + duration if duration else float("inf")
    while worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
        live.update(render())
