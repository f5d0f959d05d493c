"""Engine edge cases: deadman without any traffic data, checkpoints from an older version."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import numpy as np

from cityflux.analytics.engine import AnalyticsEngine, Output
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.model.columns import Columns
from cityflux.model.points import Result
from cityflux.store.lineprotocol import TableEncoder

T0_MS = 1_795_561_200_000  # 2026-11-25T07:00:00+08:00


def config_in(path: Path) -> Config:
    return Config().with_overrides(
        {
            "analytics.checkpoint_dir": str(path),
            "analytics.alerts_db": str(path / "alerts.sqlite"),
            "ingest.max_past_s": 10**9,
        }
    )


def lines_of(out: Output) -> list[str]:
    """The output's result tables and alert points as the pipeline writes them."""
    return TableEncoder().encode(out.results)


def poles(config: Config, readings: list[tuple[str, int]]) -> dict[str, Columns]:
    """Pole readings (device, ts ms) through the real decoder and validator."""
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    topics = [f"cityflux/v1/centre/pole/{device}" for device, _ in readings]
    payloads = [msgspec.json.encode({"ts": ts, "noise_dba": 50.0}) for _, ts in readings]
    now = (T0_MS + 86_400_000) * 1_000_000
    columns = decoder.decode(topics, payloads, now).columns
    return {k: validate(c, config.ingest, now)[0] for k, c in columns.items()}


def test_deadman_fires_on_pole_data_alone(tmp_path: Path) -> None:
    config = config_in(tmp_path)  # the example map: two poles, no traffic sent at all
    engine = AnalyticsEngine(config.analytics)
    engine.process(poles(config, [("pole-0001", T0_MS), ("pole-0107", T0_MS)]))
    raised = []
    for minute in range(1, 20):  # pole-0107 falls silent; pole-0001 keeps reporting
        out = engine.process(poles(config, [("pole-0001", T0_MS + minute * 60_000)]))
        raised += [a for a in out.alerts if a.rule == "pole_silent"]
    engine.close()
    assert [(a.entity, a.state) for a in raised] == [("pole-0107", "active")]
    silent_for = (raised[0].started_ns - T0_MS * 1_000_000) / 1e9
    assert 600 <= silent_for <= 600 + 120 + 60  # the rule's 600 s, plus delay and a minute


def test_a_checkpoint_from_an_older_version_still_loads(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    engine = AnalyticsEngine(config.analytics)
    engine.process(poles(config, [("pole-0001", T0_MS)]))
    engine.close()
    path = tmp_path / "windows.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k not in ("stuck_count", "last_station_speed")}
    np.savez(path, **arrays)  # as written before stuck detection existed
    again = AnalyticsEngine(config.analytics)
    assert again.watermark.newest_ns == T0_MS * 1_000_000
    again.close()


def traffic(config: Config, readings: list[tuple[str, int, int]]) -> dict[str, Columns]:
    """Detector readings (device, ts ms, vehicles per lane) through decoder and validator."""
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    topics = [f"cityflux/v1/centre/traffic/{device}" for device, _, _ in readings]
    payloads = [
        msgspec.json.encode({"ts": ts, "interval_s": 60, "lanes": [
            {"lane": n, "count": count, "occupancy_pct": 5.0,
             "speed_kmh": 60.0 + ts // 60_000 % 7}  # varies: a constant one is a stuck sensor
            for n in (1, 2, 3)
        ]})
        for _, ts, count in readings
    ]  # fmt: skip
    now = (T0_MS + 86_400_000) * 1_000_000
    columns = decoder.decode(topics, payloads, now).columns
    return {k: validate(c, config.ingest, now)[0] for k, c in columns.items()}


def test_a_late_reading_updates_every_sliding_window_that_contains_it(tmp_path: Path) -> None:
    config = config_in(tmp_path).with_overrides(
        {"analytics.delay_s": 0, "analytics.lateness_s": 600}
    )
    engine = AnalyticsEngine(config.analytics)
    for minute in range(8):
        engine.process(traffic(config, [("det-0001", T0_MS + minute * 60_000, 10)]))
    # det-0002 (the same road) for minute 1 arrives late, within the allowed lateness
    lines = lines_of(engine.process(traffic(config, [("det-0002", T0_MS + 60_000, 30)])))
    engine.close()
    ends = sorted(
        int(line.rsplit(" ", 1)[1]) // 60_000_000_000 - T0_MS // 60_000
        for line in lines
        if line.startswith("traffic_segment,") and "segment=seg-0001" in line
        and "window=5m" in line
    )  # fmt: skip
    assert ends == [2, 3, 4, 5, 6]  # the window of minute 1 and the four after it


def test_one_device_clock_ahead_neither_closes_the_minute_nor_makes_readings_too_late(
    tmp_path: Path,
) -> None:
    """Wall clock at T0 + 1 h: det-0001 reports every minute on time, det-0002's clock runs
    300 s ahead (inside ingest.max_future_s). Event time stays with the wall clock."""
    config = config_in(tmp_path)
    engine = AnalyticsEngine(config.analytics)
    now_ms = T0_MS + 3_600_000 + 30_000  # half a minute into the current minute
    out = engine.process(
        traffic(config, [("det-0001", now_ms - 1_000, 10), ("det-0002", now_ms + 300_000, 10)]),
        now_ns=now_ms * 1_000_000,
    )
    assert engine.watermark.newest_ns == (now_ms + 5_000) * 1_000_000  # capped: now + 5 s
    assert engine.watermark.ahead_ns == (now_ms + 300_000) * 1_000_000
    late = engine.process(
        traffic(config, [("det-0001", now_ms - 200_000, 10)]), now_ns=now_ms * 1_000_000
    )
    assert late.too_late == [] and engine.counts["too_late"] == 0  # 200 s old: on time
    # windows written: only those the honest clocks completed (end <= now + 5 s - 120 s), the
    # 200-s-old reading's among them; not the current minute (was: everything up to now + 180 s)
    ends = {int(line.rsplit(" ", 1)[1]) for line in lines_of(out) + lines_of(late)
            if line.startswith("traffic_segment,")}  # fmt: skip
    assert ends == {(now_ms - 200_000) // 60_000 * 60_000 * 1_000_000 + 60 * 1_000_000_000}
    assert max(ends) <= (now_ms + 5_000 - 120_000) * 1_000_000
    # the skewed reading is in its own (future) pane, emitted when event time gets there
    ahead = (now_ms + 300_000) // 60_000 * 60_000 * 1_000_000
    assert engine.traffic.panes[ahead].rows()["entity"].tolist() == [16, 17, 18]
    # an idle flush closes what the wall clock has reached, not the future pane
    engine.flush(now_ns=now_ms * 1_000_000)
    assert not engine.traffic.panes[ahead].emitted
    assert engine.traffic.panes[now_ms // 60_000 * 60_000 * 1_000_000].emitted
    engine.flush(now_ns=(now_ms + 300_000) * 1_000_000)  # the wall clock caught up
    assert engine.traffic.panes[ahead].emitted
    engine.close()


def test_window_results_whose_write_fails_are_kept_and_written_next_time(tmp_path: Path) -> None:
    """The worker caught a failed write and dropped the lines it had computed: windows lost
    silently. Now they are kept, counted, and delivered with the next results."""
    config = config_in(tmp_path).with_overrides({"analytics.delay_s": 0})
    engine = AnalyticsEngine(config.analytics)
    encoder = TableEncoder()
    written: list[str] = []
    failed: list[str] = []
    errors: list[int] = []
    beats: list[int] = []

    def deliver(results: list[Result]) -> None:
        lines = encoder.encode(results)
        if not failed:
            failed.extend(lines)
            raise OSError("injected: the database write failed")
        written.extend(lines)

    engine.on_worker_error = lambda: errors.append(1)
    engine.windows_in_background(deliver)
    worker = threading.Thread(target=engine.work, args=(lambda: beats.append(1),))
    worker.start()
    for minute in range(4):
        engine.process(traffic(config, [("det-0001", T0_MS + minute * 60_000, 10)]))
        time.sleep(0.6)  # the worker wakes at least every 0.5 s
    engine.stop()
    worker.join(timeout=30)
    assert not worker.is_alive()
    engine.close()
    assert len(beats) >= 4  # a beat per round, for the supervisor's watchdog
    assert failed, "nothing was computed: the test proves nothing"
    assert set(failed) <= set(written)
    assert errors == [1]


def test_a_late_update_is_written_after_the_version_it_replaces(tmp_path: Path) -> None:
    """Window results were written by whichever thread computed them: the worker, or the
    caller of flush() (an idle tick, the end of a run) through the commit threads. A window
    emitted twice could so reach the database newest first, and its stale version won (points
    overwrite): the one-vs-three-workers test saw different 5-minute rows about one run in
    five. Now every result goes through one ordered queue and one writer at a time."""
    config = config_in(tmp_path).with_overrides(
        {"analytics.delay_s": 0, "analytics.lateness_s": 600}
    )
    engine = AnalyticsEngine(config.analytics)
    encoder = TableEncoder()
    written: list[str] = []
    first_write = threading.Event()
    release = threading.Event()

    def deliver(results: list[Result]) -> None:
        lines = encoder.encode(results)
        if not first_write.is_set():  # the worker's first write is slow (a busy database)
            first_write.set()
            assert release.wait(10)
        written.extend(lines)

    def written_by_caller(out: Output) -> None:  # what the pipeline does with flush()'s output
        written.extend(encoder.encode(out.results))

    engine.windows_in_background(deliver)
    worker = threading.Thread(target=engine.work)
    worker.start()
    engine.process(traffic(config, [("det-0001", T0_MS, 10)]))
    engine.process(traffic(config, [("det-0001", T0_MS + 60_000, 10)]))  # minute 0 complete
    assert first_write.wait(10), "the worker never wrote minute 0"
    # minute 0's late reading, and a flush on another thread while the first write is slow
    engine.process(traffic(config, [("det-0001", T0_MS + 30_000, 50)]))
    flusher = threading.Thread(target=lambda: written_by_caller(engine.flush()))
    flusher.start()
    time.sleep(0.5)  # the flush has computed the update by now
    release.set()
    flusher.join(timeout=10)
    engine.stop()
    worker.join(timeout=10)
    engine.close()
    minute_0 = [
        line for line in written
        if line.startswith("traffic_segment,") and "segment=seg-0001" in line
        and "window=1m" in line and line.endswith(f" {(T0_MS + 60_000) * 1_000_000}")
    ]  # fmt: skip
    assert len(minute_0) >= 2, written  # emitted, then updated by the late reading
    flows = [float(line.split("flow_vph=")[1].split(",")[0].rstrip("i")) for line in minute_0]
    assert flows[-1] == max(flows) > flows[0]  # the update (60 vehicles a lane) written last
