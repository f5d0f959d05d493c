"""``cityflux doctor``: which settings of the configured broker, database and disk would lose data.

Each finding names the line to change. Exit code 1 if any finding would lose data ("loss"),
0 otherwise (warnings included). What it does to the servers: one MQTT 5 connection that reads
the CONNACK and the ``$SYS`` drop counter; the queue probe (a private persistent session on
``cityflux-doctor/...`` that is sent ``--probe-messages`` QoS 1 messages while offline, then
collected and ended); one point written to and read from the ``cityflux_doctor`` measurement.
On a broker whose queue limit is too small the probe itself makes the broker drop the excess of
its own messages, which a running cityflux reports as ``broker_dropping``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cityflux.cli.common import ConfigOption, app, console, load_or_exit
from cityflux.cli.doctor_broker import check_broker, check_protocol
from cityflux.cli.doctor_checks import Finding, check_database, check_spool
from cityflux.config import Config

STYLE = {"loss": "bold red", "warning": "yellow", "ok": "green", "check": "cyan"}


@app.command()
def doctor(
    config: ConfigOption = None,
    probe: Annotated[bool, typer.Option(help="probe the broker's per-client queue limit")] = True,
    probe_messages: Annotated[
        int, typer.Option(help="messages queued by the probe (mosquitto's default limit: 1000)")
    ] = 1_500,
    probe_topic: Annotated[
        str | None, typer.Option(help="topic of the probe (default cityflux-doctor/<random>)")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="per server answer")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines on stdout")] = False,
) -> None:
    """Check the configured broker, database and spool for settings that would lose data."""
    loaded = load_or_exit(config)
    topic = probe_topic or f"cityflux-doctor/{uuid.uuid4().hex[:12]}"
    findings = diagnose(loaded, probe_messages if probe else 0, topic, timeout_s)
    if as_json:
        for finding in findings:
            typer.echo(json.dumps(asdict(finding)))
    else:
        _print(findings)
    raise typer.Exit(1 if any(f.level == "loss" for f in findings) else 0)


def diagnose(
    config: Config, probe_messages: int, probe_topic: str, timeout_s: float
) -> list[Finding]:
    findings = [check_protocol(config.mqtt)]
    findings += check_broker(config, probe_messages, probe_topic, timeout_s)
    findings += check_database(config, timeout_s)
    findings += check_spool(config)
    return findings


def _print(findings: list[Finding]) -> None:
    table = Table(title="cityflux doctor", show_lines=True)
    for column in ("", "check", "finding", "change"):
        table.add_column(column)
    for f in findings:
        table.add_row(f"[{STYLE[f.level]}]{f.level}[/]", *map(escape, (f.check, f.detail, f.fix)))
    console.print(table)
    losses = sum(f.level == "loss" for f in findings)
    console.print(
        f"[bold red]{losses} setting(s) would lose data[/]"
        if losses
        else "[green]nothing found that would lose data[/]"
    )
