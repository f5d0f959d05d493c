"""The commit path under faults: it never dies silently, never acknowledges unstored data,
and /healthz says what is wrong while it is wrong.

Each test injects one fault into the real pipeline (real mosquitto, real InfluxDB): a broker
that vanishes while dead letters are published, an exception inside a commit, a spool that
cannot be written (ENOSPC), a commit that hangs. Only the fault is injected; everything else
is the shipped code path.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from cityflux.config import Config
from cityflux.errors import SpoolError
from cityflux.model.messages import MessageBatch
from cityflux.pipeline.pipeline import BatchOutcome, Pipeline
from cityflux.servers import LocalMosquitto
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import encode_point
from cityflux.store.sink import SinkResult
from tests.support import Subscriber, count_points, publish_all, running, wait_for

NOW_MS = int(time.time() * 1000) - 60_000


def pole(i: int) -> tuple[str, bytes]:
    return (
        f"cityflux/v1/centre/pole/pole-{i % 7}",
        f'{{"ts": {NOW_MS + i}, "pm25_ugm3": {i}.5}}'.encode(),
    )


def healthz(pipeline: Pipeline) -> tuple[int, dict[str, Any]]:
    assert pipeline.server is not None
    url = f"http://127.0.0.1:{pipeline.server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def acked_all(pipeline: Pipeline, at_least: int) -> bool:
    """Every received message acknowledged (cityflux's own retained status message included)."""
    acked = pipeline.metrics.value("messages_acked_total")
    return acked >= at_least and acked == pipeline.metrics.value("messages_received_total")


def no_analytics(config: Config, **overrides: object) -> Config:
    return config.with_overrides({"analytics.enabled": False, **overrides})


def fail_first(
    real: Callable[[list[str]], SinkResult], error: Exception, times: int
) -> Callable[[list[str]], SinkResult]:
    calls = {"n": 0}

    def write(lines: list[str]) -> SinkResult:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return real(lines)

    return write


def test_dead_letters_while_the_broker_is_gone_do_not_kill_the_commit(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    """paho's wait_for_publish raised RuntimeError on a disconnected client: the commit
    thread died and, after write_concurrency such deaths, nothing was committed again."""
    pipeline = Pipeline(no_analytics(config))
    with running(pipeline):
        broker.stop()
        wait_for(lambda: not pipeline.source.publisher.is_connected(), 10, "publisher down")
        line = encode_point("pole", {"device": "direct"}, {"pm25_ugm3": 1.5}, NOW_MS * 10**6)
        letter = ("cityflux/v1/deadletter/schema", b'{"reason":"schema"}')
        outcome = BatchOutcome(lines=[line], letters=[letter])
        assert pipeline.commit(MessageBatch(), outcome) is True  # raised before the fix
        assert count_points(db, "pole", "pm25_ugm3") == 1
        broker.start()
        watcher = Subscriber(broker.port, "cityflux/v1/deadletter/#")
        try:
            wait_for(pipeline.source.is_connected, 20, "reconnect")
            publish_all(broker.port, [pole(i) for i in range(50)] + [("x/bad", b"")])
            publish_all(broker.port, [("cityflux/v1/centre/pole/p-1", b"not json")])
            wait_for(lambda: count_points(db, "pole", "pm25_ugm3") == 51, 20, "51 points")
            wait_for(lambda: watcher.messages, 10, "the new dead letter")
        finally:
            watcher.close()
        assert pipeline.metrics.value("component_restarts_total", component="commit-0") == 0
        assert healthz(pipeline)[0] == 200


def test_an_exception_in_a_commit_restarts_it_and_retries_the_batch(
    config: Config, broker: LocalMosquitto, db: InfluxWriter
) -> None:
    pipeline = Pipeline(no_analytics(config, **{"supervision.restart_min_s": 0.05}))
    pipeline.sink.write = fail_first(  # type: ignore[method-assign]
        pipeline.sink.write, RuntimeError("injected commit fault"), times=1
    )
    with running(pipeline):
        publish_all(broker.port, [pole(i) for i in range(100)])
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") == 100, 20, "100 points")
        wait_for(lambda: acked_all(pipeline, at_least=100), 10, "every message acknowledged")
        restarts = sum(
            pipeline.metrics.value("component_restarts_total", component=f"commit-{i}")
            for i in range(config.ingest.write_concurrency)
        )
        assert restarts == 1
        assert pipeline.metrics.value("commit_errors_total", error="RuntimeError") == 1
        # the other commit thread may have committed the retried batch while this one was
        # still in its restart backoff ("down" in /healthz until it runs again)
        wait_for(lambda: healthz(pipeline)[0] == 200, 10, "healthy once restarted")


def test_an_unwritable_spool_holds_acks_and_says_so(
    config: Config, broker: LocalMosquitto, db: InfluxWriter
) -> None:
    """ENOSPC on the spool (SpoolError, not SpoolFull) killed the commit thread; now the
    acknowledgement waits, /healthz is 503 with the reason, and nothing is lost."""
    pipeline = Pipeline(no_analytics(config))
    broken = threading.Event()
    broken.set()
    real = pipeline.sink.write

    def write(lines: list[str]) -> SinkResult:
        if broken.is_set():
            raise SpoolError("cannot append to spool: [Errno 28] No space left on device")
        return real(lines)

    pipeline.sink.write = write  # type: ignore[method-assign]
    with running(pipeline):
        publish_all(broker.port, [pole(i) for i in range(20)])
        wait_for(lambda: healthz(pipeline)[0] == 503, 10, "503")
        _status, body = healthz(pipeline)
        assert "No space left on device" in body["problems"]["store"]
        assert pipeline.metrics.value("messages_acked_total") == 0
        assert count_points(db, "pole", "pm25_ugm3") == 0
        broken.clear()  # the operator freed some disk
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") == 20, 20, "20 points")
        wait_for(lambda: acked_all(pipeline, at_least=20), 10, "every message acknowledged")
        wait_for(lambda: healthz(pipeline)[0] == 200, 10, "healthy again")
        assert (
            sum(
                pipeline.metrics.value("component_restarts_total", component=f"commit-{i}")
                for i in range(config.ingest.write_concurrency)
            )
            == 0
        )


def test_a_hung_commit_is_seen_by_the_watchdog(
    config: Config, broker: LocalMosquitto, db: InfluxWriter
) -> None:
    """Connected to the broker, nothing crashed, yet nothing moves: /healthz must say so."""
    pipeline = Pipeline(no_analytics(config, **{"supervision.stall_after_s": 1.0}))
    release = threading.Event()
    real = pipeline.sink.write

    def hang(lines: list[str]) -> SinkResult:
        release.wait(30)
        return real(lines)

    pipeline.sink.write = hang  # type: ignore[method-assign]
    with running(pipeline):
        assert healthz(pipeline)[0] == 200
        publish_all(broker.port, [pole(i) for i in range(10)])
        wait_for(lambda: healthz(pipeline)[0] == 503, 10, "503 from the watchdog")
        problems = healthz(pipeline)[1]["problems"]
        assert any(
            name.startswith("commit-") and "no progress" in text for name, text in problems.items()
        ), problems
        assert pipeline.source.is_connected()
        release.set()
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") == 10, 20, "10 points")
        wait_for(lambda: healthz(pipeline)[0] == 200, 10, "healthy again")


def test_a_commit_that_keeps_failing_ends_run_with_the_reason(
    config: Config, broker: LocalMosquitto, db: InfluxWriter
) -> None:
    """A live process that does nothing is not allowed: the supervisor gives up, run()
    returns and `cityflux run` exits non-zero (tests/adversarial/test_exit.py)."""
    overrides = {"supervision.restart_min_s": 0.01, "supervision.max_restarts": 2}
    pipeline = Pipeline(no_analytics(config, **overrides))
    pipeline.sink.write = fail_first(  # type: ignore[method-assign]
        pipeline.sink.write, RuntimeError("always"), times=10**9
    )
    with running(pipeline):
        publish_all(broker.port, [pole(i) for i in range(5)])
        assert pipeline.wait(20), "run() went on with a dead commit path"
        assert pipeline.runner is not None
        pipeline.runner.join(5)
        assert not pipeline.runner.is_alive()
        assert pipeline.failure is not None
        assert "failed 3 times" in pipeline.failure and "RuntimeError: always" in pipeline.failure
        assert pipeline.metrics.value("messages_acked_total") == 0


def crash_once(target: Any, name: str) -> None:
    """Make ``target.name`` raise on its first call only, as a bug would."""
    real = getattr(target, name)
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(f"injected crash in {name}")
        return real(*args, **kwargs)

    setattr(target, name, flaky)


@pytest.mark.parametrize(
    ("component", "owner", "method"),
    [("mqtt-reader", "source", "_serve"), ("spool-drain", "sink", "drain_loop")],
)
def test_a_crashed_background_component_is_restarted_and_counted(
    config: Config,
    broker: LocalMosquitto,
    db: InfluxWriter,
    component: str,
    owner: str,
    method: str,
) -> None:
    pipeline = Pipeline(no_analytics(config, **{"supervision.restart_min_s": 0.05}))
    crash_once(getattr(pipeline, owner), method)
    with running(pipeline):
        wait_for(
            lambda: pipeline.metrics.value("component_restarts_total", component=component) == 1,
            10,
            f"{component} restarted",
        )
        assert pipeline.supervisor.components[component].thread.is_alive()  # type: ignore[union-attr]
        publish_all(broker.port, [pole(i) for i in range(10)])
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") == 10, 20, "10 points")
        wait_for(lambda: healthz(pipeline)[0] == 200, 10, "healthy")


def test_an_idle_commit_thread_is_not_stalled_while_another_commits(
    config: Config, broker: LocalMosquitto, db: InfluxWriter
) -> None:
    """The watchdog judges each commit thread by its own work: one waiting for a batch while
    the other commits is idle, not stalled (a false 503 would page someone for nothing)."""
    overrides = {"supervision.stall_after_s": 1.0, "metrics.health_interval_s": 0}
    pipeline = Pipeline(no_analytics(config, **overrides))
    real = pipeline.sink.write
    writing = threading.Event()

    def slow(lines: list[str]) -> SinkResult:
        if any(line.startswith("pole") for line in lines):
            writing.set()
            time.sleep(0.8)  # busy, but well within stall_after_s
        return real(lines)

    pipeline.sink.write = slow  # type: ignore[method-assign]
    with running(pipeline):
        time.sleep(1.5)  # both commit threads idle for longer than stall_after_s
        publish_all(broker.port, [pole(0)])  # one batch: one thread busy, one idle
        assert writing.wait(10)
        status, body = healthz(pipeline)
        assert status == 200, body
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") == 1, 20, "the point")


def test_a_failing_step_of_close_does_not_skip_the_others(
    config: Config, broker: LocalMosquitto, db: InfluxWriter
) -> None:
    """A final checkpoint on a full disk raised out of close() before the broker connection,
    the drain and the spool were closed."""
    pipeline = Pipeline(config)  # with analytics: their close writes the final checkpoint
    assert pipeline.analytics is not None
    real_close = pipeline.analytics.close

    def full_disk() -> None:
        real_close()
        raise OSError(28, "No space left on device")

    pipeline.analytics.close = full_disk  # type: ignore[method-assign]
    with pytest.raises(OSError, match="No space left"), running(pipeline):
        pass
    assert not pipeline.source.is_connected()
    assert not pipeline.source.publisher.is_connected()
    assert all(
        c.thread is None or not c.thread.is_alive() for c in pipeline.supervisor.components.values()
    )
    with pytest.raises(SpoolError, match="closed"):
        pipeline.spool.append(b"x", gzip=False)
