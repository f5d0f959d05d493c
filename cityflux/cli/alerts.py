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
from rich import box
from rich.table import Table
from rich.text import Text

from cityflux.analytics.alerts import Ack, Alert, AlertStorage, AlertStore
from cityflux.cli.common import ConfigOption, DataDirOption, app, console, load_with_data_dir
from cityflux.config import Config, MqttConfig
from cityflux.errors import CityfluxError, MqttError
from cityflux.mqtt.consumer import apply_credentials

alerts_app = typer.Typer(no_args_is_help=True, help="Alerts: list them, acknowledge them.")
app.add_typer(alerts_app, name="alerts")

# How long `alerts ack` waits for each of the broker's answers (CONNACK, PUBACK).
ACK_TIMEOUT_S: Final = 10.0


def _when(ns: int, short: bool = False) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime(
        "%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%SZ"
    )


@alerts_app.command("list")
def list_alerts(
    state: Annotated[str, typer.Option(help="active, cleared or all")] = "active",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Alerts from the alert database (DATA_DIR/analytics/alerts.sqlite, or analytics.alerts_db);
    with source.kind = "nats", from the alerts bucket all the workers share."""
    if state not in ("active", "cleared", "all"):
        _fail(f"--state {state}: expected active, cleared or all", code=2)
    loaded = load_with_data_dir(config, data_dir)
    store: AlertStorage | None
    if loaded.source.kind == "nats":
        store, path = _bucket_store(loaded), f"NATS bucket {loaded.nats.alerts_bucket}"
    else:
        path = loaded.analytics.alerts_db
        store = AlertStore.open_existing(path)
    if store is None:  # reading creates nothing
        console.print(f"no alert database at {path}" + ("" if data_dir else _where_hint()))
        return
    try:
        alerts = store.select() if state == "all" else store.with_state(state)
    except CityfluxError as exc:
        _fail(f"{path}: {exc}")
    finally:
        store.close()
    if as_json:
        for alert in alerts:
            typer.echo(msgspec.json.encode(alert).decode())
        return
    console.print(_table(alerts, f"{len(alerts)} {state} alerts in {path}", state == "all"))


def _bucket_store(loaded: Config) -> AlertStorage:
    """The alerts bucket of a city on NATS (docs/analytics.md, "Alerts across workers")."""
    from cityflux.nats.alerts import KvAlertStore  # nats-py: only for a city on NATS

    try:
        return KvAlertStore.open(loaded.nats, "cityflux-alerts-cli", timeout_s=ACK_TIMEOUT_S)
    except CityfluxError as exc:
        _fail(str(exc))


def _where_hint() -> str:
    return " (the demo's alerts: `cityflux alerts list --data-dir var/demo`)"


def _table(alerts: list[Alert], title: str, show_state: bool = True) -> Table:
    """Fits the terminal, 80 columns too: no header is cut. Narrow, each alert's value,
    message and acknowledgement go on a line under its rule; wide, in columns of their own."""
    wide = console.width >= 120
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=0,
                  pad_edge=False, show_edge=False)  # fmt: skip
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    # rule names (25 characters at most) and entities (17) stay whole: a message wraps
    table.add_column("rule" if wide else "rule, message", min_width=25)
    table.add_column("entity", overflow="fold", max_width=None if wide else 17)
    if wide:
        table.add_column("district", no_wrap=True)
    if show_state:
        table.add_column("state", no_wrap=True)
    if wide:
        table.add_column("acked by", no_wrap=True)
    table.add_column("since (UTC)", no_wrap=True)
    if wide:
        table.add_column("value: message", overflow="fold")
    for a in alerts:
        acked = a.acknowledged_by if a.acknowledged else ""
        detail = f"{a.value:g}: {a.message}"
        if wide:
            rule = Text(a.rule)
        else:
            detail += f" (acked by {acked})" if acked else ""
            rule = Text.assemble(a.rule, "\n", (detail, "dim"))
        cells: list[str | Text] = [str(a.id), a.severity, rule, a.entity]
        cells += [a.district] if wide else []
        cells += [a.state] if show_state else []
        cells += [acked] if wide else []
        cells += [_when(a.started_ns, short=True)]
        cells += [Text(detail)] if wide else []
        table.add_row(*cells)
    return table


@alerts_app.command("ack")
def ack(
    alert_id: Annotated[int, typer.Argument(help="the alert's id (from `alerts list`)")],
    by: Annotated[str, typer.Option(help="who acknowledges")] = "operator",
    force: Annotated[
        bool, typer.Option(help="acknowledge it again although another operator did")
    ] = False,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Acknowledge an alert: in the alert database, and over MQTT for a running cityflux.

    An alert another operator acknowledged is refused (exit 1) unless --force; both
    acknowledgements are kept. An alert that already cleared is acknowledged for the record,
    and the message says it cleared. Any failure is one line on stderr and exit code 1.
    With source.kind = "nats", the acknowledgement goes to the alerts bucket the workers share
    (nothing is sent over MQTT: the workers read it there)."""
    loaded = load_with_data_dir(config, data_dir)
    if loaded.source.kind == "nats":
        _ack_in_bucket(loaded, alert_id, by, force)
        return
    path = loaded.analytics.alerts_db
    try:
        store = AlertStore.open_existing(path)
        if store is None:
            _fail(f"no alert database at {path}: no alert {alert_id} to acknowledge")
        try:
            result = store.acknowledge(alert_id, by, force)
        finally:
            store.close()
    except (sqlite3.Error, OSError) as exc:
        _fail(f"alert database {path}: {exc}")
    alert = result.alert
    if alert is None:
        _fail(f"no alert {alert_id} in {path}")
    name = f"alert {alert_id} ({alert.rule} {alert.entity})"
    if result.status == "refused":
        _fail(_refused(name, result, by))
    cleared = _cleared(alert)
    done = (
        f"was already acknowledged by {by} at {_when(result.previous_ns)}"
        if result.status == "already"
        else "acknowledged"
    )
    # sent again when it was already acknowledged: a retry after the broker was unreachable
    try:
        publish_ack(loaded.mqtt, alert_id, by, force=force)
    except CityfluxError as exc:
        _fail(
            f"{name} {done} in the database but not sent to the broker: {exc} "
            f"(the alert database has it; a running cityflux learns it at its next start){cleared}"
        )
    if result.status == "already":
        _say(f"{name} {done}; sent to the broker again{cleared}")
        return
    over = f" (over {result.previous_by}'s, with --force)" if result.previous_by else ""
    _say(f"{name} acknowledged by {by}{over} and sent to the broker{cleared}")


def _ack_in_bucket(loaded: Config, alert_id: int, by: str, force: bool) -> None:
    """`alerts ack` for a city on NATS: one compare-and-set in the alerts bucket."""
    where = f"NATS bucket {loaded.nats.alerts_bucket}"
    store = _bucket_store(loaded)
    try:
        result = store.acknowledge(alert_id, by, force)
    except CityfluxError as exc:
        _fail(f"{where}: {exc}")
    finally:
        store.close()
    alert = result.alert
    if alert is None:
        _fail(f"no alert {alert_id} in {where}")
    name = f"alert {alert_id} ({alert.rule} {alert.entity})"
    if result.status == "refused":
        _fail(_refused(name, result, by))
    if result.status == "already":
        _say(f"{name} was already acknowledged by {by} at {_when(result.previous_ns)}"
             f"{_cleared(alert)}")  # fmt: skip
        return
    over = f" (over {result.previous_by}'s, with --force)" if result.previous_by else ""
    _say(f"{name} acknowledged by {by}{over} in the {where}{_cleared(alert)}")


def _refused(name: str, result: Ack, by: str) -> str:
    return (
        f"{name} was acknowledged by {result.previous_by} at {_when(result.previous_ns)}; "
        f"not acknowledged by {by} (add --force to acknowledge it too: both are recorded)"
    )


def _cleared(alert: Alert) -> str:
    return (
        f"; it had already cleared at {_when(alert.cleared_ns)}, acknowledged for the record"
        if alert.state == "cleared"
        else ""
    )


def _say(message: str) -> None:
    console.print(message, markup=False, soft_wrap=True, highlight=False)


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr (no wrapping, no markup: exception texts hold brackets), exit 1."""
    typer.echo(" ".join(message.split()), err=True)
    raise typer.Exit(code)


def publish_ack(
    mqtt: MqttConfig, alert_id: int, by: str, timeout_s: float = ACK_TIMEOUT_S, force: bool = False
) -> None:
    """Publish ``{"id", "by", "force"}`` on ``{root}/alerts/ack`` at QoS 1 and wait for the broker's
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
        message: dict[str, object] = {"id": alert_id, "by": by}
        if force:  # only then: the message stays what older cityflux versions decode
            message["force"] = True
        payload = msgspec.json.encode(message)
        info = client.publish(topic, payload, qos=1)
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
