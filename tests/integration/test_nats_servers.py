"""The NATS fixtures for real: MQTT into JetStream on one node, an R3 stream through kill -9."""

from __future__ import annotations

import asyncio
import time

import nats as nats_client
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext

from cityflux.servers_nats import LocalNats, LocalNatsCluster
from tests.support import publish_all


async def _stored(js: JetStreamContext, stream: str) -> dict[str, int]:
    info = await js.stream_info(stream, subjects_filter=">")
    return dict(info.state.subjects or {})


def test_mqtt_qos1_publish_lands_in_a_jetstream_stream(nats_node: LocalNats) -> None:
    """A paho 3.1.1 QoS 1 device on the MQTT listener: topic -> subject, stored in the stream."""
    readings = [
        ("cityflux/v1/d1/traffic/det-1", b'{"ts": 1, "count": 3}'),
        ("cityflux/v1/d1/traffic/det-1", b'{"ts": 2, "count": 4}'),
        ("cityflux/v1/d2/pole/pole-9/status", b'{"online": true}'),
    ]

    async def scenario() -> tuple[dict[str, int], list[bytes]]:
        nc = await nats_client.connect(nats_node.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="CITY", subjects=["cityflux.v1.>"]))
        assert nats_node.mqtt_port is not None
        # publish_all waits for every PUBACK (the MQTT side stores in $MQTT_msgs first)
        await asyncio.to_thread(publish_all, nats_node.mqtt_port, readings)
        deadline = time.monotonic() + 10
        while (await js.stream_info("CITY")).state.messages < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        subjects = await _stored(js, "CITY")
        payloads = [(await js.get_msg("CITY", seq)).data or b"" for seq in (1, 2, 3)]
        await nc.close()
        return subjects, payloads

    subjects, payloads = asyncio.run(scenario())
    assert subjects == {"cityflux.v1.d1.traffic.det-1": 2, "cityflux.v1.d2.pole.pole-9.status": 1}
    assert payloads == [payload for _, payload in readings]


async def _publish(js: JetStreamContext, first: int, count: int, deadline_s: float) -> int:
    """Publish ids first..first+count-1, each until JetStream acknowledges it; the retries.

    A publish whose acknowledgement was lost may have been stored: the retry carries the same
    Nats-Msg-Id, so the stream's duplicate window drops the second copy (exact counts).
    """
    retries = 0
    deadline = time.monotonic() + deadline_s
    for i in range(first, first + count):
        while True:
            try:
                await js.publish(
                    f"r3.d{i % 5}", str(i).encode(), timeout=1.0, headers={"Nats-Msg-Id": str(i)}
                )
                break
            except (nats_client.errors.Error, nats_client.js.errors.Error):
                retries += 1
                assert time.monotonic() < deadline, f"no acknowledgement for {i} in {deadline_s}s"
                await asyncio.sleep(0.05)
    return retries


def test_r3_stream_survives_kill_9_of_its_leader(nats_cluster: LocalNatsCluster) -> None:
    async def scenario() -> tuple[int, int, set[bytes], str, str]:
        nc = await nats_client.connect(
            nats_cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1
        )
        js = nc.jetstream(timeout=5)
        info = await js.add_stream(
            StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3, storage=StorageType.FILE)
        )
        assert info.cluster is not None and info.cluster.leader is not None
        leader = info.cluster.leader
        assert await _publish(js, 0, 1000, 30) == 0
        victim = [node.server_name for node in nats_cluster.nodes].index(leader)
        nats_cluster.kill(victim)  # SIGKILL: no goodbye to the peers
        retries = await _publish(js, 1000, 1000, 60)
        after = await js.stream_info("R3")
        assert after.cluster is not None and after.cluster.leader is not None
        payloads: set[bytes] = set()
        for seq in range(1, after.state.messages + 1):
            payloads.add((await js.get_msg("R3", seq)).data or b"")
        await nc.close()
        return after.state.messages, retries, payloads, leader, after.cluster.leader

    count, retries, payloads, old_leader, new_leader = asyncio.run(scenario())
    assert count == 2000
    assert payloads == {str(i).encode() for i in range(2000)}
    assert new_leader != old_leader
    assert retries > 0  # the kill was felt: the publishes waited out the leader election

    # the killed node comes back and catches up from its store directory and its peers
    # (/healthz is 200 only when its replica of R3 is current again)
    victim = [node.server_name for node in nats_cluster.nodes].index(old_leader)
    nats_cluster.restart(victim)
    nats_cluster.wait_ready(60)
    assert nats_cluster.nodes[victim].healthy()
