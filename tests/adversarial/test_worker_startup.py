"""`run --workers N` started each worker as a new interpreter that redid the whole start-up
(imports: ~0.4 CPU-s each, bench/scale); forked from the supervisor, a worker begins where the
supervisor's start-up ended."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from cityflux.config import Config
from cityflux.servers import LocalMosquitto, free_port
from tests.support import ROOT, config_env, publish_all, wait_for


def _own_cpu(pid: int) -> float:
    """A process's own CPU-seconds (utime + stime), its children's not included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _get(url: str) -> str:
    """The body of a 200 answer, else "" (urllib raises for /healthz's 503: unhealthy)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def test_workers_do_not_redo_the_start_up(broker: LocalMosquitto, config: Config) -> None:
    base = free_port()
    config = config.with_overrides({"metrics.port": base, "analytics.enabled": False})
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "cityflux", "run", "--workers", "2"],
        env=config_env(config),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ports = [base, base + 1]
        wait_for(
            lambda: all(_get(f"http://127.0.0.1:{p}/healthz") for p in ports),
            what="both workers healthy",
        )
        publish_all(broker.port, [("cityflux/v1/d1/pole/p-1", b'{"noise_dba": 50}')] * 20)
        wait_for(
            lambda: sum(_received(p) for p in ports) >= 20, what="the messages taken by workers"
        )
        workers = _children(supervisor.pid)
        parent_cpu = _own_cpu(supervisor.pid)
        worker_cpu = [_own_cpu(pid) for pid in workers]
    finally:
        supervisor.terminate()
        supervisor.wait(20)
    assert len(workers) == 2, workers
    # the supervisor did the imports; each worker, forked after them, only built its pipeline
    # and took a few messages (a new interpreter would have paid the imports again)
    assert parent_cpu > 0.15, parent_cpu
    assert all(cpu < parent_cpu / 2 for cpu in worker_cpu), (parent_cpu, worker_cpu)
    assert supervisor.returncode == 0


def _received(port: int) -> float:
    text = _get(f"http://127.0.0.1:{port}/metrics")
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("cityflux_messages_received_total")
    )
