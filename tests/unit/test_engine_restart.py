"""The analytics engine stopped in the middle of windows and restarted from its checkpoint
(a real file) computes the same indices as one that never stopped, even when the messages
around the stop are delivered twice."""

from __future__ import annotations

from pathlib import Path

from cityflux.analytics.engine import AnalyticsEngine
from cityflux.config import Config
from cityflux.ingest.batch import Columns
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation

START = 1_795_561_200.0  # 2026-11-25T07:00:00+08:00


def batches(config: Config) -> tuple[Simulation, list[dict[str, Columns]]]:
    scenario = load_scenario(
        "rush-hour-incident", {"clock.duration_s": 3_600.0, "publish.births": False}
    )
    sim = Simulation(scenario, START)
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    out: list[dict[str, Columns]] = []
    topics: list[str] = []
    payloads: list[bytes] = []
    now = round((START + 7_200) * 1e9)

    def cut() -> None:
        decoded = decoder.decode(topics, payloads, now)
        out.append({k: validate(c, config.ingest, now)[0] for k, c in decoded.columns.items()})
        topics.clear()
        payloads.clear()

    for tick in sim.ticks():
        for topic, payload, _ in tick.messages:
            topics.append(topic)
            payloads.append(payload)
        if len(topics) >= 3_000:
            cut()
    if topics:
        cut()
    return sim, out


def segment_points(lines: list[str]) -> dict[str, str]:
    """The last value written per series and time (points overwrite)."""
    points: dict[str, str] = {}
    for line in lines:
        if line.startswith("traffic_segment,"):
            series, fields, ts = line.rsplit(" ", 2)
            points[f"{series} {ts}"] = fields
    return points


def config_in(path: Path) -> Config:
    return Config().with_overrides(
        {
            "analytics.checkpoint_dir": str(path),
            "analytics.alerts_db": str(path / "alerts.sqlite"),
            "ingest.max_past_s": 10**9,
        }
    )


def test_restart_mid_window_gives_the_same_indices(tmp_path: Path) -> None:
    config = config_in(tmp_path / "straight")
    sim, work = batches(config)
    straight = AnalyticsEngine(config.analytics, city=sim.city)
    lines: list[str] = []
    for batch in work:
        lines += straight.process(batch).lines
    lines += straight.flush().lines
    straight.close()

    config = config_in(tmp_path / "restarted")
    half = len(work) // 2
    first = AnalyticsEngine(config.analytics, city=sim.city)
    restarted: list[str] = []
    for batch in work[:half]:
        restarted += first.process(batch).lines
    first.close()  # checkpoint; the process ends here
    second = AnalyticsEngine(config.analytics, city=sim.city)
    assert second.traffic.panes  # open windows came back from the checkpoint
    for batch in work[half - 2 :]:  # the broker redelivers the last unacknowledged batches
        restarted += second.process(batch).lines
    restarted += second.flush().lines
    second.close()

    expected = segment_points(lines)
    assert len(expected) > 5_000
    assert segment_points(restarted) == expected
