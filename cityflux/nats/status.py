"""``cityflux nats status``: the readings stream, each partition's consumer, the live workers."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsClientError
from nats.js.errors import BucketNotFoundError

from cityflux.config import Config
from cityflux.errors import NatsError
from cityflux.nats.admin import (
    consumer_info,
    partition_consumer_name,
    source_consumer_name,
    stream_info,
)
from cityflux.nats.connect import connect
from cityflux.nats.members import live_values
from cityflux.nats.partition import MQTT_MSGS_STREAM


class StreamStatus(msgspec.Struct, frozen=True):
    name: str
    messages: int
    bytes: int
    first_ts: str  # RFC 3339 as the server gives it; "" when empty
    last_ts: str
    replicas: int
    leader: str  # "" on a single server
    # readings PUBACKed to devices and not yet in the stream (the sourcing consumers' backlog)
    source_pending: int


class PartitionStatus(msgspec.Struct, frozen=True):
    partition: int
    consumer: str
    exists: bool
    pending: int = 0  # stored, not yet delivered
    ack_pending: int = 0  # delivered, not yet acknowledged
    redelivered: int = 0
    pinned: str = ""  # the pinned client's id (its owner), "" when nobody holds it
    last_delivered: int = 0  # stream sequence
    last_active: str = ""


class Member(msgspec.Struct, frozen=True):
    key: str
    value: str


class StatusReport(msgspec.Struct, frozen=True):
    stream: StreamStatus
    partitions: list[PartitionStatus]
    members: list[Member]


async def status(config: Config, wait_s: float = 10.0) -> StatusReport:
    nc = await connect(config.nats, "cityflux-nats-status", wait_s=wait_s)
    try:
        return await status_on(nc, config)
    finally:
        await nc.close()


async def status_on(nc: Client, config: Config) -> StatusReport:
    nats = config.nats
    info = await stream_info(nc, nats.stream)
    if info is None:
        raise NatsError(f"no stream {nats.stream}: run `cityflux nats init` first", 404)
    partitions = [await _partition(nc, config, n) for n in range(nats.partitions)]
    return StatusReport(
        await _stream(nc, config, info), partitions, await members(nc, nats.members_bucket)
    )


async def _stream(nc: Client, config: Config, info: dict[str, Any]) -> StreamStatus:
    state, cluster = info["state"], info.get("cluster") or {}
    backlog = 0
    for which in ("readings", "status"):
        name = source_consumer_name(config.nats.stream, which)
        source = await consumer_info(nc, MQTT_MSGS_STREAM, name)
        if source is not None:
            backlog += source.get("num_pending", 0) + source.get("num_ack_pending", 0)
    return StreamStatus(
        name=config.nats.stream,
        messages=state.get("messages", 0),
        bytes=state.get("bytes", 0),
        first_ts=_ts(state.get("first_ts")),
        last_ts=_ts(state.get("last_ts")),
        replicas=info["config"].get("num_replicas", 1),
        leader=cluster.get("leader", ""),
        source_pending=backlog,
    )


def _ts(value: str | None) -> str:
    # an empty stream reports the zero time
    return "" if not value or value.startswith("0001-") else value


async def _partition(nc: Client, config: Config, partition: int) -> PartitionStatus:
    name = partition_consumer_name(config.nats.group, partition)
    info = await consumer_info(nc, config.nats.stream, name)
    if info is None:
        return PartitionStatus(partition, name, exists=False)
    groups = info.get("priority_groups") or []
    pinned = next((g.get("pinned_client_id", "") for g in groups if g.get("pinned_client_id")), "")
    delivered = info.get("delivered") or {}
    return PartitionStatus(
        partition,
        name,
        exists=True,
        pending=info.get("num_pending", 0),
        ack_pending=info.get("num_ack_pending", 0),
        redelivered=info.get("num_redelivered", 0),
        pinned=pinned,
        last_delivered=delivered.get("stream_seq", 0),
        last_active=_ts(delivered.get("last_active")),
    )


async def members(nc: Client, bucket: str) -> list[Member]:
    """The live workers: keys of the members bucket (a dead worker's expires), read as the
    workers read them (``live_values``: nats-py's ``kv.keys()`` leaves a consumer behind)."""
    try:
        kv = await nc.jetstream().key_value(bucket)
        values = await live_values(nc, kv, bucket)
    except BucketNotFoundError:
        return []
    except NatsClientError as exc:
        raise NatsError(f"reading the members bucket {bucket}: {exc}") from exc
    return [Member(key, values[key].decode(errors="replace")) for key in sorted(values)]
