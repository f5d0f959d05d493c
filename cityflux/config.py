"""Configuration: one typed, frozen tree, from a TOML file plus ``CITYFLUX_*`` variables.

Precedence, lowest first: the defaults below (they work against local servers), the TOML file
(``--config`` or ``CITYFLUX_CONFIG``), then environment variables named
``CITYFLUX_<SECTION>__<KEY>`` (double underscore between levels), e.g.
``CITYFLUX_INFLUX__URL=http://db:8086``. Everything is validated at start; an error names the
offending key.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_origin
from urllib.parse import urlsplit

import msgspec

from cityflux.errors import ConfigError

ENV_PREFIX = "CITYFLUX_"
log = logging.getLogger(__name__)
# bytes of an MQTT packet around its payload we allow for: fixed header, topic, packet id and
# MQTT 5 properties (cityflux topics are under 200 bytes)
MQTT_PACKET_MARGIN = 4_096


class Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Frozen, keyword-only, and unknown keys are errors (a typo must not be ignored)."""


class TlsConfig(Base, frozen=True):
    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip hostname verification: test rigs only


class MqttConfig(Base, frozen=True):
    url: str = "mqtt://127.0.0.1:1883"
    # 5: our Receive Maximum decides what the broker may have in flight to us. 3.1.1: the
    # broker's max_inflight_messages/max_queued_messages do, and their defaults drop bursts.
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = "cityflux"
    username: str | None = None
    password: str | None = None
    tls: TlsConfig = TlsConfig()
    keepalive_s: int = 30
    topic_root: str = "cityflux/v1"
    # Several `cityflux run --workers N` processes split the load through this shared group.
    shared_group: str = "cityflux"
    # MQTT 5: how long the broker keeps our session (and queues for it) while we are away.
    session_expiry_s: int = 7 * 24 * 3600
    # Unacknowledged QoS 1 messages the broker may have in flight to us (MQTT 5 Receive Maximum;
    # for 3.1.1 the broker's max_inflight_messages sets it). Bounds our memory under back-pressure.
    receive_maximum: int = 50_000
    # The largest packet (header, topic and payload) we buffer. A bigger PUBLISH is read
    # through (its first 80 KiB kept) and dead-lettered too_large; any other packet is a
    # protocol error that reconnects. Keep the broker's max_packet_size equal.
    max_packet_size: int = 1_048_576
    # MQTT 5: also send it as Maximum Packet Size. The broker then drops bigger messages for
    # us, and mosquitto 2.0 counts no such drop anywhere (docs/operations.md): off by default.
    send_max_packet_size: bool = False
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Watch the broker's own counters ($SYS, mosquitto): export them, alert when it drops.
    broker_stats: bool = True
    broker_drop_clear_s: float = 600.0  # broker_dropping clears after this long without drops

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)


class SourceConfig(Base, frozen=True):
    # where readings come from: "mqtt" (one broker, mqtt.*) or "nats" (JetStream, partitioned
    # by district, nats.*; docs/scale.md). The MQTT settings still name the topic root.
    kind: Literal["mqtt", "nats"] = "mqtt"


class NatsConfig(Base, frozen=True):
    """The JetStream source (docs/scale.md): devices publish MQTT to nats-server; the server
    files each reading under a partition of its district; each worker owns some partitions."""

    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    creds_file: str | None = None  # a NATS credentials file (JWT + nkey), instead of a password
    tls: TlsConfig = TlsConfig()
    stream: str = "CITYFLUX"  # the readings, partitioned
    subject_root: str = "cityflux.p"  # {root}.{partition}.{district}.{kind}.{device}[.status]
    partitions: int = 16  # fixed once the stream exists: districts are hashed into them
    replicas: int = 1  # 3 on a three-node cluster
    max_age_s: float = 7 * 24 * 3600.0  # how far back `replay --from-stream` reaches
    max_bytes: int = -1  # -1: bounded by age only (a size limit would drop unread readings)
    max_msg_size: int = 1_048_576
    duplicate_window_s: float = 120.0
    group: str = "cityflux"  # consumer names {group}-p{n} and their priority group
    pin_timeout_s: float = 10.0  # a silent owner loses its partitions after this long
    fetch_expires_s: float = 1.0  # one pull request's life (well below pin_timeout_s)
    ack_wait_s: float = 60.0  # unacknowledged this long: redelivered
    max_deliver: int = 5  # delivered this often without an ack: dead-lettered (poison)
    max_ack_pending: int = 50_000  # per partition
    heartbeat_s: float = 2.0  # workers' membership heartbeat; gone after 3 missed
    members_bucket: str = "cityflux_workers"
    alerts_bucket: str = "cityflux_alerts"
    checkpoints_bucket: str = "cityflux_checkpoints"


class InfluxConfig(Base, frozen=True):
    url: str = "http://127.0.0.1:8086"
    api: Literal["v1", "v2"] = "v1"
    # v1: database, retention policy, optional user/password
    database: str = "cityflux"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    # v2: organisation, bucket and token
    org: str = "cityflux"
    bucket: str = "cityflux"
    token: str | None = None
    create_database: bool = True  # v1 only: CREATE DATABASE at start (idempotent)
    # off by default, as in Telegraf's InfluxDB v1 output: on a LAN compression costs both
    # sides more CPU than it saves (docs/performance.md); turn it on across a WAN
    gzip: bool = False
    timeout_s: float = 10.0
    max_retries: int = 3  # per batch, before the batch goes to the spool
    retry_base_s: float = 0.2
    retry_max_s: float = 5.0


class IngestConfig(Base, frozen=True):
    batch_size: int = 10_000  # messages per batch (see the receive_maximum check below)
    flush_interval_s: float = 0.2
    # batches written concurrently: lets the database parse one while it stores another
    write_concurrency: int = 2
    max_payload_bytes: int = 256 * 1024
    max_readings_per_message: int = 1_000
    max_past_s: int = 30 * 24 * 3600  # readings older than this are bad_timestamp
    max_future_s: int = 300  # clocks ahead by more than this are bad_timestamp
    deadletter_prefix_bytes: int = 1_024


class SpoolConfig(Base, frozen=True):
    dir: str = "var/spool"
    max_bytes: int = 1024 * 1024 * 1024
    # Sized the segment files of the spool before it moved to SQLite: accepted so that old
    # config files still load, ignored, and warned about (docs/operations.md, "The spool").
    segment_bytes: int | None = None


class MetricsConfig(Base, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108
    health_interval_s: float = 10.0  # how often pipeline counters are written to InfluxDB


class CaliforniaConfig(Base, frozen=True):
    """California algorithm thresholds for one site class (docs/analytics.md)."""

    occdf_pct: float = 8.0
    occrdf: float = 0.5
    docctd: float = 0.3
    persistence: int = 1
    clear_after: int = 2


class AnalyticsConfig(Base, frozen=True):
    enabled: bool = True
    city_map: str = "examples/city-map.json"  # the map the indices and rules refer to
    utc_offset_h: float = 8.0  # the city's time zone: day/night noise limits, local hours
    pane_s: float = 60.0  # tumbling window of the traffic indices; panes of the sliding one
    sliding_panes: int = 5  # the sliding window: 5 x 60 s
    env_pane_s: float = 300.0  # air, noise and lamps are evaluated every 5 minutes ...
    env_window_s: float = 3600.0  # ... over the last hour (HJ 633 hourly AQI, hourly Leq)
    delay_s: float = 120.0  # watermark = newest event time - delay: on-time out-of-orderness
    lateness_s: float = 300.0  # late readings within this update their window; later: dropped
    idle_flush_s: float = 10.0  # no new readings for this long: close every open window
    # event time (the watermark) never advances past the wall clock + this: one device
    # whose clock runs ahead cannot close everyone's windows (docs/analytics.md)
    max_clock_skew_s: float = 5.0
    checkpoint_dir: str = "var/analytics"
    checkpoint_interval_s: float = 30.0
    alerts_db: str = "var/analytics/alerts.sqlite"
    rules_file: str | None = None  # None: cityflux/analytics/rules.toml
    aqi_table: Literal["HJ633-2012", "HJ633-2026"] = "HJ633-2012"
    lamp_power_tolerance: float = 0.25  # share of rated power
    stuck_intervals: int = 5  # a station's speed repeating exactly this often: sensor stuck
    california: dict[str, CaliforniaConfig] = {}  # per road class; missing: the defaults


class SupervisionConfig(Base, frozen=True):
    """Restarts of failed threads and the /healthz watchdog (docs/operations.md)."""

    restart_min_s: float = 0.5
    restart_max_s: float = 30.0
    # more restarts of one component than this within restart_window_s: the process exits
    # non-zero so that systemd or compose restart it whole
    max_restarts: int = 10
    restart_window_s: float = 300.0
    # work waiting and no progress for this long: /healthz answers 503
    stall_after_s: float = 60.0


class Config(Base, frozen=True):
    source: SourceConfig = SourceConfig()
    mqtt: MqttConfig = MqttConfig()
    nats: NatsConfig = NatsConfig()
    influx: InfluxConfig = InfluxConfig()
    ingest: IngestConfig = IngestConfig()
    spool: SpoolConfig = SpoolConfig()
    metrics: MetricsConfig = MetricsConfig()
    analytics: AnalyticsConfig = AnalyticsConfig()
    supervision: SupervisionConfig = SupervisionConfig()

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted-key overrides applied, e.g. ``{"mqtt.url": "mqtt://h:1"}``."""
        data = msgspec.to_builtins(self)
        for dotted, value in overrides.items():
            _set_dotted(data, dotted.split("."), value)
        return _convert(data)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file, then ``CITYFLUX_*`` variables; validated and frozen."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(f"{ENV_PREFIX}CONFIG")
    data: dict[str, Any] = _read_toml(Path(path)) if path else {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
            _set_dotted(data, keys, _env_value(keys, value))
    return _convert(data)


def _env_value(keys: list[str], value: str) -> Any:
    """A variable is one string; a list key takes comma-separated items, e.g.
    ``CITYFLUX_NATS__URLS=nats://n1:4222,nats://n2:4222``."""
    node: Any = Config
    for key in keys:
        fields = msgspec.structs.fields(node) if isinstance(node, type) else ()
        node = next((field.type for field in fields if field.name == key), None)
    if get_origin(node) in (tuple, list):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = data.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is not a section")
        data = node
    data[keys[-1]] = value


def _convert(data: dict[str, Any]) -> Config:
    try:
        # strict=False: environment variables are strings; "5000" must become an int.
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    _check(config)
    return config


def _check(config: Config) -> None:
    """Rules that span keys, which the types alone cannot say."""
    scheme = urlsplit(config.mqtt.url).scheme
    if scheme not in {"mqtt", "mqtts"}:
        raise ConfigError(f"mqtt.url must start with mqtt:// or mqtts://, got {config.mqtt.url!r}")
    if urlsplit(config.influx.url).scheme not in {"http", "https"}:
        raise ConfigError(f"influx.url must be http(s)://, got {config.influx.url!r}")
    if config.ingest.batch_size > config.mqtt.receive_maximum:
        raise ConfigError(
            "ingest.batch_size must not exceed mqtt.receive_maximum: the broker stops sending "
            "once receive_maximum messages are unacknowledged"
        )
    if config.influx.api == "v2" and not config.influx.token:
        raise ConfigError("influx.api = 'v2' needs influx.token")
    if config.ingest.batch_size * (config.ingest.write_concurrency + 2) > (
        config.mqtt.receive_maximum
    ):
        raise ConfigError(
            "mqtt.receive_maximum must hold ingest.batch_size x (write_concurrency + 2) "
            "messages: batches being written, one queued, and one being filled"
        )
    for name in (
        "batch_size",
        "max_payload_bytes",
        "max_readings_per_message",
        "write_concurrency",
    ):
        if getattr(config.ingest, name) <= 0:
            raise ConfigError(f"ingest.{name} must be positive")
    # room for the topic, packet id and MQTT 5 properties around a maximal payload
    if config.mqtt.max_packet_size < config.ingest.max_payload_bytes + MQTT_PACKET_MARGIN:
        raise ConfigError(
            f"mqtt.max_packet_size must be at least ingest.max_payload_bytes + "
            f"{MQTT_PACKET_MARGIN}: a payload we would accept must fit in a packet we accept"
        )
    if config.mqtt.max_packet_size > 268_435_460:  # 4-byte remaining length + fixed header
        raise ConfigError("mqtt.max_packet_size must not exceed 268,435,460 (MQTT's own limit)")
    _check_nats(config.nats)
    if config.spool.segment_bytes is not None:
        log.warning("spool.segment_bytes is ignored since the spool is one SQLite file: remove it")


def _check_nats(nats: NatsConfig) -> None:
    if not nats.urls or any(urlsplit(u).scheme not in {"nats", "tls"} for u in nats.urls):
        raise ConfigError(f"nats.urls must be nats:// or tls:// URLs, got {nats.urls!r}")
    if not 1 <= nats.partitions <= 1024:
        raise ConfigError("nats.partitions must be 1..1024")
    if nats.fetch_expires_s * 2 >= nats.pin_timeout_s:
        raise ConfigError(
            "nats.pin_timeout_s must exceed twice nats.fetch_expires_s: an owner that is "
            "waiting on its pull request must not lose its partitions"
        )
    if nats.max_deliver < 2:
        raise ConfigError("nats.max_deliver must be at least 2 (one redelivery)")
