"""``cityflux check-config``, ``run`` and ``up``: the ingest side."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from multiprocessing.process import BaseProcess
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
        raise typer.Exit(_supervise(loaded, workers))
    _run_worker(loaded, max(worker_index, 0), workers)


def _run_worker(config: Config, worker: int, workers: int) -> None:
    try:
        pipeline = Pipeline(config, worker, workers)
    except CityfluxError as exc:  # e.g. an unreadable TLS file: one line, not a traceback
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    _run_until_signal(pipeline)


def _forked_worker(config: Config, worker: int, workers: int) -> None:
    """A worker process's body: outside typer's own handling, its Exit must become the
    process's exit status."""
    try:
        _run_worker(config, worker, workers)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


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


def _supervise(config: Config, workers: int) -> int:
    """Fork one process per worker; stop them all on a signal or when one fails, and exit
    with its status: restarting is systemd's or compose's job, for the whole set.

    Forked, not started as new interpreters: this process has done the start-up once (the
    imports, ~0.4 CPU-s, and the configuration) and each worker begins from it in
    milliseconds, its pages shared copy-on-write (docs/performance.md, "Workers"). No thread
    of ours runs yet, so forking is safe; each worker builds its own pipeline (sockets,
    threads) after the fork."""
    context = multiprocessing.get_context("fork")
    # numpy.unique (the readings count of every batch) imports numpy.ma on its first call:
    # here once, not in each worker's first batch (py-spy, bench/scale)
    import numpy.ma  # noqa: F401

    # start-up's objects out of the collector's sight: the workers' collections then do not
    # write to (and so copy) the pages they share with this process
    gc.freeze()
    children = [
        context.Process(
            target=_forked_worker, args=(config, i, workers), name=f"cityflux-worker-{i}"
        )
        for i in range(workers)
    ]
    for child in children:
        child.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = _first_failure(children)
    if failed is not None:
        console.print(
            f"[red]worker {failed} exited with status {children[failed].exitcode}: "
            "stopping the others[/]"
        )
        for child in children:
            if child.exitcode is None:
                child.terminate()
    for child in children:
        child.join()
    return max(child.exitcode or 0 for child in children)


def _first_failure(children: Sequence[BaseProcess]) -> int | None:
    """Wait until every worker ended (None) or one ended with a non-zero status (its index):
    a worker that gave up must not leave its share of the subscription unserved."""
    while True:
        codes = [child.exitcode for child in children]
        for index, code in enumerate(codes):
            if code:
                return index
        if all(code is not None for code in codes):
            return None
        time.sleep(0.2)


@app.command()
def up(
    data_dir: Annotated[
        Path,
        typer.Option(
            envvar="CITYFLUX_DATA_DIR",
            help="where the local servers and cityflux keep data; a demo's (var/demo) "
            "continues its city (its city-map.json)",
        ),
    ] = Path("var/local"),
    duration: Annotated[float, typer.Option(help="stop after this many seconds (0: never)")] = 0,
    config: ConfigOption = None,
) -> None:
    """Start a local mosquitto and InfluxDB, and ingest from one into the other."""
    setup_logging(False)
    with ExitStack() as stack:
        try:
            loaded = local_stack(stack, data_dir, config_path=config)
            pipeline = stack.enter_context(Pipeline(loaded, connect_timeout_s=10))
        except CityfluxError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
        _print_how_to_use(loaded, pipeline, data_dir)
        _show_status(pipeline, duration)
    exit_if_failed(pipeline)


def _print_how_to_use(config: Config, pipeline: Pipeline, data_dir: Path) -> None:
    """One command per line, continued with backslashes: copy-paste survives any width."""
    metrics = f"http://127.0.0.1:{pipeline.server.port if pipeline.server else 0}/metrics"
    now_ms = time.time_ns() // 1_000_000
    reading = f'{{"ts": {now_ms}, "pm25_ugm3": 12.5}}'
    lines = [
        f"cityflux is up: broker {config.mqtt.url}",
        f"  InfluxDB {config.influx.url} (database {config.influx.database})",
        f"  metrics {metrics}",
        f"  data in {data_dir}, city map {config.analytics.city_map}",
        "In another shell, the other commands find these servers with:",
        f"  export CITYFLUX_DATA_DIR={data_dir.resolve()}",
        "or:",
        f"  export CITYFLUX_MQTT__URL={config.mqtt.url}",
        f"  export CITYFLUX_INFLUX__URL={config.influx.url}",
        "Publish a reading:",
        f"  mosquitto_pub -p {config.mqtt.port} -q 1 \\",
        "    -t cityflux/v1/centre/pole/pole-1 \\",
        f"    -m '{reading}'",
        "Read it back:",
        f"  curl -G {config.influx.url}/query \\",
        f"    --data-urlencode db={config.influx.database} \\",
        "    --data-urlencode 'q=SELECT * FROM pole'",
    ]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


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
