"""The broker's own counters ($SYS), so that messages the broker drops do not go unseen.

A broker whose queue limits are too small for a backlog (mosquitto's defaults hold 1,000 QoS 1
messages per client) discards the rest and tells no client. mosquitto does count them, in
``$SYS/broker/publish/messages/dropped`` (since the broker started), and publishes its counters
retained every ``sys_interval`` seconds. :class:`BrokerWatcher` subscribes to them with its own
paho client, exports them in ``/metrics`` and, when the dropped counter rises, logs an error and
raises the operator alert ``broker_dropping`` (critical, entity: the broker's URL): stored in
the alert database (``cityflux alerts list``/``ack``) and published retained on the alerts topic
like the analytics' alerts. It clears after ``mqtt.broker_drop_clear_s`` without new drops.

A broker whose ACL denies ``$SYS`` to our account (mosquitto 2.0 grants the subscription and
then delivers nothing) is said once in the log and in ``/healthz``; ingest carries on.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, ParamSpec

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cityflux.analytics.alerts import Alert, AlertStore
from cityflux.config import MqttConfig
from cityflux.mqtt.consumer import apply_credentials, paho_network_loop
from cityflux.observability import Metrics
from cityflux.supervisor import Spawn

log = logging.getLogger(__name__)
P = ParamSpec("P")

RULE: Final = "broker_dropping"
DROPPED: Final = "$SYS/broker/publish/messages/dropped"
# $SYS topic -> key of Metrics.broker. What mosquitto 2.0 publishes that bears on loss: the
# dropped counter and its 1-minute rate, the store (messages held for clients), clients.
SYS_TOPICS: Final = {
    DROPPED: "messages_dropped",
    "$SYS/broker/load/publish/dropped/1min": "messages_dropped_per_min",
    "$SYS/broker/store/messages/count": "store_messages",
    "$SYS/broker/store/messages/bytes": "store_bytes",
    "$SYS/broker/clients/connected": "clients_connected",
    "$SYS/broker/uptime": "uptime_seconds",  # "1234 seconds"
}
DENIED_HINT: Final = (
    "grant it with `topic read $SYS/#` in the broker's ACL (docs/deploy.md); "
    "broker drops cannot be seen until then"
)


class BrokerWatcher:
    """Subscribes to the broker's $SYS counters; ``start``/``stop``; ``health`` for /healthz."""

    def __init__(
        self,
        config: MqttConfig,
        metrics: Metrics,
        alerts_db: str | Path,
        *,
        clear_after_s: float | None = None,
        silence_s: float = 10.0,
        on_alert: Callable[[Alert], object] | None = None,
    ) -> None:
        self.config = config
        # also written to InfluxDB (cityflux_alert) by the pipeline, so that Grafana's alert
        # panels show the broker's drops beside every other alert
        self.on_alert = on_alert
        self.metrics = metrics
        self.clear_after_s = config.broker_drop_clear_s if clear_after_s is None else clear_after_s
        # $SYS values are retained: a permitted subscription gets them at once, so silence
        # this long after the SUBACK means the ACL (or sys_interval 0) withholds them
        self.silence_s = silence_s
        self.entity = config.url
        self.alert_topic = f"{config.topic_root}/alerts/-/{RULE}/{config.host}:{config.port}"
        self.state = "connecting"
        self.dropped: int | None = None
        self.last_error = ""  # the last failure of this watcher, for /healthz
        self._alerts_db = alerts_db
        self._store: AlertStore | None = None
        self._alert: Alert | None = None
        self._baseline = 0  # dropped count already reported (survives restarts via the store)
        self._last_drop = 0.0
        self._heard = False
        self._said_denied = False
        self._timer: threading.Timer | None = None
        self._thread: threading.Thread | None = None  # when supervised
        self._client = self._make_client()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, spawn: Spawn | None = None) -> None:
        """Load the last alert state, then connect in the background (retrying forever);
        ``spawn`` runs paho's network loop under the caller's supervisor."""
        self._store = AlertStore(self._alerts_db)
        previous = self._store.select("rule=? AND entity=?", (RULE, self.entity))
        if previous:
            last = previous[-1]
            self._baseline = int(last.value)
            self._alert = last if last.state == "active" else None
            self._last_drop = time.monotonic()  # an active alert gets a full quiet period
        self._set_dropping()
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        if spawn is None:
            self._client.loop_start()
        else:
            self._thread = spawn("broker-stats", paho_network_loop(self._client))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._client.disconnect()
        if self._thread is None:
            self._client.loop_stop()
        else:
            self._thread.join(timeout=5)
        if self._store is not None:
            self._store.close()
            self._store = None

    def health(self) -> dict[str, Any]:
        """Extra keys for /healthz; none of them makes cityflux unhealthy (ingest goes on)."""
        return {
            "broker_stats": self.state,
            "broker_messages_dropped": self.dropped,
            "broker_dropping": self._alert is not None,
            "broker_stats_errors": int(self.metrics.value("broker_stats_errors_total")),
            "broker_stats_last_error": self.last_error,
        }

    # -- paho callbacks (its network thread) --------------------------------------------------
    def _make_client(self) -> paho.Client:
        c = self.config
        v5 = c.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{c.client_id}-sys",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.reconnect_delay_set(1, max(1, round(c.reconnect_max_s)))
        apply_credentials(client, c)
        client.on_connect = self._guarded(self._on_connect)
        client.on_subscribe = self._guarded(self._on_subscribe)
        client.on_message = self._guarded(self._on_message)
        client.on_disconnect = self._guarded(self._on_disconnect)
        return client

    def _guarded(self, callback: Callable[P, None]) -> Callable[P, None]:
        """An exception in a paho callback would end paho's thread: log and count it instead."""

        @functools.wraps(callback)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                callback(*args, **kwargs)
            except Exception as exc:
                log.exception("broker $SYS watcher: %s failed", callback.__name__)
                self._failed(f"{callback.__name__}: {exc!r}")

        return run

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, code: Any, _p: Any) -> None:
        if code.is_failure:
            self.state = f"refused: {code}"
            self._failed(self.state)
            return
        self._heard = False
        client.subscribe([(topic, 0) for topic in SYS_TOPICS])

    def _failed(self, what: str) -> None:
        self.last_error = what
        self.metrics.broker_stats_errors.inc()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        if all(code.is_failure for code in codes):
            self._denied("refused the subscription")
            return
        self.state = "waiting"
        self._timer = threading.Timer(self.silence_s, self._check_silence)
        self._timer.daemon = True
        self._timer.start()

    def _check_silence(self) -> None:
        if not self._heard and self._client.is_connected():
            self._denied(f"sent nothing within {self.silence_s:.0f}s of subscribing")

    def _denied(self, what: str) -> None:
        self.state = "denied"
        self.metrics.broker["stats_up"].set(0)
        if not self._said_denied:  # once: a permanent condition, not a stream of errors
            self._said_denied = True
            log.warning("the broker's $SYS counters (%s) %s: %s", self.entity, what, DENIED_HINT)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _code: Any, _p: Any) -> None:
        if not self.state.startswith(("denied", "refused")):  # keep the reason in /healthz
            self.state = "disconnected"
        self.metrics.broker["stats_up"].set(0)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self._heard = True
        self.state = "ok"
        self.metrics.broker["stats_up"].set(1)
        key = SYS_TOPICS.get(message.topic)
        if key is not None:
            value = float(message.payload.split()[0])  # "1234" or "1234 seconds"
            self.metrics.broker[key].set(value)
            if message.topic == DROPPED:
                self._on_dropped(int(value))
        self._maybe_clear()

    # -- the alert ------------------------------------------------------------------------
    def _on_dropped(self, total: int) -> None:
        self.dropped = total
        if total < self._baseline:  # the counter restarted with the broker
            self._baseline = 0
        new = total - self._baseline
        if new <= 0:
            return
        self._baseline = total
        self._last_drop = time.monotonic()
        log.error(
            "the broker %s dropped %d messages (%d since it started): its queue limits are "
            "too small (max_queued_messages, max_queued_bytes; max_inflight_messages for MQTT "
            "3.1.1 clients): see docs/deploy.md and run `cityflux doctor`",
            self.entity,
            new,
            total,
        )
        now = time.time_ns()
        message = f"broker dropped {new} messages ({total} since it started)"
        alert = self._alert
        if alert is None:
            alert = Alert(
                rule=RULE, entity=self.entity, district="", severity="critical",
                value=total, message=message, started_ns=now, updated_ns=now,
            )  # fmt: skip
        else:
            alert.value, alert.message, alert.updated_ns = total, message, now
            alert.count += 1
        self._alert = alert
        self._publish(alert)

    def _maybe_clear(self) -> None:
        alert = self._alert
        if alert is None or time.monotonic() - self._last_drop < self.clear_after_s:
            return
        now = time.time_ns()
        alert.state, alert.cleared_ns, alert.updated_ns = "cleared", now, now
        self._alert = None
        log.info("broker %s: no new drops for %.0fs; %s cleared", self.entity,
                 self.clear_after_s, RULE)  # fmt: skip
        self._publish(alert)

    def _publish(self, alert: Alert) -> None:
        """Stored first (it survives a restart), then published retained like analytics'."""
        self._set_dropping()
        if self._store is not None:
            self._store.save([alert])
        self._client.publish(self.alert_topic, msgspec.json.encode(alert), qos=1, retain=True)
        if self.on_alert is not None:
            self.on_alert(alert)

    def _set_dropping(self) -> None:
        self.metrics.broker["dropping"].set(0 if self._alert is None else 1)
