"""Errors that say what to do: the broker URL that was refused and the command that starts
one; a missing recording named before anything is connected (the CLI through CliRunner, real
loopback sockets)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityflux.cli import app
from cityflux.servers import free_port

runner = CliRunner()


def test_simulate_with_no_broker_names_the_url_and_how_to_start_one(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    result = runner.invoke(
        app,
        ["simulate", "rainstorm", "--speed", "max", "--duration", "60",
         "--out-dir", str(tmp_path)],
        env={"CITYFLUX_MQTT__URL": url},
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"no MQTT broker at {url} (connection refused)" in result.output
    assert "cityflux up" in result.output and "Traceback" not in result.output


def test_record_with_no_broker_says_the_same(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = runner.invoke(
        app, ["record", str(tmp_path / "x.cfxrec"), "--duration", "1", "--mqtt-url", url]
    )
    assert result.exit_code == 1 and f"no MQTT broker at {url}" in result.output
    assert not (tmp_path / "x.cfxrec").exists()  # no empty recording left behind


def test_a_recording_that_could_not_start_leaves_an_existing_file_alone(tmp_path: Path) -> None:
    out = tmp_path / "kept.cfxrec"
    out.write_bytes(b"an earlier recording")
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["record", str(out), "--duration", "1", "--mqtt-url", url])
    assert result.exit_code == 1
    assert out.read_bytes() == b"an earlier recording"


def test_replay_of_a_missing_file_names_it_before_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    try:
        result = runner.invoke(
            app,
            ["replay", "missing.cfxrec"],
            env={"CITYFLUX_MQTT__URL": f"mqtt://127.0.0.1:{port}"},
        )
        assert result.exit_code == 1
        assert "no recording at missing.cfxrec" in result.output
        with pytest.raises(BlockingIOError):  # nobody knocked: nothing was connected
            listener.accept()
    finally:
        listener.close()
