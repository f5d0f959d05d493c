"""`cityflux nats init` / `status` against real nats-servers (one node, the 3-node cluster).

The stream is fed by durable sourcing from ``$MQTT_msgs`` (docs/scale.md): these tests check
what init creates, that it is idempotent, that the server files a device's readings under the
partition :func:`partition_of` computes (the test of partition_of against the server), and that
a kill -9 of the stream's leader loses none of the readings the devices got a PUBACK for.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import nats as nats_client
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from cityflux.cli import app
from cityflux.config import Config
from cityflux.errors import NatsError
from cityflux.nats.admin import PartitionsChanged, init, init_on
from cityflux.nats.connect import connect, js_request
from cityflux.nats.partition import partition_of, subject_token, topic_of
from cityflux.servers_nats import LocalNats, LocalNatsCluster
from tests.support import publish_all

NS = 1_000_000_000


def _config(urls: list[str], **overrides: Any) -> Config:
    return Config().with_overrides({"nats.urls": urls, **overrides})


async def _info(config: Config, subject: str, body: dict[str, Any] | None = None) -> Any:
    nc = await connect(config.nats, "test", wait_s=10)
    try:
        return await js_request(nc, subject, body)
    finally:
        await nc.close()


def _stream_subjects(config: Config) -> dict[str, int]:
    info = asyncio.run(
        _info(config, f"$JS.API.STREAM.INFO.{config.nats.stream}", {"subjects_filter": ">"})
    )
    return dict(info["state"].get("subjects") or {})


def _wait_stored(config: Config, count: int, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    stored = 0
    while time.monotonic() < deadline:
        try:
            info = asyncio.run(_info(config, f"$JS.API.STREAM.INFO.{config.nats.stream}"))
        except NatsError:  # no leader yet (after a kill -9): ask again
            time.sleep(0.1)
            continue
        stored = info["state"]["messages"]
        if stored >= count:
            return int(stored)
        time.sleep(0.1)
    return int(stored)


def test_init_creates_everything_once_then_applies_a_change(nats_node: LocalNats) -> None:
    config = _config([nats_node.url])
    first = asyncio.run(init(config))
    created = {(c.kind, c.name) for c in first.changes if c.action == "created"}
    assert created == {
        ("stream", "$MQTT_msgs"),  # no MQTT client has connected yet: init made it
        ("consumer", "$MQTT_msgs > CITYFLUX-src-readings"),
        ("consumer", "$MQTT_msgs > CITYFLUX-src-status"),
        ("stream", "CITYFLUX"),
        *(("consumer", f"CITYFLUX > cityflux-p{n}") for n in range(16)),
        ("kv", "cityflux_workers"),
        ("kv", "cityflux_alerts"),
        ("object store", "cityflux_checkpoints"),
    }

    second = asyncio.run(init(config))
    assert not second.changed
    assert {c.action for c in second.changes} == {"unchanged"}
    assert len(second.changes) == len(first.changes)

    stream = asyncio.run(_info(config, "$JS.API.STREAM.INFO.CITYFLUX"))["config"]
    assert stream["storage"] == "file" and stream["num_replicas"] == 1
    assert stream["max_age"] == 7 * 24 * 3600 * NS
    assert stream["duplicate_window"] == 120 * NS
    assert stream["max_msg_size"] == 1_048_576
    assert sorted(t["dest"] for s in stream["sources"] for t in s["subject_transforms"]) == [
        "cityflux.p.{{partition(16,1)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}",
        "cityflux.p.{{partition(16,1)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.status",
    ]
    source = asyncio.run(_info(config, "$JS.API.CONSUMER.INFO.$MQTT_msgs.CITYFLUX-src-readings"))
    assert source["config"]["ack_policy"] == "flow_control"
    consumer = asyncio.run(_info(config, "$JS.API.CONSUMER.INFO.CITYFLUX.cityflux-p3"))["config"]
    assert consumer["filter_subject"] == "cityflux.p.3.>"
    assert consumer["priority_groups"] == ["cityflux"]
    assert consumer["priority_policy"] == "pinned_client"
    assert consumer["priority_timeout"] == 10 * NS
    assert (consumer["ack_policy"], consumer["max_deliver"]) == ("explicit", 5)
    members = asyncio.run(_info(config, "$JS.API.STREAM.INFO.KV_cityflux_workers"))["config"]
    assert (members["max_msgs_per_subject"], members["max_age"]) == (1, 6 * NS)
    alerts = asyncio.run(_info(config, "$JS.API.STREAM.INFO.KV_cityflux_alerts"))["config"]
    assert alerts["max_msgs_per_subject"] == 64

    shorter = config.with_overrides({"nats.max_age_s": 3600.0, "nats.ack_wait_s": 30.0})
    third = asyncio.run(init(shorter))
    updated = {(c.name, c.detail) for c in third.changes if c.action != "unchanged"}
    assert updated == {
        ("CITYFLUX", "max_age"),
        *((f"CITYFLUX > cityflux-p{n}", "ack_wait") for n in range(16)),
    }
    stream = asyncio.run(_info(config, "$JS.API.STREAM.INFO.CITYFLUX"))["config"]
    assert stream["max_age"] == 3600 * NS
    consumer = asyncio.run(_info(config, "$JS.API.CONSUMER.INFO.CITYFLUX.cityflux-p9"))["config"]
    assert consumer["ack_wait"] == 30 * NS


def test_devices_land_in_the_partition_partition_of_computes(nats_node: LocalNats) -> None:
    """THE test of partition_of: ~50 districts (ids with '.' too) published over MQTT QoS 1;
    the server's transform and partition_of agree on each, and topic_of gives the topic back."""
    config = _config([nats_node.url])
    asyncio.run(init(config))
    districts = [f"district-{i}" for i in range(46)] + ["d.1", "a.b.c", "centre", "x_y"]
    topics = [f"cityflux/v1/{d}/traffic/det.{i}" for i, d in enumerate(districts)]
    topics.append("cityflux/v1/d.1/pole/pole-1/status")
    outside = ["cityflux/v1/deadletter/bad_json", "cityflux/v1/alerts/ack"]  # 4 levels: kept out
    assert nats_node.mqtt_port is not None
    publish_all(nats_node.mqtt_port, [(t, b"{}") for t in topics + outside])
    assert _wait_stored(config, len(topics)) == len(topics)
    subjects = _stream_subjects(config)

    expected = {}
    for topic in topics:
        district, kind, device, *status = topic.split("/")[2:]
        tokens = [subject_token(level) for level in (district, kind, device, *status)]
        expected[f"cityflux.p.{partition_of(district, 16)}.{'.'.join(tokens)}"] = 1
    assert subjects == expected
    assert sorted(topic_of(s, "cityflux.p", "cityflux/v1") for s in subjects) == sorted(topics)
    assert "cityflux.p.0.d//1.traffic.det//46" in subjects  # '.' in a level is '//'
    assert len({s.split(".")[2] for s in subjects}) == 16  # 50 districts reach every partition


def test_a_client_id_with_a_dot_is_refused_by_the_nats_mqtt_listener(nats_node: LocalNats) -> None:
    """Device ids may hold '.', but nats-server refuses such an MQTT client id (CONNACK
    'identifier rejected'): on NATS a device's client id must not be its id verbatim."""
    codes: list[int] = []
    done = threading.Event()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        codes.append(reason.value)
        done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="det.1")
    client.on_connect = on_connect
    assert nats_node.mqtt_port is not None
    client.connect("127.0.0.1", nats_node.mqtt_port)
    client.loop_start()
    try:
        assert done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    # 3.1.1 CONNACK return code 2, "identifier rejected"; paho names it with the MQTT 5 code
    assert codes[0] == 0x85


def test_cli_init_status_and_the_pending_count_per_partition(nats_node: LocalNats) -> None:
    url = nats_node.url
    runner = CliRunner()
    first = runner.invoke(app, ["nats", "init", "--url", url], env={})
    assert first.exit_code == 0, first.output
    assert "created stream CITYFLUX" in first.output
    second = runner.invoke(app, ["nats", "init", "--url", url], env={})
    assert second.exit_code == 0 and "unchanged: all 23 objects" in second.output

    readings = [(f"cityflux/v1/d{i % 7}/pole/p-{i}", b"{}") for i in range(70)]
    assert nats_node.mqtt_port is not None
    publish_all(nats_node.mqtt_port, readings)
    config = _config([url])
    assert _wait_stored(config, 70) == 70

    result = runner.invoke(app, ["nats", "status", "--url", url, "--json"], env={})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stream"]["messages"] == 70
    want = [0] * 16
    for district in range(7):
        want[partition_of(f"d{district}", 16)] += 10
    assert [p["pending"] for p in report["partitions"]] == want
    assert all(p["exists"] and p["pinned"] == "" for p in report["partitions"])
    assert report["members"] == []

    table = runner.invoke(app, ["nats", "status", "--url", url], env={})
    assert table.exit_code == 0 and "stream CITYFLUX: 70 messages" in table.output


def test_cli_says_what_to_do_when_no_server_answers() -> None:
    result = CliRunner().invoke(
        app, ["nats", "init", "--url", "nats://127.0.0.1:1", "--wait", "1"], env={}
    )
    assert result.exit_code == 2
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.output
    assert "--url" in result.output


def test_a_partition_change_is_refused_unless_forced(nats_node: LocalNats) -> None:
    config = _config([nats_node.url])
    asyncio.run(init(config))
    fewer = config.with_overrides({"nats.partitions": 8})
    with pytest.raises(PartitionsChanged, match=r"nats\.stream to a new name"):
        asyncio.run(init(fewer))
    refused = CliRunner().invoke(
        app, ["nats", "init", "--url", nats_node.url], env={"CITYFLUX_NATS__PARTITIONS": "8"}
    )
    assert refused.exit_code == 2 and "16 partitions" in refused.output
    # nothing was changed by the refusals
    assert not asyncio.run(init(config)).changed

    forced = asyncio.run(init(fewer, force=True))
    gone = sorted(c.name for c in forced.changes if c.action == "deleted")
    assert gone == sorted(f"CITYFLUX > cityflux-p{n}" for n in range(8, 16))
    stream = asyncio.run(_info(config, "$JS.API.STREAM.INFO.CITYFLUX"))["config"]
    assert "partition(8,1)" in stream["sources"][0]["subject_transforms"][0]["dest"]


def test_init_on_the_cluster_makes_everything_r3(nats_cluster: LocalNatsCluster) -> None:
    config = _config(nats_cluster.urls, **{"nats.replicas": 3})
    report = asyncio.run(init(config))
    assert report.warnings == []
    for stream in ("CITYFLUX", "$MQTT_msgs", "KV_cityflux_workers", "KV_cityflux_alerts"):
        info = asyncio.run(_info(config, f"$JS.API.STREAM.INFO.{stream}"))
        assert info["config"]["num_replicas"] == 3, stream
        assert len(info["cluster"]["replicas"]) == 2, stream  # the leader and two followers
    obs = asyncio.run(_info(config, "$JS.API.STREAM.INFO.OBJ_cityflux_checkpoints"))
    assert obs["config"]["num_replicas"] == 3
    assert not asyncio.run(init(config)).changed


def test_kill_9_of_the_stream_leader_keeps_every_pubacked_reading(
    nats_cluster: LocalNatsCluster,
) -> None:
    """The durability claim (docs/scale.md): a device's QoS 1 readings on one node while the
    readings stream's leader (another node) is killed: every PUBACKed reading is stored, once.
    (With the stream capturing the device subjects directly: 3,000 PUBACKed, 1,001 stored.)"""
    total, kill_at = 3000, 1000
    config = _config(nats_cluster.urls, **{"nats.replicas": 3})
    names = [node.server_name for node in nats_cluster.nodes]

    async def prepare() -> str:
        nc = await connect(config.nats, "test", wait_s=10)
        await init_on(nc, config)
        leader: str = (await js_request(nc, "$JS.API.STREAM.INFO.CITYFLUX"))["cluster"]["leader"]
        if leader == names[0]:  # the device's node stays up: move the leader away from it
            await js_request(nc, "$JS.API.STREAM.LEADER.STEPDOWN.CITYFLUX")
            for _ in range(100):
                info = await js_request(nc, "$JS.API.STREAM.INFO.CITYFLUX")
                leader = info["cluster"].get("leader") or names[0]
                if leader != names[0]:
                    break
                await asyncio.sleep(0.1)
        await nc.close()
        return leader

    leader = asyncio.run(prepare())
    assert leader != names[0]
    device = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="det-1", clean_session=False
    )  # a persistent session: an unacknowledged publish is resent after a reconnect
    device.reconnect_delay_set(1, 1)
    device.connect("127.0.0.1", nats_cluster.mqtt_ports[0])
    device.loop_start()
    acked = 0
    began = time.monotonic()
    try:
        for i in range(total):
            info = device.publish(f"cityflux/v1/d{i % 9}/traffic/det-1", str(i).encode(), qos=1)
            deadline = time.monotonic() + 60
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.002)
            acked += info.is_published()
            if i == kill_at:
                nats_cluster.kill(names.index(leader))
    finally:
        device.disconnect()
        device.loop_stop()
    published_s = time.monotonic() - began
    assert acked == total

    stored = _wait_stored(config, total, timeout_s=30)
    assert stored == total, f"{stored} stored of {acked} PUBACKed ({published_s:.1f}s)"
    payloads = asyncio.run(_all_payloads(nats_cluster.urls, total))
    assert sorted(payloads) == sorted(str(i).encode() for i in range(total))


async def _all_payloads(urls: list[str], count: int) -> list[bytes]:
    nc = await nats_client.connect(urls)
    # the stream's leader was just killed and restarted: a consumer create may wait out an
    # election on a loaded 2-core machine (it timed out at 10 s once in CI)
    js = nc.jetstream(timeout=30)
    sub = await js.pull_subscribe("cityflux.p.>", stream="CITYFLUX")
    out: list[bytes] = []
    while len(out) < count:
        msgs = await sub.fetch(1000, timeout=5)
        out += [msg.data for msg in msgs]
        for msg in msgs:
            await msg.ack()
    await nc.close()
    return out
