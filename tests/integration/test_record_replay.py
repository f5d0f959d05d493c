"""`cityflux record` and `cityflux replay` as users run them, against real brokers: the replay
is exact (order, payloads, retain flags), its timing is scaled, and a recorded simulated run
replayed through a second pipeline gives the same readings in InfluxDB."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalInfluxDB, LocalMosquitto
from cityflux.simulators.recording import (
    Header,
    Recorder,
    RecordingWriter,
    ReplayPlan,
    read_recording,
)
from cityflux.simulators.runner import run_replay
from cityflux.store.influx import InfluxWriter
from tests.support import ROOT, running, select, wait_for

MEASUREMENTS = ("pole", "manhole", "traffic", "device_status")


def cityflux(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cityflux", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,  # type: ignore[call-overload]
    )


def finish(process: subprocess.Popen[bytes], timeout: float = 120) -> str:
    out, _ = process.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    return text


def rows(db: InfluxWriter) -> dict[str, list[dict[str, object]]]:
    return {m: select(db, f'SELECT * FROM "{m}" GROUP BY *') for m in MEASUREMENTS}


def second_config(config: Config, broker: LocalMosquitto, tmp_path: Path) -> Config:
    name = f"test_{uuid.uuid4().hex[:12]}"
    return config.with_overrides(
        {
            "mqtt.url": broker.url,
            "mqtt.client_id": f"cityflux-{name}",
            "influx.database": name,
            "spool.dir": str(tmp_path / "spool2"),
            "analytics.checkpoint_dir": str(tmp_path / "analytics2"),
            "analytics.alerts_db": str(tmp_path / "analytics2" / "alerts.sqlite"),
        }
    )


def test_recorded_simulation_replays_to_the_same_readings(
    config: Config, db: InfluxWriter, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    recording = tmp_path / "run.cfxrec"
    with running(Pipeline(config)):
        recorder = cityflux("record", str(recording), "--mqtt-url", config.mqtt.url)
        assert recorder.stdout is not None
        assert b"subscribed to" in recorder.stdout.readline()  # before the simulation starts
        out = finish(
            cityflux(
                "simulate", "normal-weekday", "--duration", "600", "--mqtt-url", config.mqtt.url,
                "--out-dir", str(tmp_path / "out"),
            )
        )  # fmt: skip
        assert "messages published" in out and "ground truth" in out
        expected = msgspec.json.decode((tmp_path / "out/normal-weekday/expected.json").read_bytes())
        wait_for(
            lambda: (
                all(len(v) for v in rows(db).values())
                and sum(len(r) for r in rows(db).values()) >= sum(expected["points"].values())
            ),
            timeout=60,
            what="the simulated run in InfluxDB",
        )
        recorder.send_signal(signal.SIGINT)
        assert "recorded" in finish(recorder)
    original = rows(db)
    header, records = read_recording(recording)
    recorded = list(records)
    own = ("/health/", "/alerts/", "/deadletter/")  # cityflux's own messages, not devices'
    device_messages = [r for r in recorded if not any(part in r[1] for part in own)]
    assert len(device_messages) == expected["messages"]
    assert header.source == config.mqtt.url

    with LocalMosquitto(tmp_path / "broker2") as broker2:
        config2 = second_config(config, broker2, tmp_path)
        db2 = InfluxWriter(config2.influx)
        with running(Pipeline(config2)):
            finish(cityflux("replay", str(recording), "--speed", "max", "--mqtt-url", broker2.url))
            wait_for(lambda: rows(db2) == original, timeout=60, what="the replay equal in InfluxDB")
        db2.query(f'DROP DATABASE "{config2.influx.database}"', method="POST")
        db2.close()
    assert sum(len(r) for r in original.values()) == sum(expected["points"].values())


def test_replay_is_exact_and_scales_time(tmp_path: Path, broker: LocalMosquitto) -> None:
    source = tmp_path / "source.cfxrec"
    writer = RecordingWriter(source, Header())
    offsets_s = [0.0, 0.2, 0.5, 0.9, 1.4]
    for i, offset in enumerate(offsets_s):
        topic = f"cityflux/v1/d01/pole/p{i}" + ("/status" if i == 2 else "")
        payload = b'{"state":"online"}' if i == 2 else b'{"ts":%d,"noise_dba":50.5}' % i
        writer.write(round(offset * 1e9), topic, payload, i == 2)
    writer.close()
    copy = tmp_path / "copy.cfxrec"
    recorder = Recorder(Config().with_overrides({"mqtt.url": broker.url}).mqtt, copy, "#")
    recorder.start()
    summary = run_replay(
        source, ReplayPlan(speed=2.0), Config().with_overrides({"mqtt.url": broker.url}).mqtt
    )
    wait_for(lambda: recorder.count >= len(offsets_s), timeout=10, what="all replayed")
    # live delivery clears the retain flag (MQTT 3.1.1 section 3.3.1.3): the source's retained
    # message arrives as retained only for a subscriber that joins later
    recorder.stop()
    assert summary.messages == len(offsets_s)
    _, original = read_recording(source)
    _, replayed = read_recording(copy)
    want, got = list(original), list(replayed)
    assert [r[1:3] for r in got] == [r[1:3] for r in want]  # order, topic, payload
    for (w_offset, *_), (g_offset, *_) in zip(want, got, strict=True):
        assert abs(g_offset / 1e9 - w_offset / 1e9 / 2.0) < 0.05  # half the original gaps
