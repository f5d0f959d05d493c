"""``cityflux nats init`` and ``cityflux nats status``: the JetStream side of a city on NATS
(docs/scale.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, NoReturn

import msgspec
import typer
from rich import box
from rich.table import Table

from cityflux.cli.common import ConfigOption, app, console, load_or_exit
from cityflux.config import Config
from cityflux.errors import CityfluxError, NatsError
from cityflux.nats.admin import InitReport, PartitionsChanged, init
from cityflux.nats.status import StatusReport, status

nats_app = typer.Typer(
    no_args_is_help=True, help="NATS JetStream: set up the stream and consumers, show them."
)
app.add_typer(nats_app, name="nats")

UrlOption = Annotated[
    list[str] | None,
    typer.Option("--url", help="a NATS server URL (repeat for a cluster); default: nats.urls"),
]
WaitOption = Annotated[
    float, typer.Option("--wait", help="seconds to keep trying to reach a server")
]


def _config(path: ConfigOption, urls: list[str] | None) -> Config:
    loaded = load_or_exit(path)
    if not urls:
        return loaded
    try:
        return loaded.with_overrides({"nats.urls": urls})
    except CityfluxError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr (no markup: server texts hold brackets)."""
    typer.echo(" ".join(message.split()), err=True)
    raise typer.Exit(code)


def _quiet() -> None:
    # the connection's own warnings repeat what the error below says
    logging.getLogger("cityflux.nats.connect").setLevel(logging.ERROR)


def _unreachable(exc: NatsError) -> str:
    text = str(exc)
    if "cannot reach" in text or "cannot connect" in text:
        return (
            f"{text}. Start nats-server with JetStream enabled (docs/scale.md), then pass "
            "--url nats://HOST:4222 (repeat it for each node) or set nats.urls in the "
            "configuration file."
        )
    return text


@nats_app.command("init")
def init_command(
    force: Annotated[
        bool, typer.Option("--force", help="remap districts to a changed partition count")
    ] = False,
    url: UrlOption = None,
    wait: WaitOption = 5.0,
    config: ConfigOption = None,
) -> None:
    """Create or update the stream, its partition consumers and the buckets.

    The readings stream is sourced from $MQTT_msgs and partitioned by district; each
    partition has a pinned pull consumer. Idempotent: a second run changes nothing and says so.
    """
    loaded = _config(config, url)
    _quiet()
    try:
        report = asyncio.run(init(loaded, force=force, wait_s=wait))
    except PartitionsChanged as exc:
        _fail(str(exc))
    except NatsError as exc:
        _fail(_unreachable(exc))
    _print_init(report)


def _print_init(report: InitReport) -> None:
    changed = [c for c in report.changes if c.action != "unchanged"]
    for change in changed:
        detail = f" ({change.detail})" if change.detail else ""
        console.print(f"{change.action:>9} {change.kind} {change.name}{detail}", markup=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    if not changed:
        console.print(f"unchanged: all {len(report.changes)} objects already as configured")
    else:
        left = len(report.changes) - len(changed)
        console.print(f"{len(changed)} changed, {left} already as configured")


@nats_app.command("status")
def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    url: UrlOption = None,
    wait: WaitOption = 5.0,
    config: ConfigOption = None,
) -> None:
    """The stream, each partition's consumer and owner, the live workers."""
    loaded = _config(config, url)
    _quiet()
    try:
        report = asyncio.run(status(loaded, wait_s=wait))
    except NatsError as exc:
        _fail(_unreachable(exc))
    if as_json:
        typer.echo(msgspec.json.encode(report).decode())
        return
    _print_status(report)


def _print_status(report: StatusReport) -> None:
    s = report.stream
    where = f", leader {s.leader}" if s.leader else ""
    console.print(
        f"stream {s.name}: {s.messages} messages, {s.bytes} bytes, R{s.replicas}{where}; "
        f"first {s.first_ts or '-'}, last {s.last_ts or '-'}; "
        f"{s.source_pending} waiting in $MQTT_msgs",
        markup=False,
        soft_wrap=True,
    )
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for column in ("partition", "pending", "ack pending", "redelivered", "last seq"):
        table.add_column(column, justify="right")
    table.add_column("pinned owner")
    for p in report.partitions:
        if not p.exists:
            table.add_row(str(p.partition), "missing: run `cityflux nats init`", "", "", "", "")
            continue
        row = (p.pending, p.ack_pending, p.redelivered, p.last_delivered)
        table.add_row(str(p.partition), *map(str, row), p.pinned or "-")
    console.print(table)
    names = ", ".join(m.key for m in report.members) or "none"
    console.print(f"{len(report.members)} live workers: {names}", markup=False, soft_wrap=True)
