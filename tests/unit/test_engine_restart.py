"""The analytics engine stopped in the middle of windows and restarted from its checkpoint
(a real file) computes the same indices as one that never stopped, even when the messages
around the stop are delivered twice."""

from __future__ import annotations

import errno
import io
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cityflux.analytics.engine import AnalyticsEngine
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.model.columns import Columns
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from tests.unit.test_engine_edges import T0_MS, lines_of, poles

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
        lines += lines_of(straight.process(batch))
    lines += lines_of(straight.flush())
    straight.close()

    config = config_in(tmp_path / "restarted")
    half = len(work) // 2
    first = AnalyticsEngine(config.analytics, city=sim.city)
    restarted: list[str] = []
    for batch in work[:half]:
        restarted += lines_of(first.process(batch))
    first.close()  # checkpoint; the process ends here
    second = AnalyticsEngine(config.analytics, city=sim.city)
    assert second.traffic.panes  # open windows came back from the checkpoint
    for batch in work[half - 2 :]:  # the broker redelivers the last unacknowledged batches
        restarted += lines_of(second.process(batch))
    restarted += lines_of(second.flush())
    second.close()

    expected = segment_points(lines)
    assert len(expected) > 5_000
    assert segment_points(restarted) == expected


# -- a corrupt checkpoint -------------------------------------------------------------------
def real_checkpoint(tmp_path: Path) -> tuple[Config, Simulation, bytes]:
    """A checkpoint written by an engine stopped mid-rush-hour: open panes, partials,
    California history; its bytes."""
    config = config_in(tmp_path)
    sim, work = batches(config)
    engine = AnalyticsEngine(config.analytics, city=sim.city)
    for batch in work[: len(work) // 2]:
        engine.process(batch)
    engine.close()
    return config, sim, (tmp_path / "windows.npz").read_bytes()


def rewritten(data: bytes, change: Callable[[dict[str, np.ndarray]], None]) -> bytes:
    """The checkpoint, a valid zip again, with some arrays changed."""
    with np.load(io.BytesIO(data)) as loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    change(arrays)
    out = io.BytesIO()
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def pane_column(arrays: dict[str, np.ndarray], column: str) -> str:
    return next(k for k in arrays if k.startswith("traffic|") and k.endswith(f"|{column}"))


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda data: b"\x89 not a zip file at all \x00" * 40,
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],  # a torn write: BadZipFile
    "tail cut": lambda data: data[:-7],  # the end of the central directory
    "bit flip": lambda data: flip(data, len(data) // 3),  # a bad CRC or a bad array
    "missing key": lambda data: rewritten(data, lambda a: a.pop("california_active")),
    "wrong shape": lambda data: rewritten(data, lambda a: a.update(manhole_level=np.zeros(3))),
    "wrong dtype": lambda data: rewritten(
        data, lambda a: a.update(watermark=a["watermark"].astype(np.float64))
    ),
    "ragged pane": lambda data: rewritten(
        data, lambda a: a.update({pane_column(a, "count"): np.zeros(1, dtype=np.int64)})
    ),
    "entity out of range": lambda data: rewritten(
        data, lambda a: a.update({pane_column(a, "entity"): a[pane_column(a, "entity")] + 10**9})
    ),
    "unknown array": lambda data: rewritten(data, lambda a: a.update(bogus=np.zeros(1))),
}


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Simulation, bytes]:
    _, sim, data = real_checkpoint(tmp_path_factory.mktemp("real"))
    return sim, data


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_set_aside_and_the_engine_starts_cold(
    corruption: str, tmp_path: Path, checkpoint_bytes: tuple[Simulation, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sim, data = checkpoint_bytes
    config = config_in(tmp_path)
    bad = CORRUPTIONS[corruption](data)
    assert bad != data
    (tmp_path / "windows.npz").write_bytes(bad)
    engine = AnalyticsEngine(config.analytics, city=sim.city)  # raised before: no start
    # as after a kill before the first checkpoint: nothing restored, the recovery horizon
    # (what link.recover re-reads from InfluxDB) taken from the wall clock
    assert engine.watermark.newest_ns == 0 and not engine.traffic.panes
    assert not engine.station_parts and not engine.california.history
    assert engine.counts["checkpoint_corrupt"] == 1
    now = time.time_ns()
    assert engine.recovery_since_ns(now) == now - (120 + 300 + 300) * 1_000_000_000
    assert not (tmp_path / "windows.npz").exists()
    assert (tmp_path / "windows.npz.corrupt").read_bytes() == bad  # kept for a post-mortem
    assert any(
        r.levelname == "ERROR" and "windows.npz.corrupt" in r.getMessage() for r in caplog.records
    )
    engine.close()  # and its own checkpoint is good again
    again = AnalyticsEngine(config.analytics, city=sim.city)
    assert again.counts["checkpoint_corrupt"] == 0
    again.close()


def test_a_second_corrupt_checkpoint_never_overwrites_the_first(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    (tmp_path / "windows.npz").write_bytes(b"first")
    AnalyticsEngine(config.analytics).close()  # writes a good checkpoint
    (tmp_path / "windows.npz").write_bytes(b"second")
    AnalyticsEngine(config.analytics).close()
    assert (tmp_path / "windows.npz.corrupt").read_bytes() == b"first"
    (later,) = tmp_path.glob("windows.npz.*-0.corrupt")
    assert later.read_bytes() == b"second"


def test_the_restored_engine_after_a_good_checkpoint_matches_its_state(tmp_path: Path) -> None:
    """The checks that catch corruption accept every real checkpoint (rush hour, half-way)."""
    config, sim, _ = real_checkpoint(tmp_path)
    engine = AnalyticsEngine(config.analytics, city=sim.city)
    assert engine.counts["checkpoint_corrupt"] == 0
    assert engine.traffic.panes and engine.station_parts and engine.california.history
    engine.close()


# -- writing: the old checkpoint survives a failed write; private files ----------------------
WRITE_THEN_FAIL = """
import sys
from pathlib import Path
from cityflux.analytics import checkpoint
import numpy as np
path = Path(sys.argv[1])
try:
    checkpoint.write(path, {"big": np.arange(1_000_000)})  # 8 MB: past the file size limit
except OSError as exc:
    print(exc.errno)
"""


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    """A write cut short (here: the file size limit, EFBIG, as a full disk would give ENOSPC)
    leaves the last good checkpoint in place, loadable, and no temporary file."""
    config = config_in(tmp_path)
    engine = AnalyticsEngine(config.analytics)
    engine.process(poles(config, [("pole-0001", T0_MS)]))
    engine.close()
    path = tmp_path / "windows.npz"
    before = path.read_bytes()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    child = subprocess.run(
        [sys.executable, "-c", WRITE_THEN_FAIL, str(path)], preexec_fn=limit,
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert child.stdout.strip() == str(errno.EFBIG)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "windows" in p.name) == ["windows.npz"]
    again = AnalyticsEngine(config.analytics)
    assert again.watermark.newest_ns == T0_MS * 1_000_000 and not again.counts
    again.close()


def test_checkpoint_and_alert_database_are_the_owners_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = config_in(state)
    old = state / "alerts.sqlite"  # as an older version left it: world-readable
    state.mkdir()
    sqlite3.connect(old).close()
    old.chmod(0o644)
    engine = AnalyticsEngine(config.analytics)
    engine.process(poles(config, [("pole-0001", T0_MS)]))
    engine.checkpoint()
    assert engine.alerts.store.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    engine.close()
    assert modes == {"alerts.sqlite": 0o600, "alerts.sqlite-wal": 0o600,
                     "alerts.sqlite-shm": 0o600, "windows.npz": 0o600}  # fmt: skip
    fresh = tmp_path / "fresh" / "analytics"
    AnalyticsEngine(config_in(fresh).analytics).close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in fresh.iterdir()} == {0o600}
