"""``cityflux alerts list`` and ``cityflux alerts ack``."""

from __future__ import annotations

import datetime as dt
import sqlite3
import ssl
import threading
import time
import uuid
from typing import Annotated, Any, Final, NoReturn

import msgspec
import paho.mqtt.client as paho
import typer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from rich.table import Table

from cityflux.analytics.alerts import AlertStore
from cityflux.cli.common import ConfigOption, app, console, load_or_exit
from cityflux.config import MqttConfig
from cityflux.errors import CityfluxError, MqttError
from cityflux.mqtt.consumer import apply_credentials

alerts_app = typer.Typer(no_args_is_help=True, help="Alerts: list them, acknowledge them.")
app.add_typer(alerts_app, name="alerts")

# How long `alerts ack` waits for each of the broker's answers (CONNACK, PUBACK).
ACK_TIMEOUT_S: Final = 10.0


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
    """Acknowledge an alert: in the alert database, and over MQTT for a running cityflux.

    Any failure is one line on stderr and exit code 1."""
    loaded = load_or_exit(config)
    try:
        store = AlertStore(loaded.analytics.alerts_db)
        try:
            alert = store.acknowledge(alert_id, by)
        finally:
            store.close()
    except (sqlite3.Error, OSError) as exc:
        _fail(f"alert database {loaded.analytics.alerts_db}: {exc}")
    if alert is None:
        _fail(f"no alert {alert_id}")
    try:
        publish_ack(loaded.mqtt, alert_id, by)
    except CityfluxError as exc:
        _fail(
            f"alert {alert_id} acknowledged in the database but not sent to the broker: {exc} "
            "(the alert database has it; a running cityflux learns it at its next start)"
        )
    console.print(
        f"alert {alert_id} ({alert.rule} {alert.entity}) acknowledged by {by} "
        "and sent to the broker",
        markup=False,
        soft_wrap=True,
    )


def _fail(message: str) -> NoReturn:
    """One line on stderr (no wrapping, no markup: exception texts hold brackets), exit 1."""
    typer.echo(" ".join(message.split()), err=True)
    raise typer.Exit(1)


def publish_ack(mqtt: MqttConfig, alert_id: int, by: str, timeout_s: float = ACK_TIMEOUT_S) -> None:
    """Publish ``{"id", "by"}`` on ``{root}/alerts/ack`` at QoS 1 and wait for the broker's
    PUBACK. TLS for ``mqtts://`` or ``tls.enabled`` before anything is sent, so the password
    never crosses in clear to a TLS URL. Raises MqttError saying what failed."""
    answers: dict[str, ReasonCode] = {}
    done = threading.Event()
    client = _ack_client(mqtt, answers, done)
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=max(5, mqtt.keepalive_s))
    except ssl.SSLCertVerificationError as exc:
        raise MqttError(
            f"TLS: the broker's certificate at {mqtt.host}:{mqtt.port} is not trusted "
            f"({exc.verify_message}); set mqtt.tls.ca_file to the CA that signed it"
        ) from exc
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise MqttError(f"cannot connect to {mqtt.host}:{mqtt.port}: {exc}") from exc
    client.loop_start()
    try:
        _await(done, answers, "connect", timeout_s)
        topic = f"{mqtt.topic_root}/alerts/ack"
        info = client.publish(topic, msgspec.json.encode({"id": alert_id, "by": by}), qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish failed: {paho.error_string(info.rc)}")
        code = _await(done, answers, "puback", timeout_s)
        if code.is_failure:
            raise MqttError(f"the broker refused the publish on {topic}: {code}")
    finally:
        client.disconnect()
        client.loop_stop()


def _ack_client(mqtt: MqttConfig, answers: dict[str, ReasonCode], done: threading.Event) -> Any:
    """A paho client whose callbacks record CONNACK, PUBACK and disconnect in ``answers``."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"cityflux-ack-{uuid.uuid4().hex[:12]}",
        protocol=paho.MQTTv5 if mqtt.protocol == "5" else paho.MQTTv311,
        reconnect_on_failure=False,
    )
    apply_credentials(client, mqtt)

    def answer(key: str, code: ReasonCode) -> None:
        answers.setdefault(key, code)
        done.set()

    client.on_connect = lambda c, u, flags, code, props: answer("connect", code)
    client.on_publish = lambda c, u, mid, code, props: answer("puback", code)
    client.on_disconnect = lambda c, u, flags, code, props: answer("disconnect", code)
    return client


def _await(
    done: threading.Event, answers: dict[str, ReasonCode], key: str, timeout_s: float
) -> ReasonCode:
    """The broker's answer ``key``; MqttError on a refusal, a disconnect or silence."""
    deadline = time.monotonic() + timeout_s
    # the callbacks fill ``answers`` before setting ``done``: re-checking after each wake-up
    # cannot miss an answer that came between two waits
    while key not in answers and "disconnect" not in answers:
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise MqttError(f"no {key} answer from the broker within {timeout_s:g} s")
        done.clear()
    if key not in answers:
        raise MqttError(f"the broker closed the connection ({answers['disconnect']})")
    code = answers[key]
    if key == "connect" and code.is_failure:
        raise MqttError(f"the broker refused the connection: {code}")
    return code
