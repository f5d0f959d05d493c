"""``cityflux alerts list`` and ``cityflux alerts ack``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec
import paho.mqtt.client as paho
import typer
from paho.mqtt.enums import CallbackAPIVersion
from rich.table import Table

from cityflux.analytics.alerts import AlertStore
from cityflux.cli.common import ConfigOption, app, console, load_or_exit

alerts_app = typer.Typer(no_args_is_help=True, help="Alerts: list them, acknowledge them.")
app.add_typer(alerts_app, name="alerts")


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ns else ""


@alerts_app.command("list")
def list_alerts(
    state: Annotated[str, typer.Option(help="active, cleared or all")] = "active",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    config: ConfigOption = None,
) -> None:
    """Alerts from the alert database (analytics.alerts_db)."""
    loaded = load_or_exit(config)
    store = AlertStore(loaded.analytics.alerts_db)
    alerts = store.select() if state == "all" else store.select("state=?", (state,))
    store.close()
    if as_json:
        for alert in alerts:
            typer.echo(msgspec.json.encode(alert).decode())
        return
    table = Table(title=f"{len(alerts)} {state} alerts")
    for column in ("id", "severity", "rule", "entity", "district", "state", "ack", "since",
                   "value", "message"):  # fmt: skip
        table.add_column(column)
    for a in alerts:
        table.add_row(
            str(a.id), a.severity, a.rule, a.entity, a.district, a.state,
            "yes" if a.acknowledged else "", _when(a.started_ns), f"{a.value:g}", a.message,
        )  # fmt: skip
    console.print(table)


@alerts_app.command("ack")
def ack(
    alert_id: Annotated[int, typer.Argument(help="the alert's id (from `alerts list`)")],
    by: Annotated[str, typer.Option(help="who acknowledges")] = "operator",
    config: ConfigOption = None,
) -> None:
    """Acknowledge an alert: in the alert database, and over MQTT for a running cityflux."""
    loaded = load_or_exit(config)
    store = AlertStore(loaded.analytics.alerts_db)
    alert = store.acknowledge(alert_id, by)
    store.close()
    if alert is None:
        console.print(f"[red]no alert {alert_id}[/]")
        raise typer.Exit(1)
    mqtt = loaded.mqtt
    client = paho.Client(CallbackAPIVersion.VERSION2)
    if mqtt.username:
        client.username_pw_set(mqtt.username, mqtt.password)
    try:
        client.connect(mqtt.host, mqtt.port)
        client.loop_start()
        info = client.publish(
            f"{mqtt.topic_root}/alerts/ack", msgspec.json.encode({"id": alert_id, "by": by}), qos=1
        )
        info.wait_for_publish(5)
        client.disconnect()
        client.loop_stop()
        sent = "and sent to the broker"
    except OSError as exc:
        sent = f"(broker unreachable: {exc}; a running cityflux picks it up from the database "
        sent += "when the alert next changes)"
    console.print(f"alert {alert_id} ({alert.rule} {alert.entity}) acknowledged by {by} {sent}")
