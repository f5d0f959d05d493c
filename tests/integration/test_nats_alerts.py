"""Alerts shared across workers in a JetStream KV bucket (cityflux/nats/alerts.py), for real:
two "workers" (each an AlertEngine on its own KvAlertStore and NATS connection) raise the
alerts of their districts; ids are unique; `cityflux alerts list/ack` (typer's CliRunner, the
config naming source.kind = "nats") see and acknowledge both; acks by two operators at once
follow the SQLite rule; a 3-node cluster loses the bucket's leader to kill -9 and the store
carries on."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
from typer.testing import CliRunner

from cityflux.analytics.alerts import Alert, AlertEngine, AlertStore, Observation
from cityflux.cli import app
from cityflux.config import Config, NatsConfig
from cityflux.errors import NatsError
from cityflux.nats.alerts import KvAlertStore
from cityflux.servers_nats import LocalNats, LocalNatsCluster
from tests.unit.test_alerts import TPI

S = 1_000_000_000
runner = CliRunner()


def nats_config(urls: list[str], replicas: int = 1) -> NatsConfig:
    return Config().with_overrides({"nats.urls": urls, "nats.replicas": replicas}).nats


def observe(engine: AlertEngine, t_s: float, district: str, values: dict[str, float]) -> list:
    ids = np.array(list(values), dtype=object)
    return engine.evaluate(
        Observation("segment", round(t_s * S), ids, np.full(len(ids), district, dtype=object),
                    {TPI.metric: np.array(list(values.values()))})
    )  # fmt: skip


def raise_alerts(engine: AlertEngine, district: str, entities: list[str]) -> list[Alert]:
    """A TPI >= 8 for the rule's for-duration (120 s): one alert per entity."""
    observe(engine, 0, district, dict.fromkeys(entities, 9.0))
    return observe(engine, 120, district, dict.fromkeys(entities, 9.0))


def city_config(tmp_path: Path, urls: list[str]) -> Path:
    path = tmp_path / "city.toml"
    path.write_text(f'[source]\nkind = "nats"\n\n[nats]\nurls = {json.dumps(urls)}\n')
    return path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={})
    return result.exit_code, result.output


def test_two_workers_unique_ids_one_list_acks_seen_everywhere(
    nats_node: LocalNats, tmp_path: Path
) -> None:
    config = nats_config([nats_node.url])
    store_a = KvAlertStore.open(config, "worker-a", create=True)
    store_b = KvAlertStore.open(config, "worker-b")
    worker_a, worker_b = AlertEngine([TPI], store_a), AlertEngine([TPI], store_b)
    store_a.follow_acks()  # worker A hears of acks made elsewhere (to publish them)
    raised_a = raise_alerts(worker_a, "d01", ["s1", "s2", "s3"])
    raised_b = raise_alerts(worker_b, "d02", ["s7", "s8"])
    ids = [a.id for a in raised_a + raised_b]
    assert len(ids) == 5 and sorted(ids) == [1, 2, 3, 4, 5]  # unique, from one counter

    # the CLI lists both workers' alerts from the bucket, as a table and as JSON
    conf = str(city_config(tmp_path, [nats_node.url]))
    code, out = cli("alerts", "list", "-c", conf, "--json")
    assert code == 0, out
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(a["id"], a["district"], a["entity"]) for a in listed] == [
        (a.id, a.district, a.entity) for a in sorted(raised_a + raised_b, key=lambda a: a.id)
    ]
    code, out = cli("alerts", "list", "-c", conf)
    assert code == 0 and "5 active alerts in NATS bucket cityflux_alerts" in out

    # an ack through the CLI (a third process's view) is seen by both workers' stores, and
    # worker B's engine copy takes it at its next update of the alert
    s7 = raised_b[0]
    code, out = cli("alerts", "ack", str(s7.id), "--by", "ops-1", "-c", conf)
    assert code == 0 and f"alert {s7.id} (tpi_high s7) acknowledged by ops-1" in out, out
    seen_by_a = store_a.get(s7.id)
    assert seen_by_a is not None and seen_by_a.acknowledged_by == "ops-1"
    observe(worker_b, 180, "d02", {"s7": 9.5, "s8": 9.5})  # a repeat: the engine saves s7
    live = worker_b.trackers["tpi_high"]["s7"].alert
    assert live is not None and (live.acknowledged, live.acknowledged_by) == (True, "ops-1")
    (stored,) = [a for a in store_a.select() if a.id == s7.id]
    assert (stored.count, stored.value, stored.acknowledged_by) == (2, 9.5, "ops-1")

    # an ack through worker A's engine (the MQTT ack path) of worker B's alert: B sees it
    s8 = raised_b[1]
    assert worker_a.ack(s8.id, "ops-2").status == "acknowledged"
    code, out = cli("alerts", "ack", str(s8.id), "--by", "ops-3", "-c", conf)
    assert code == 1 and "was acknowledged by ops-2" in out and "--force" in out
    assert [r.by for r in store_b.acknowledgements(s8.id)] == ["ops-2"]

    # worker A's watch saw the CLI's acks (and possibly its own, which re-apply as "already")
    heard: list[tuple[int, str]] = []
    deadline = time.monotonic() + 5
    while (s7.id, "ops-1") not in heard and time.monotonic() < deadline:
        heard += [(r.alert_id, r.by) for r in store_a.take_acks()]
        time.sleep(0.02)
    assert (s7.id, "ops-1") in heard and set(heard) <= {(s7.id, "ops-1"), (s8.id, "ops-2")}

    # a clear by worker A is in everyone's list
    observe(worker_a, 240, "d01", {"s1": 1.0, "s2": 9.0, "s3": 9.0})
    code, out = cli("alerts", "list", "-c", conf, "--state", "cleared", "--json")
    assert [json.loads(line)["entity"] for line in out.splitlines()] == ["s1"]
    store_a.close()
    store_b.close()


def _heard(store: KvAlertStore, wanted: tuple[int, str], within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    heard: list[tuple[int, str]] = []
    while wanted not in heard and time.monotonic() < deadline:
        heard += [(r.alert_id, r.by) for r in store.take_acks()]
        time.sleep(0.02)
    return wanted in heard


def test_a_watch_of_the_acks_that_ends_is_started_again(nats_node: LocalNats) -> None:
    """The task following the acks ended for good when its watch ended (nats-py hands an end
    marker, which it then failed on): the worker never heard of another ack, and nothing
    said so. Now the watch is started again, counted and logged, and acks made meanwhile are
    news."""
    config = nats_config([nats_node.url])
    store_a = KvAlertStore.open(config, "worker-a", create=True)
    store_b = KvAlertStore.open(config, "worker-b")
    try:
        store_a.follow_acks()
        first, second, third = raise_alerts(AlertEngine([TPI], store_b), "d02", ["s1", "s2", "s3"])
        assert store_b.acknowledge(first.id, "ops-1").status == "acknowledged"
        assert _heard(store_a, (first.id, "ops-1"))
        watcher = store_a._watcher
        assert watcher is not None
        asyncio.run_coroutine_threadsafe(watcher.stop(), store_a.loop).result(5)  # it ends
        assert store_b.acknowledge(second.id, "ops-2").status == "acknowledged"  # meanwhile
        assert _heard(store_a, (second.id, "ops-2"))
        assert store_b.acknowledge(third.id, "ops-3").status == "acknowledged"  # afterwards
        assert _heard(store_a, (third.id, "ops-3"))
        assert store_a.follower_restarts == 1
    finally:
        store_a.close()
        store_b.close()


def test_ids_stay_unique_when_two_workers_allocate_at_once(nats_node: LocalNats) -> None:
    config = nats_config([nats_node.url])
    stores = [KvAlertStore.open(config, f"w{i}", create=True) for i in range(2)]
    per_worker, got = 150, [[], []]
    start = threading.Barrier(2)

    def allocate(i: int) -> None:
        start.wait()
        for n in range(per_worker):
            alert = Alert(rule="r", entity=f"e{n}", district=f"d{i}", severity="minor",
                          value=1.0, message="m", started_ns=n, updated_ns=n)  # fmt: skip
            stores[i].save([alert])  # one id at a time: the most contention
            got[i].append(alert.id)

    began = time.monotonic()
    threads = [threading.Thread(target=allocate, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - began
    conflicts = sum(store.conflicts for store in stores)
    each_ms = took / per_worker * 1000
    print(f"{2 * per_worker} ids, 2 workers at once: {took:.2f}s ({each_ms:.2f} ms a save each), "
          f"{conflicts} CAS conflicts")  # fmt: skip
    everything = got[0] + got[1]
    assert len(everything) == 2 * per_worker
    assert sorted(everything) == list(range(1, 2 * per_worker + 1))  # unique, no gaps
    assert conflicts > 0  # they did collide, and the compare-and-set sorted it out
    stored = stores[0].select()
    assert [a.id for a in stored] == sorted(everything)
    assert {(a.district, a.entity) for a in stored} == {
        (f"d{i}", f"e{n}") for i in range(2) for n in range(per_worker)
    }
    for store in stores:
        store.close()


def _ack_at_once(stores: list[KvAlertStore], alert_id: int, force: bool = False) -> list[str]:
    results: list[str] = ["", ""]
    start = threading.Barrier(2)

    def ack(i: int) -> None:
        start.wait()
        results[i] = stores[i].acknowledge(alert_id, f"ops-{i + 1}", force=force).status

    threads = [threading.Thread(target=ack, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_two_operators_at_once_one_wins_the_other_needs_force(
    nats_node: LocalNats, tmp_path: Path
) -> None:
    config = nats_config([nats_node.url])
    stores = [KvAlertStore.open(config, f"ops{i}", create=True) for i in range(2)]
    alerts = [Alert(rule="r", entity=f"e{n}", district="d1", severity="minor", value=1.0,
                    message="m", started_ns=n, updated_ns=n) for n in range(20)]  # fmt: skip
    stores[0].save(alerts)
    for alert in alerts:
        outcome = sorted(_ack_at_once(stores, alert.id))
        assert outcome == ["acknowledged", "refused"], (alert.id, outcome)
        (record,) = stores[0].acknowledgements(alert.id)
        assert not record.forced
        stored = stores[1].get(alert.id)
        assert stored is not None and stored.acknowledged_by == record.by
    # with force, both override the one in force (ops-0's), one after the other: all recorded
    held = alerts[0].id
    assert stores[0].acknowledge(held, "ops-0", force=True).status == "acknowledged"
    assert sorted(_ack_at_once(stores, held, force=True)) == ["acknowledged", "acknowledged"]
    trail = stores[0].acknowledgements(held)
    assert [r.forced for r in trail] == [False, True, True, True]
    assert {r.by for r in trail[2:]} == {"ops-1", "ops-2"}
    final = stores[1].get(held)
    assert final is not None and final.acknowledged_by == trail[-1].by
    print(f"CAS conflicts over {len(alerts)} double acks: {sum(s.conflicts for s in stores)}")

    # the same sequence on SQLite gives the same answers (one rule, two stores)
    sqlite = AlertStore(tmp_path / "alerts.sqlite")
    kv = stores[0]
    twins = [Alert(rule="r", entity=f"x{n}", district="d1", severity="minor", value=1.0,
                   message="m", started_ns=n, updated_ns=n) for n in range(2)]  # fmt: skip
    sqlite.save([msgspec.structs.replace(a) for a in twins])
    kv.save(twins)
    steps = [("ops-1", False), ("ops-1", False), ("ops-2", False), ("ops-2", True)]
    for by, force in steps:
        lite = sqlite.acknowledge(1, by, force, at_ns=7)
        nats = kv.acknowledge(twins[0].id, by, force, at_ns=7)
        assert (lite.status, lite.previous_by) == (nats.status, nats.previous_by)
    assert [(r.by, r.forced) for r in sqlite.acknowledgements(1)] == [
        (r.by, r.forced) for r in kv.acknowledgements(twins[0].id)
    ]
    assert kv.acknowledge(99_999, "ops-1").status == "unknown"
    sqlite.close()
    for store in stores:
        store.close()


def _until(what: str, attempt: Callable[[], object], within_s: float) -> float:
    """Seconds until ``attempt()`` succeeded; a NatsError is a failed attempt."""
    began = time.monotonic()
    while True:
        try:
            attempt()
            return time.monotonic() - began
        except NatsError:
            assert time.monotonic() - began < within_s, f"{what}: not within {within_s}s"


def test_store_survives_kill_9_of_the_bucket_leader(nats_cluster: LocalNatsCluster) -> None:
    """R3 bucket; the node leading it is killed; saves and acks work again within the stated
    bound (docs/analytics.md: a store call waits up to 15 s, then NatsError; measured 4-9 s)."""
    config = nats_config(nats_cluster.urls, replicas=3)
    store = KvAlertStore.open(config, "worker-a", create=True)
    other = KvAlertStore.open(config, "worker-b")
    before = [Alert(rule="r", entity=f"e{n}", district="d1", severity="minor", value=1.0,
                    message="m", started_ns=n, updated_ns=n) for n in range(10)]  # fmt: skip
    store.save(before)
    leader = store._run(store.kv.status(), "status").stream_info.cluster.leader
    assert leader in {"n1", "n2", "n3"}
    nats_cluster.kill(int(leader[1:]) - 1)
    after = Alert(rule="r", entity="late", district="d2", severity="minor", value=1.0,
                  message="m", started_ns=1, updated_ns=1)  # fmt: skip
    took_save = _until("save after the kill", lambda: store.save([after]), within_s=20)
    took_ack = _until("ack after the kill",
                      lambda: other.acknowledge(before[3].id, "ops-1"), within_s=20)  # fmt: skip
    print(f"kill -9 of {leader} (bucket leader): a save worked again after {took_save:.2f}s, "
          f"then an ack from the other worker after {took_ack:.2f}s")  # fmt: skip
    assert took_save < 15
    assert after.id == len(before) + 1  # the counter carried on, no id reused
    listed = other.select()
    assert [a.id for a in listed] == list(range(1, len(before) + 2))
    assert [a.acknowledged_by for a in listed if a.acknowledged] == ["ops-1"]
    store.close()
    other.close()


def test_a_missing_bucket_names_nats_init(nats_node: LocalNats) -> None:
    with pytest.raises(NatsError, match="nats init"):
        KvAlertStore.open(nats_config([nats_node.url]), "cli")
