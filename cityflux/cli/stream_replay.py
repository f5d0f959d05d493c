"""``cityflux replay --from-stream``: re-run what the JetStream stream keeps through the pipeline
(decode, validate, analytics, store) into another database, e.g. with changed rules or a
changed map, without touching the live workers (docs/scale.md, "Replay from the stream").

The replay's state is its own: the target database (never the live one), and under
``--state-dir`` its spool, analytics checkpoints and alerts database; its alert changes and
dead letters are not published (:mod:`cityflux.nats.replay`). One analytics engine over the
whole map: the stream holds every partition in the order the readings arrived.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final, NoReturn

import typer
from rich.progress import Progress

from cityflux.cli.common import console, progress_bar
from cityflux.config import Config
from cityflux.errors import CityfluxError, StoreError
from cityflux.nats.replay import ReplaySource
from cityflux.pipeline.pipeline import Pipeline
from cityflux.store.influx import InfluxWriter

_UNITS: Final = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
CONNECT_S: Final = 15.0
SPOOL_DRAIN_S: Final = 60.0


class ReplayRefused(CityfluxError):
    """The replay would write where it must not (the live database, a database with data)."""


def parse_since(text: str) -> float:
    """Seconds from ``2h``, ``90m``, ``1h30m``, ``3600s``, ``1d`` or a plain number."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"--since {text!r}: give a duration like 2h, 90m, 1h30m or 3600s")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    since_s: float
    database: str
    state_dir: Path
    partition: int | None = None
    replace: bool = False
    rules: Path | None = None
    city_map: Path | None = None
    batch_span_s: float | None = None


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    messages: int
    first_seq: int
    last_seq: int
    wall_s: float
    points: int  # written to the database (or still spooled: ``spooled``)
    spooled: int
    accepted: int  # readings
    rejected: int
    alerts: int  # raised during the replay (in its alerts database and its InfluxDB)
    alerts_dropped: int  # alert changes not published
    letters_dropped: int
    resets: int

    @property
    def rate(self) -> float:
        return self.messages / max(self.wall_s, 1e-6)


def target_database(config: Config) -> str:
    return config.influx.bucket if config.influx.api == "v2" else config.influx.database


def replay_config(live: Config, options: ReplayOptions) -> Config:
    """The live configuration pointed at the replay's own database and state."""
    if options.database == target_database(live):
        raise ReplayRefused(
            f"--database {options.database} is the live database: give the replay another one"
        )
    state = options.state_dir
    overrides: dict[str, object] = {
        "influx.bucket" if live.influx.api == "v2" else "influx.database": options.database,
        "spool.dir": str(state / "spool"),
        "analytics.checkpoint_dir": str(state / "analytics"),
        "analytics.alerts_db": str(state / "analytics" / "alerts.sqlite"),
        "metrics.enabled": False,  # no port beside the live worker's
        "metrics.health_interval_s": 0,  # the replay's database holds the replay only
        "mqtt.broker_stats": False,
        # readings were judged against their arrival, not against now
        "ingest.max_past_s": live.ingest.max_past_s + int(options.since_s) + 1,
    }
    if options.rules is not None:
        overrides["analytics.rules_file"] = str(options.rules)
    if options.city_map is not None:
        overrides["analytics.city_map"] = str(options.city_map)
    config = live.with_overrides(overrides)
    for mine, theirs in (
        (config.spool.dir, live.spool.dir),
        (config.analytics.checkpoint_dir, live.analytics.checkpoint_dir),
    ):
        if Path(mine).resolve() == Path(theirs).resolve():
            raise ReplayRefused(f"--state-dir would share {mine} with the live worker")
    return config


def prepare(config: Config, replace: bool) -> None:
    """An empty target database (InfluxDB 1.x: a non-empty one is refused unless ``replace``,
    which drops it) and fresh analytics state: a checkpoint of an earlier replay would start
    this one in the middle. The spool is kept: what it holds belongs to this database."""
    if config.influx.api == "v1":
        writer = InfluxWriter(config.influx)
        try:
            _empty_database(writer, config.influx.database, replace)
        finally:
            writer.close()
    shutil.rmtree(config.analytics.checkpoint_dir, ignore_errors=True)


def _empty_database(writer: InfluxWriter, database: str, replace: bool) -> None:
    try:
        answer = writer.query("SHOW MEASUREMENTS")
    except StoreError as exc:
        if "database not found" in str(exc):
            return
        raise
    series = answer.get("results", [{}])[0].get("series") or []
    if not series:
        return
    if not replace:
        raise ReplayRefused(
            f"database {database} holds data already: pass --replace to drop it first, or "
            "give another --database"
        )
    writer.query(f'DROP DATABASE "{database}"', method="POST")


def run(
    config: Config,
    options: ReplayOptions,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Replay the range into ``config``'s database (from :func:`replay_config`)."""
    prepare(config, options.replace)
    source = ReplaySource(config, options.since_s, options.partition, options.batch_span_s)
    began = time.monotonic()
    task = None
    if progress is not None:
        start = datetime.fromtimestamp(time.time() - options.since_s, UTC)
        what = "the stream" if options.partition is None else f"partition {options.partition}"
        task = progress.add_task(f"replaying {what} since {start:%H:%M:%S}Z", total=None, rate="")
    with Pipeline(config, connect_timeout_s=CONNECT_S, source=source) as pipeline:
        while not source.done() and pipeline.failure is None:
            if progress is not None and task is not None:
                stats = source.stats
                rate = stats.settled / max(time.monotonic() - began, 1e-3)
                progress.update(
                    task,
                    total=max(stats.expected, stats.delivered) or None,
                    completed=stats.settled,
                    rate=f"{stats.settled:,} msgs {rate:,.0f}/s",
                )
            time.sleep(0.1)
        failure = pipeline.failure or source.failure
        if failure is not None:
            raise CityfluxError(f"replay failed: {failure}")
        pipeline.finish_windows()
        _wait_spool(pipeline)
        alerts = len(pipeline.alert_history())
    wall = time.monotonic() - began  # the engine's last windows are written at the close
    if progress is not None and task is not None:
        progress.update(task, total=source.stats.settled, completed=source.stats.settled)
    return _summary(pipeline, source, wall, alerts)


def _wait_spool(pipeline: Pipeline) -> None:
    deadline = time.monotonic() + SPOOL_DRAIN_S
    while pipeline.sink.backlog()[0] and time.monotonic() < deadline:
        time.sleep(0.2)


def _summary(pipeline: Pipeline, source: ReplaySource, wall_s: float, alerts: int) -> ReplaySummary:
    metrics, stats = pipeline.metrics, source.stats
    accepted = sum(
        v for k, v in metrics.snapshot().items() if k.startswith("readings_accepted_total.")
    )
    return ReplaySummary(
        messages=stats.settled,
        first_seq=stats.first_seq,
        last_seq=stats.last_seq,
        wall_s=wall_s,
        points=int(metrics.value("lines_written_total")),
        spooled=pipeline.sink.backlog()[0],
        accepted=int(accepted),
        rejected=int(metrics.rejected_total()),
        alerts=alerts,
        alerts_dropped=stats.alerts_dropped,
        letters_dropped=stats.letters_dropped,
        resets=stats.resets,
    )


def summary_line(summary: ReplaySummary, database: str) -> str:
    """The line the command ends with (tests read it)."""
    seqs = f" (stream {summary.first_seq}..{summary.last_seq})" if summary.messages else ""
    line = (
        f"replayed {summary.messages:,} messages{seqs} in {summary.wall_s:.1f} s "
        f"({summary.rate:,.0f} msg/s) into {database}: {summary.accepted:,} readings, "
        f"{summary.rejected:,} rejected, {summary.points:,} points, {summary.alerts:,} alerts "
        f"({summary.alerts_dropped:,} alert changes and {summary.letters_dropped:,} dead "
        "letters not published)"
    )
    if summary.spooled:
        line += f"; {summary.spooled:,} batches still in the spool (the database is down)"
    return line


# -- the command line (options of `cityflux replay`, cli/simulate.py) ---------------------------
FromStreamOption = Annotated[
    bool,
    typer.Option(
        "--from-stream",
        help="re-run what the NATS JetStream stream keeps through the pipeline (analytics "
        "included) into another database, instead of publishing a recording",
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="--from-stream: from this long ago (2h, 90m, 1h30m; default: nats.max_age_s)"
    ),
]
PartitionOption = Annotated[
    int | None, typer.Option(help="--from-stream: this partition only (default: all)")
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(help="--from-stream: the InfluxDB database (v2: bucket) to write; default: "
                 "the live one's name + _replay; never the live one"),
]  # fmt: skip
ReplaceOption = Annotated[
    bool, typer.Option("--replace", help="--from-stream: drop that database first if it has data")
]
RulesOption = Annotated[
    Path | None, typer.Option(help="--from-stream: alert rules (default: analytics.rules_file)")
]
CityMapOption = Annotated[
    Path | None, typer.Option(help="--from-stream: city map (default: analytics.city_map)")
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(help="--from-stream: the replay's spool, checkpoints and alerts "
                 "(default: var/replay/DATABASE)"),
]  # fmt: skip
BatchSpanOption = Annotated[
    float | None,
    typer.Option(help="--from-stream: seconds of arrival time per batch, as live (default: "
                 "ingest.flush_interval_s; 0: full batches)"),
]  # fmt: skip
NatsUrlOption = Annotated[
    list[str] | None,
    typer.Option("--nats-url", help="--from-stream: a NATS server (repeat; default: nats.urls)"),
]


@dataclass(frozen=True, slots=True)
class StreamArgs:
    from_stream: bool
    since: str | None
    partition: int | None
    database: str | None
    replace: bool
    rules: Path | None
    city_map: Path | None
    state_dir: Path | None
    batch_span: float | None
    nats_url: list[str] | None


def command(recording: Path | None, args: StreamArgs, live: Config) -> None:
    """``cityflux replay --from-stream``: progress while it runs, then one summary line."""
    if recording is not None:
        _exit(f"a recording ({recording}) or --from-stream, not both", 2)
    if not args.from_stream:
        _exit("give a recording (`cityflux record FILE` writes one), or --from-stream", 2)
    try:
        if args.nats_url:
            live = live.with_overrides({"nats.urls": args.nats_url})
        horizon = live.nats.max_age_s
        since_s = parse_since(args.since) if args.since else horizon
        database = args.database or f"{target_database(live)}_replay"
        options = ReplayOptions(
            since_s=since_s,
            database=database,
            state_dir=args.state_dir or Path("var/replay") / database,
            partition=args.partition,
            replace=args.replace,
            rules=args.rules,
            city_map=args.city_map,
            batch_span_s=args.batch_span,
        )
        config = replay_config(live, options)
    except (CityfluxError, ValueError) as exc:
        _exit(str(exc), 2)
    if since_s > horizon:
        console.print(
            f"the stream keeps {horizon / 3600:g} h (nats.max_age_s): replaying from its oldest "
            "message", highlight=False,
        )  # fmt: skip
    try:
        with progress_bar(percent=False) as progress:
            summary = run(config, options, progress)
    except ReplayRefused as exc:
        _exit(str(exc), 2)
    except (CityfluxError, OSError) as exc:
        _exit(str(exc), 1)
    console.print(summary_line(summary, database), soft_wrap=True, highlight=False)
    if summary.spooled:
        raise typer.Exit(1)


def _exit(message: str, code: int) -> NoReturn:
    typer.echo(" ".join(message.split()), err=True)
    raise typer.Exit(code)
