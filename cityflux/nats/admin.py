"""``cityflux nats init``: the readings stream, its consumers and the buckets, idempotently.

What it creates (docs/scale.md, "Setting up the stream"):

- ``$MQTT_msgs`` if the server has not made it yet (as the server's MQTT layer would: file,
  interest retention), so that init does not depend on a first MQTT connection;
- two durable ``flow_control`` consumers on ``$MQTT_msgs`` (``{stream}-src-readings`` and
  ``{stream}-src-status``) and the readings stream ``nats.stream`` sourcing through them with
  the partition transform. The server PUBACKs a device's QoS 1 publish once it is in
  ``$MQTT_msgs``; a stream capturing the device subjects directly lost 1,999 of 3,000
  PUBACKed readings when its leader was killed, the durable source lost none;
- one pull consumer per partition, ``{group}-p{n}``, pinned-client priority group ``{group}``;
- the KV buckets for members and alerts, and the checkpoints object store.

Each object is created when absent, updated when a setting it owns differs, else left alone,
and the report says which. Changing the partition count of an existing stream is refused
(districts would move between partitions) unless forced.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsClientError
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType

from cityflux.config import Config, NatsConfig
from cityflux.errors import NatsError
from cityflux.nats.connect import (
    JS_CONSUMER_NOT_FOUND,
    JS_STREAM_NOT_FOUND,
    connect,
    js_request,
)
from cityflux.nats.partition import MQTT_MSGS_STREAM, partition_subject, source_transforms

NS: Final = 1_000_000_000
# the server requires a 1 s heartbeat on a flow_control consumer (consumer.go checkConsumerCfg)
SOURCE_HEARTBEAT_NS: Final = NS
# messages in flight from $MQTT_msgs into the readings stream, per sourcing consumer
SOURCE_MAX_ACK_PENDING: Final = 10_000
KV_MAX_DUPLICATE_WINDOW_NS: Final = 120 * NS  # what nats-py gives a bucket without a TTL
_PARTITIONS: Final = re.compile(r"\{\{\s*partition\((\d+),")

Action = Literal["created", "updated", "unchanged", "deleted"]


class PartitionsChanged(NatsError):
    """The stream exists with another partition count: districts would change partition."""


class Change(msgspec.Struct, frozen=True):
    kind: str  # stream, consumer, kv, object store
    name: str
    action: Action
    detail: str = ""  # the settings that changed


class InitReport(msgspec.Struct):
    changes: list[Change] = msgspec.field(default_factory=list)
    warnings: list[str] = msgspec.field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(change.action != "unchanged" for change in self.changes)


def source_consumer_name(stream: str, which: str) -> str:
    return f"{stream}-src-{which}"


def partition_consumer_name(group: str, partition: int) -> str:
    return f"{group}-p{partition}"


async def init(config: Config, force: bool = False, wait_s: float = 10.0) -> InitReport:
    nc = await connect(config.nats, "cityflux-nats-init", wait_s=wait_s)
    try:
        return await init_on(nc, config, force)
    finally:
        await nc.close()


async def init_on(nc: Client, config: Config, force: bool = False) -> InitReport:
    report = InitReport()
    nats = config.nats
    existing = await stream_info(nc, nats.stream)
    if existing is not None:
        _check_partitions(existing, nats, force, report)
    await _ensure_mqtt_msgs(nc, nats, report)
    transforms = source_transforms(config.mqtt.topic_root, nats.subject_root, nats.partitions)
    for which, (filter_subject, _) in transforms.items():
        await _ensure_consumer(
            nc, MQTT_MSGS_STREAM, _source_consumer(nats.stream, which, filter_subject), report
        )
    await _ensure_stream(nc, readings_stream_config(nats, transforms), report)
    for partition in range(nats.partitions):
        await _ensure_consumer(nc, nats.stream, partition_consumer(nats, partition), report)
    await _drop_extra_partitions(nc, nats, report)
    try:
        await _ensure_buckets(nc, nats, report)
    except NatsClientError as exc:  # nats-py's own KV and object store calls
        raise NatsError(f"creating the buckets: {exc}") from exc
    return report


async def stream_info(nc: Client, name: str) -> dict[str, Any] | None:
    try:
        return await js_request(nc, f"$JS.API.STREAM.INFO.{name}")
    except NatsError as exc:
        if exc.code == JS_STREAM_NOT_FOUND:
            return None
        raise


async def consumer_info(nc: Client, stream: str, name: str) -> dict[str, Any] | None:
    try:
        return await js_request(nc, f"$JS.API.CONSUMER.INFO.{stream}.{name}")
    except NatsError as exc:
        if exc.code == JS_CONSUMER_NOT_FOUND:
            return None
        raise


def readings_stream_config(
    nats: NatsConfig, transforms: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """No subjects of its own: everything comes in through the two durable sources."""
    sources = [
        {
            "name": MQTT_MSGS_STREAM,
            "consumer": {
                "name": source_consumer_name(nats.stream, which),
                "deliver_subject": _deliver_subject(nats.stream, which),
            },
            "subject_transforms": [{"src": src, "dest": dest}],
        }
        for which, (src, dest) in transforms.items()
    ]
    return {
        "name": nats.stream,
        "sources": sources,
        "retention": "limits",
        "discard": "old",
        "storage": "file",
        "num_replicas": nats.replicas,
        "max_age": int(nats.max_age_s * NS),
        "max_bytes": nats.max_bytes,
        "max_msg_size": nats.max_msg_size,
        "duplicate_window": int(min(nats.duplicate_window_s, nats.max_age_s) * NS),
    }


def partition_consumer(nats: NatsConfig, partition: int) -> dict[str, Any]:
    """A durable pull consumer for one partition; the pinned client of priority group
    ``group`` owns it, a silent owner loses it after ``pin_timeout_s`` (findings: exactly)."""
    return {
        "durable_name": partition_consumer_name(nats.group, partition),
        "filter_subject": partition_subject(nats.subject_root, partition),
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(nats.ack_wait_s * NS),
        "max_deliver": nats.max_deliver,
        "max_ack_pending": nats.max_ack_pending,
        "priority_groups": [nats.group],
        "priority_policy": "pinned_client",
        "priority_timeout": int(nats.pin_timeout_s * NS),
    }


def _source_consumer(stream: str, which: str, filter_subject: str) -> dict[str, Any]:
    # ADR-60 durable sourcing: $MQTT_msgs is interest-retention, so a PUBACKed message stays
    # there until the readings stream has stored it and flow control has acknowledged it
    return {
        "durable_name": source_consumer_name(stream, which),
        "deliver_subject": _deliver_subject(stream, which),
        "filter_subject": filter_subject,
        "ack_policy": "flow_control",
        "flow_control": True,
        "idle_heartbeat": SOURCE_HEARTBEAT_NS,
        "max_ack_pending": SOURCE_MAX_ACK_PENDING,
    }


def _deliver_subject(stream: str, which: str) -> str:
    return f"_cityflux.src.{stream}.{which}"


def partitions_of(stream_config: dict[str, Any]) -> int | None:
    """The partition count in an existing stream's transforms, if any."""
    for source in stream_config.get("sources") or []:
        for transform in source.get("subject_transforms") or []:
            match = _PARTITIONS.search(transform.get("dest", ""))
            if match:
                return int(match.group(1))
    return None


def _check_partitions(
    info: dict[str, Any], nats: NatsConfig, force: bool, report: InitReport
) -> None:
    current = partitions_of(info["config"])
    if current is None or current == nats.partitions:
        return
    message = (
        f"stream {nats.stream} files districts into {current} partitions, the configuration "
        f"says {nats.partitions}: changing it moves districts to other partitions (their "
        f"analytics state, checkpoints, and the readings already stored stay under the old "
        f"ones). Set nats.stream to a new name to start a stream with {nats.partitions} "
        f"partitions, or run `cityflux nats init --force` to remap this one."
    )
    if not force:
        raise PartitionsChanged(message)
    report.warnings.append(f"--force: {current} -> {nats.partitions} partitions")


async def _ensure_mqtt_msgs(nc: Client, nats: NatsConfig, report: InitReport) -> None:
    """The stream the server's MQTT layer keeps QoS 1 messages in; made here, with the config
    the server would give it (server/mqtt.go), if no MQTT client has connected yet. The server
    adopts an existing one."""
    info = await stream_info(nc, MQTT_MSGS_STREAM)
    if info is None:
        await js_request(
            nc,
            f"$JS.API.STREAM.CREATE.{MQTT_MSGS_STREAM}",
            {
                "name": MQTT_MSGS_STREAM,
                "subjects": ["$MQTT.msgs.>"],
                "storage": "file",
                "retention": "interest",
                "num_replicas": nats.replicas,
            },
        )
        report.changes.append(Change("stream", MQTT_MSGS_STREAM, "created"))
        return
    replicas = info["config"].get("num_replicas", 1)
    if replicas < nats.replicas:
        report.warnings.append(
            f"{MQTT_MSGS_STREAM} has {replicas} replicas, fewer than nats.replicas="
            f"{nats.replicas}: set `mqtt {{ stream_replicas: {nats.replicas} }}` in the "
            "servers' configuration (PUBACKed readings wait there)"
        )
    report.changes.append(Change("stream", MQTT_MSGS_STREAM, "unchanged"))


def _differences(current: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [key for key, value in wanted.items() if _normal(current.get(key)) != _normal(value)]


def _normal(value: Any) -> Any:
    """Compare configs as the server echoes them: sources without the fields it adds."""
    if isinstance(value, list) and value and isinstance(value[0], dict) and "name" in value[0]:
        return sorted(
            (
                source["name"],
                (source.get("consumer") or {}).get("name"),
                (source.get("consumer") or {}).get("deliver_subject"),
                tuple((t["src"], t["dest"]) for t in source.get("subject_transforms") or []),
            )
            for source in value
        )
    return value


async def _ensure_stream(nc: Client, wanted: dict[str, Any], report: InitReport) -> None:
    name = wanted["name"]
    info = await stream_info(nc, name)
    if info is None:
        await js_request(nc, f"$JS.API.STREAM.CREATE.{name}", wanted)
        report.changes.append(Change("stream", name, "created"))
        return
    changed = _differences(info["config"], wanted)
    if changed:
        await js_request(nc, f"$JS.API.STREAM.UPDATE.{name}", info["config"] | wanted)
        report.changes.append(Change("stream", name, "updated", ", ".join(changed)))
    else:
        report.changes.append(Change("stream", name, "unchanged"))


async def _ensure_consumer(
    nc: Client, stream: str, wanted: dict[str, Any], report: InitReport
) -> None:
    name = wanted["durable_name"]
    info = await consumer_info(nc, stream, name)
    changed = [] if info is None else _differences(info["config"], wanted)
    if info is not None and not changed:
        report.changes.append(Change("consumer", f"{stream} > {name}", "unchanged"))
        return
    # the same request creates or updates (the server refuses a change it cannot apply)
    body = {"stream_name": stream, "config": wanted}
    await js_request(nc, f"$JS.API.CONSUMER.CREATE.{stream}.{name}", body)
    action: Action = "created" if info is None else "updated"
    report.changes.append(Change("consumer", f"{stream} > {name}", action, ", ".join(changed)))


async def _drop_extra_partitions(nc: Client, nats: NatsConfig, report: InitReport) -> None:
    """After a forced change to fewer partitions: the consumers of partitions that are gone."""
    answer = await js_request(nc, f"$JS.API.CONSUMER.NAMES.{nats.stream}", {"offset": 0})
    pattern = re.compile(rf"{re.escape(nats.group)}-p(\d+)")
    for name in sorted(answer.get("consumers") or []):
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) >= nats.partitions:
            await js_request(nc, f"$JS.API.CONSUMER.DELETE.{nats.stream}.{name}")
            report.changes.append(Change("consumer", f"{nats.stream} > {name}", "deleted"))


async def _ensure_buckets(nc: Client, nats: NatsConfig, report: InitReport) -> None:
    js = nc.jetstream()
    storage = StorageType.FILE
    # members: a worker's key expires 3 heartbeats after its last one (dead workers vanish)
    members_ttl = 3 * nats.heartbeat_s
    buckets = {
        nats.members_bucket: KeyValueConfig(
            bucket=nats.members_bucket,
            history=1,
            ttl=members_ttl,
            replicas=nats.replicas,
            storage=storage,
        ),
        # alerts: a revision per change, so acks compare-and-set and the history is the trail
        nats.alerts_bucket: KeyValueConfig(
            bucket=nats.alerts_bucket, history=64, replicas=nats.replicas, storage=storage
        ),
    }
    for bucket, kv_config in buckets.items():
        name = f"KV_{bucket}"
        wanted = _kv_settings(kv_config)
        info = await stream_info(nc, name)
        if info is None:
            await js.create_key_value(kv_config)
            report.changes.append(Change("kv", bucket, "created"))
        else:
            await _update_settings(nc, name, info, wanted, "kv", bucket, report)
    name = f"OBJ_{nats.checkpoints_bucket}"
    info = await stream_info(nc, name)
    if info is None:
        # the name goes positionally: nats-py overwrites config.bucket with the argument
        obs_config = ObjectStoreConfig(replicas=nats.replicas, storage=storage)
        await js.create_object_store(nats.checkpoints_bucket, config=obs_config)
        report.changes.append(Change("object store", nats.checkpoints_bucket, "created"))
    else:
        wanted = {"num_replicas": nats.replicas}
        await _update_settings(
            nc, name, info, wanted, "object store", nats.checkpoints_bucket, report
        )


def _kv_settings(kv: KeyValueConfig) -> dict[str, Any]:
    max_age = int((kv.ttl or 0) * NS)
    window = min(KV_MAX_DUPLICATE_WINDOW_NS, max_age) if max_age else KV_MAX_DUPLICATE_WINDOW_NS
    return {
        "max_msgs_per_subject": kv.history,
        "max_age": max_age,
        "duplicate_window": window,
        "num_replicas": kv.replicas,
    }


async def _update_settings(
    nc: Client,
    stream: str,
    info: dict[str, Any],
    wanted: dict[str, Any],
    kind: str,
    name: str,
    report: InitReport,
) -> None:
    changed = _differences(info["config"], wanted)
    if changed:
        await js_request(nc, f"$JS.API.STREAM.UPDATE.{stream}", info["config"] | wanted)
        report.changes.append(Change(kind, name, "updated", ", ".join(changed)))
    else:
        report.changes.append(Change(kind, name, "unchanged"))
