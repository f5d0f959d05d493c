"""`cityflux run` whose commit path keeps failing exits non-zero (systemd/compose restart it)
instead of living on without committing anything."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from cityflux.config import Config
from cityflux.servers import LocalMosquitto, free_port
from tests.support import ROOT, config_env, publish_all

# the real CLI in a child process, with one fault injected: every durable write raises
INJECTED = """
import sys
import cityflux.store.sink as sink

def broken(self, lines):
    raise RuntimeError("injected: the commit path is broken")

sink.DurableSink.write = broken
from cityflux.cli import main
sys.argv = ["cityflux", "run"]
main()
"""


def test_run_exits_non_zero_when_a_component_gives_up(
    broker: LocalMosquitto, config: Config
) -> None:
    config = config.with_overrides(
        {
            "analytics.enabled": False,
            "supervision.restart_min_s": 0.05,
            "supervision.restart_max_s": 0.1,
            "supervision.max_restarts": 3,
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-c", INJECTED],
        env=config_env(config),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(1.0)
        publish_all(broker.port, [("cityflux/v1/centre/pole/p-1", b'{"pm25_ugm3": 3.5}')])
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    text = output.decode()
    assert process.returncode == 1, text
    assert "giving up" in text
    assert "injected: the commit path is broken" in text


def test_workers_stop_together_when_one_fails(broker: LocalMosquitto, config: Config) -> None:
    """`run --workers 2` waited for every worker: one that died left its share of the
    subscription unserved while the parent lived on. Worker 1's metrics port is taken here."""
    base = free_port()
    config = config.with_overrides({"metrics.port": base, "analytics.enabled": False})
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        process = subprocess.Popen(
            [sys.executable, "-m", "cityflux", "run", "--workers", "2"],
            env=config_env(config),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            process.kill()
    text = output.decode()
    assert process.returncode != 0, text
    assert "worker 1 exited with status 1: stopping the others" in text
