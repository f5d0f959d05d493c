"""What every benchmark records: child processes' time, CPU and peak RSS, load, git, JSON.

A figure from a shared 2-core machine means little without the load it was taken under and the
CPU it cost, so each run here is measured the same way and written to bench/results/ as JSON
(``python -m bench.compare A.json B.json`` puts two of them side by side).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cityflux.servers import LocalServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A consumer failed, lost points or timed out: the run's figures are not valid."""


def loadavg() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def envelope(bench: str, stamp: str) -> dict[str, Any]:
    """What every bench's JSON starts with: which bench, when, how it was run, on what."""
    return {
        "bench": bench,
        "utc": stamp,
        "command": " ".join([f"python -m bench.{bench}", *sys.argv[1:]]),
        "git": git_state(),
        "cpu_count": os.cpu_count(),
    }


def write_json(bench: str, stamp: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _descendants(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    except OSError:
        pass
    return found


def child_pids(pid: int) -> list[int]:
    """The direct children of a live process (e.g. the workers of ``cityflux run --workers``)."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def started_at(pid: int) -> float:
    """When a process started, in seconds since boot (compare with :func:`since_boot`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / TICKS  # field 22 of proc(5), starttime


def since_boot() -> float:
    """Now, on the clock of :func:`started_at` (CLOCK_BOOTTIME, as /proc/uptime)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def cpus_allowed(pid: int) -> list[str]:
    """Each thread's allowed CPUs (Cpus_allowed_list of /proc/<pid>/task/<tid>/status), distinct,
    sorted: evidence that a ``taskset`` reached every thread of a server."""
    found = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    found.add(line.split(":", 1)[1].strip())
    except OSError:
        pass
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process and its live descendants (e.g. worker processes)."""
    total = 0
    for each in (pid, *_descendants(pid)):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / TICKS


def server_cpu(server: LocalServer) -> float:
    """CPU-seconds a local server (broker, database) has used so far."""
    process = server._process  # the child process this server object started
    return cpu_seconds(process.pid) if process is not None else 0.0


def peak_rss_mb(pid: int, command: Sequence[str] | None = None) -> float:
    """VmHWM: the process's peak resident set so far. With ``command``, 0 until the process
    runs it: between fork and exec the child is a copy of this process, and its size."""
    try:
        if command is not None:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmdline != "\0".join(command).encode() + b"\0":
                return 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class ChildRun:
    seconds: float  # process start to done (or exit)
    cpu_s: float
    peak_rss_mb: float | None  # None: it exited before it was sampled
    stdout: str
    # from the moment ``started()`` first held to done: the steady state, start-up left out
    steady_seconds: float | None = None
    steady_cpu_s: float | None = None


def run_child(
    command: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    done: Callable[[], bool] | None = None,
    started: Callable[[], bool] | None = None,
    timeout_s: float = 1_800.0,
    keep_stdout: bool = True,
    on_start: Callable[[int], None] | None = None,
) -> ChildRun:
    """Run ``command`` until ``done()`` is true (then stop it), or, without ``done``, until it
    exits (a non-zero exit raises). CPU comes from /proc when we stop it and from wait4's
    rusage when it exits by itself; peak RSS is VmHWM sampled every 50 ms (a process that
    lives less than that may show 0); stderr goes to ``log``. With ``started`` (e.g. its first
    message received), the time and CPU from then to done are the steady state too.
    ``on_start`` is called with the child's pid right after it started."""
    out = log.with_suffix(".out")
    with log.open("wb") as err, out.open("wb") as stdout:
        start = time.monotonic()
        process = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=stdout if keep_stdout else subprocess.DEVNULL,
            stderr=err,
        )
    pid, rss, cpu = process.pid, 0.0, 0.0
    if on_start is not None:
        on_start(pid)
    began: tuple[float, float] | None = None  # (time, cpu) when started() first held
    try:
        while True:
            if started is not None and began is None and started():
                began = (time.monotonic(), cpu_seconds(pid))
            if done is not None and done():
                seconds, cpu = time.monotonic() - start, cpu_seconds(pid)
                rss = max(rss, peak_rss_mb(pid, command))
                break
            reaped, status, usage = os.wait4(pid, os.WNOHANG)
            if reaped:
                seconds = time.monotonic() - start
                process.returncode = code = os.waitstatus_to_exitcode(status)
                if done is not None or code != 0:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise BenchError(f"{command[0]} exited with {code}:\n{tail}")
                # (not ru_maxrss: it counts the forked copy of this process before exec)
                cpu = usage.ru_utime + usage.ru_stime
                break
            if time.monotonic() - start > timeout_s:
                raise BenchError(f"{' '.join(command[:3])} ... still running after {timeout_s} s")
            rss = max(rss, peak_rss_mb(pid, command))
            time.sleep(0.05)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    text = out.read_text(errors="replace") if keep_stdout else ""
    if began is None:
        return ChildRun(seconds, cpu, rss or None, text)
    steady = (start + seconds - began[0], cpu - began[1])
    return ChildRun(seconds, cpu, rss or None, text, *steady)


def per_100k(cpu_s: float, messages: int) -> float:
    return cpu_s * 100_000 / messages if messages else 0.0


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)
