"""The chaos run's processes and what it watches: the servers (mosquitto with the shipped
sizing, InfluxDB that can be frozen), ``cityflux run`` as a restartable child, ``/healthz`` and
``/metrics`` polled, the broker's own ``$SYS`` drop counter.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from cityflux.servers import LocalInfluxDB, LocalMosquitto, require_binary

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MOSQUITTO_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
# What the shipped broker configuration says about holding messages; listeners, TLS, auth
# and plugins are the deployment's and are left out (a loopback broker, anonymous).
SIZING_KEYS = frozenset(
    {
        "persistence",
        "autosave_interval",
        "autosave_on_changes",
        "persistent_client_expiration",
        "max_inflight_messages",
        "max_inflight_bytes",
        "max_queued_messages",
        "max_queued_bytes",
        "message_size_limit",
        "max_packet_size",
        "max_keepalive",
        "upgrade_outgoing_qos",
        "queue_qos0_messages",
        "sys_interval",
        "set_tcp_nodelay",
    }
)


def shipped_sizing(path: Path = SHIPPED_MOSQUITTO_CONF) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and line.split()[0] in SIZING_KEYS:
            lines.append(line)
    return lines


class ChaosMosquitto(LocalMosquitto):
    """mosquitto with deploy/mosquitto/mosquitto.conf's sizing and persistence, minus auth."""

    def command(self) -> list[str]:
        binary = require_binary("mosquitto")
        conf = self.data_dir / "mosquitto.conf"
        head = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        conf.write_text("\n".join([*head, *shipped_sizing()]) + "\n")
        return [binary, "-c", str(conf)]


class ChaosInfluxDB(LocalInfluxDB):
    """InfluxDB 1.x that can also be frozen (SIGSTOP): connections hang instead of failing."""

    def pause(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def scrape(port: int) -> dict[str, float] | None:
    """``/metrics`` as ``{'name{label=value,...}': value}``; None when nothing answered."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)
    if status != 200:
        return None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        values[f"family:{family.name}"] = 1.0  # exported, even with no labelled sample yet
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return values


@dataclass
class Lifetime:
    """One ``cityflux run`` process from start to its end."""

    number: int
    pid: int
    started: float
    ended: float | None = None
    how: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # the last scrape


class CityfluxProcess:
    """``cityflux run`` as a child; restarted like systemd's ``Restart=always`` would (after
    ``restart_delay_s``) when it exits on its own; killed and restarted by the schedule."""

    def __init__(self, env: dict[str, str], log: Path, metrics_port: int, restart_delay_s: float):
        self.env, self.log, self.metrics_port = env, log, metrics_port
        self.restart_delay_s = restart_delay_s
        self.lifetimes: list[Lifetime] = []
        self.planned_down: list[tuple[float, float]] = []  # (killed, restarted) monotonic
        self.unexpected_exits: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._held = False  # killed by the schedule: do not restart until it says so
        self._closing = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="chaos-monitor", daemon=True)

    @property
    def current(self) -> Lifetime | None:
        return self.lifetimes[-1] if self.lifetimes else None

    def start(self) -> None:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            with self.log.open("ab") as handle:
                handle.write(f"\n==== chaos: start #{len(self.lifetimes) + 1}\n".encode())
                handle.flush()
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "cityflux", "run"],
                    env=self.env,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            self.lifetimes.append(Lifetime(len(self.lifetimes) + 1, self._process.pid, now()))
            self._held = False
            if not self._monitor.is_alive():
                self._monitor.start()

    def record(self, number: int, metrics: dict[str, float]) -> None:
        with self._lock:
            if self.current is not None and self.current.number == number:
                self.current.metrics = metrics

    def kill(self) -> str:
        """SIGKILL, right after a last scrape of its counters."""
        with self._lock:
            process, life = self._process, self.current
            if process is None or process.poll() is not None or life is None:
                return "not running: skipped"
            last = scrape(self.metrics_port)
            if last is not None:
                life.metrics = last
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            life.ended, life.how = now(), "SIGKILL (schedule)"
            self._held = True
            self.planned_down.append((now(), float("inf")))
            return f"pid {process.pid} killed"

    def restart(self) -> str:
        with self._lock:
            if self.planned_down and self.planned_down[-1][1] == float("inf"):
                self.planned_down[-1] = (self.planned_down[-1][0], now())
            if self._process is not None and self._process.poll() is None:
                return "already running"
            self.start()
            return f"pid {self._process.pid if self._process else 0} started"

    def _watch(self) -> None:
        while not self._closing.wait(0.2):
            with self._lock:
                process, life = self._process, self.current
                if self._held or process is None or process.poll() is None or life is None:
                    continue
                code = process.returncode
                life.ended, life.how = now(), f"exited {code}"
                tail = log_tail(self.log, 8)
                self.unexpected_exits.append(f"#{life.number} exited {code}: {tail}")
                self._held = True  # until the delayed restart below
                log(
                    f"cityflux #{life.number} exited on its own with {code}; restarting in "
                    f"{self.restart_delay_s:.0f}s (as systemd would)"
                )
            if not self._closing.wait(self.restart_delay_s):
                with self._lock:
                    self.start()

    def alive(self) -> bool:
        with self._lock:
            return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        self._closing.set()
        with self._lock:
            process, life = self._process, self.current
            if process is None or process.poll() is not None or life is None:
                return
            last = scrape(self.metrics_port)
            if last is not None:
                life.metrics = last
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            life.ended, life.how = now(), f"stopped (SIGTERM), exit {process.returncode}"


def log_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-1500:]


@dataclass
class Sample:
    t: float
    status: int
    reason: str


class Watcher:
    """Polls ``/healthz`` every 0.5 s and ``/metrics`` every second (into the live process's
    lifetime), and the load average every 5 s."""

    def __init__(self, cityflux: CityfluxProcess, interval_s: float = 0.5) -> None:
        self.cityflux = cityflux
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.load: list[float] = []
        self.last_health: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        tick = 0
        port = self.cityflux.metrics_port
        while not self._stop.wait(self.interval_s):
            tick += 1
            t = now()
            status, body = http_get(f"http://127.0.0.1:{port}/healthz")
            reason = ""
            with contextlib.suppress(ValueError):
                state = json.loads(body) if body else {}
                if isinstance(state, dict):
                    self.last_health = state
                    if status != 200:
                        reason = _health_reason(state)
            self.samples.append(Sample(t, status, reason or ("unreachable" if not status else "")))
            if tick % 2 == 0:
                life = self.cityflux.current
                metrics = scrape(port) if life is not None else None
                if life is not None and metrics is not None:
                    self.cityflux.record(life.number, metrics)
            if tick % 10 == 0:
                self.load.append(os.getloadavg()[0])

    def downtime(self, planned: list[tuple[float, float]]) -> tuple[float, float, str]:
        """(longest non-200 stretch, longest time of one stretch outside the scheduled kill
        windows (kill to restart: what is left is start-up and every other outage), the
        reasons /healthz gave in that one)."""
        longest = unplanned = 0.0
        why = ""
        start: Sample | None = None
        reasons: set[str] = set()
        # from the first healthy answer on: the first start-up is reported on its own
        first = next((i for i, x in enumerate(self.samples) if x.status == 200), len(self.samples))
        samples = self.samples[first:]
        end_t = samples[-1].t if samples else 0.0
        for sample in [*samples, Sample(end_t, 200, "")]:
            if sample.status != 200:
                if start is None:
                    start, reasons = sample, set()
                reasons.add(sample.reason)
                continue
            if start is None:
                continue
            length = sample.t - start.t
            planned_part = sum(max(0.0, min(sample.t, b) - max(start.t, a)) for a, b in planned)
            longest = max(longest, length)
            if length - planned_part > unplanned:
                unplanned = length - planned_part
                why = "; ".join(sorted(r for r in reasons if r))[:300]
            start = None
        return longest, unplanned, why


def startups(samples: list[Sample], lifetimes: list[Lifetime]) -> list[str]:
    """Per process: seconds from its start to its first 200 from /healthz."""
    out = []
    for life in lifetimes:
        end = life.ended if life.ended is not None else float("inf")
        first = next((x.t for x in samples if life.started <= x.t <= end and x.status == 200), None)
        if first is not None:
            out.append(f"#{life.number} {first - life.started:.1f}s")
        else:
            out.append(
                f"#{life.number} never ({life.how or 'running'} after {end - life.started:.0f}s)"
            )
    return out


def _health_reason(state: dict[str, object]) -> str:
    for key in ("reason", "reasons", "problems"):
        if state.get(key):
            return str(state[key])
    flags = [k for k, v in state.items() if v is False or (k == "spool_full" and v is True)]
    return ",".join(flags)


class BrokerSys:
    """The broker's ``$SYS`` drop counter, per broker lifetime (it starts at 0 on restart)."""

    TOPICS = ("$SYS/broker/publish/messages/dropped", "$SYS/broker/store/messages/count")

    def __init__(self, port: int) -> None:
        self.epoch = 0
        self.values: dict[tuple[str, int], float] = {}
        self.seen = False
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="chaos-sys")
        self._client.reconnect_delay_set(1, 2)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect_async("127.0.0.1", port)
        self._client.loop_start()

    def _on_connect(self, client: paho.Client, *args: object) -> None:
        for topic in self.TOPICS:
            client.subscribe(topic)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            self.seen = True
            key = (msg.topic.rsplit("/", 3)[-3], self.epoch)
            self.values[key] = max(self.values.get(key, 0.0), float(msg.payload))

    def restarted(self) -> None:
        self.epoch += 1

    def dropped(self) -> float | None:
        if not any(name == "publish" for name, _ in self.values):
            return None
        return sum(v for (name, _), v in self.values.items() if name == "publish")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


_T0 = time.monotonic()


def now() -> float:
    """Seconds since the run started (monotonic)."""
    return time.monotonic() - _T0


def log(text: str) -> None:
    print(f"[{now():7.1f}s] {text}", flush=True)
