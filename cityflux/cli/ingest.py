"""``cityflux check-config``, ``run`` and ``up``: the ingest side."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Annotated

import msgspec
import typer
from rich.live import Live
from rich.table import Table

from cityflux.cli.common import (
    ConfigOption,
    app,
    console,
    exit_if_failed,
    load_or_exit,
    local_stack,
    redraw_while,
    setup_logging,
)
from cityflux.config import Config
from cityflux.errors import CityfluxError
from cityflux.pipeline.pipeline import Pipeline

SECRETS = ("password", "token")


def _masked(config: Config) -> object:
    def mask(node: object) -> object:
        if isinstance(node, dict):
            return {k: ("***" if k in SECRETS and v else mask(v)) for k, v in node.items()}
        return node

    return mask(msgspec.to_builtins(config))


@app.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate the configuration and print the effective values (secrets masked)."""
    loaded = load_or_exit(config)
    console.print_json(msgspec.json.encode(_masked(loaded)).decode())
    console.print("[green]configuration is valid[/]")


@app.command()
def run(
    config: ConfigOption = None,
    workers: Annotated[int, typer.Option(help="worker processes sharing the subscription")] = 1,
    worker_index: Annotated[int, typer.Option(hidden=True)] = -1,
    verbose: bool = False,
) -> None:
    """Ingest: MQTT -> validate -> InfluxDB, until SIGINT/SIGTERM."""
    setup_logging(verbose)
    loaded = load_or_exit(config)
    if workers > 1 and worker_index < 0:
        raise typer.Exit(_supervise(config, workers, verbose))
    try:
        pipeline = Pipeline(loaded, max(worker_index, 0), workers)
    except CityfluxError as exc:  # e.g. an unreadable TLS file: one line, not a traceback
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    _run_until_signal(pipeline)


def _run_until_signal(pipeline: Pipeline) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        pipeline.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with pipeline:
            pipeline.wait()
    except CityfluxError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    exit_if_failed(pipeline)


def _supervise(config: Path | None, workers: int, verbose: bool) -> int:
    """Start one process per worker; stop them all on a signal or when one fails, and exit
    with its status: restarting is systemd's or compose's job, for the whole set."""
    base = [sys.executable, "-m", "cityflux", "run", "--workers", str(workers)]
    if config is not None:
        base += ["--config", str(config)]
    if verbose:
        base.append("--verbose")
    children = [subprocess.Popen([*base, "--worker-index", str(i)]) for i in range(workers)]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = _first_failure(children)
    if failed is not None:
        console.print(
            f"[red]worker {failed} exited with status {children[failed].returncode}: "
            "stopping the others[/]"
        )
        for child in children:
            if child.poll() is None:
                child.terminate()
    return max(child.wait() for child in children)


def _first_failure(children: list[subprocess.Popen[bytes]]) -> int | None:
    """Wait until every worker ended (None) or one ended with a non-zero status (its index):
    a worker that gave up must not leave its share of the subscription unserved."""
    while True:
        codes = [child.poll() for child in children]
        for index, code in enumerate(codes):
            if code:
                return index
        if all(code is not None for code in codes):
            return None
        time.sleep(0.2)


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="where the local servers keep data")] = Path(
        "var/local"
    ),
    duration: Annotated[float, typer.Option(help="stop after this many seconds (0: never)")] = 0,
) -> None:
    """Start a local mosquitto and InfluxDB, and ingest from one into the other."""
    setup_logging(False)
    with ExitStack() as stack:
        config = local_stack(stack, data_dir)
        pipeline = stack.enter_context(Pipeline(config, connect_timeout_s=10))
        console.print(
            f"[bold]cityflux is up[/]: broker {config.mqtt.url}, InfluxDB {config.influx.url} "
            f"(database {config.influx.database}), metrics "
            f"http://127.0.0.1:{pipeline.server.port if pipeline.server else 0}/metrics\n"
            f"publish:  mosquitto_pub -p {config.mqtt.port} -q 1 -t "
            'cityflux/v1/centre/pole/pole-1 -m \'{"ts": '
            f'{time.time_ns() // 1_000_000}, "pm25_ugm3": 12.5}}\'\n'
            f"query:    curl -G {config.influx.url}/query --data-urlencode db=cityflux "
            "--data-urlencode 'q=SELECT * FROM pole'"
        )
        _show_status(pipeline, duration)
    exit_if_failed(pipeline)


def _show_status(pipeline: Pipeline, duration: float) -> None:
    """Redraw the counters until Ctrl-C, SIGTERM, ``duration`` or a failure."""
    assert pipeline.runner is not None
    signal.signal(signal.SIGTERM, lambda s, f: pipeline.stop())
    try:
        with Live(_status_table(pipeline), console=console, refresh_per_second=2) as live:
            redraw_while(live, pipeline.runner, duration, lambda: _status_table(pipeline))
    except KeyboardInterrupt:
        pass


def _status_table(pipeline: Pipeline) -> Table:
    values = pipeline.metrics.snapshot()
    table = Table(title="cityflux ingest", show_header=False)
    for key in (
        "messages_received_total",
        "messages_acked_total",
        "lines_written_total",
        "lines_spooled_total",
        "spool_records",
        "database_up",
        "mqtt_connected",
    ):
        table.add_row(key, f"{values.get(key, 0):,.0f}")
    for key, value in sorted(values.items()):
        if key.startswith(("readings_accepted_total.", "rejections_total.")) and value:
            table.add_row(key, f"{value:,.0f}")
    return table
