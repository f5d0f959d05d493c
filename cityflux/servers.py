"""Local mosquitto, InfluxDB 1.x and VictoriaMetrics servers run as child processes.

The tests, ``cityflux up`` and the benchmarks all need real servers on loopback. Each server here
is a context manager that writes its config into a private directory, starts the binary on free
loopback ports, waits until it answers, and stops it (SIGTERM, then SIGKILL) on exit. A missing
binary raises :class:`ServerError` naming the package to install: never a silent skip.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from cityflux.errors import ServerError

INSTALL_HINT = "apt-get install -y mosquitto mosquitto-clients influxdb victoria-metrics"

# Sized so that the broker holds a backlog instead of dropping it (see docs/deploy.md):
# mosquitto's defaults (20 in flight, 1000 queued) drop messages for a consumer that falls behind.
MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous {anonymous}
user {user}
persistence true
persistence_location {data_dir}/
autosave_interval 5
max_inflight_messages {max_inflight}
max_queued_messages {max_queued}
max_queued_bytes 0
max_packet_size 1048576
persistent_client_expiration 14d
log_dest file {log_file}
log_type error
log_type warning
log_type notice
{extra}"""

INFLUXDB_CONF = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{data_dir}/meta"
[data]
  dir = "{data_dir}/data"
  wal-dir = "{data_dir}/wal"
  query-log-enabled = false
  max-series-per-database = 0
  max-values-per-tag = 0
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  max-body-size = 0
"""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_binary(name: str) -> str:
    """The absolute path of ``name``, or a loud error with the install command."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        raise ServerError(f"{name} is not installed; install it with: {INSTALL_HINT}")
    return found


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError):
        return False


class LocalServer:
    """One server binary run as a child process in a private data directory."""

    name = "server"

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"cityflux-{self.name}-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_file = self.data_dir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- what each server defines -------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            raise ServerError(f"{self.name} is already running")
        command = self.command()
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait(self.ready, timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM lets mosquitto save its persistence file)."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Abrupt stop, as a power cut would do it."""
        self._signal(signal.SIGKILL, 5.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)

    def _wait(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise ServerError(f"{self.name} exited at start:\n{self.log_tail()}")
            if condition():
                return
            time.sleep(0.05)
        self.kill()
        raise ServerError(f"{self.name} did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class LocalMosquitto(LocalServer):
    name = "mosquitto"

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        max_inflight: int = 50_000,
        max_queued: int = 2_000_000,
        anonymous: bool = True,
        extra_config: str = "",
    ) -> None:
        super().__init__(data_dir, port)
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.anonymous = anonymous
        self.extra_config = extra_config

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = require_binary("mosquitto")
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(
            MOSQUITTO_CONF.format(
                port=self.port,
                data_dir=self.data_dir,
                log_file=self.log_file,
                max_inflight=self.max_inflight,
                max_queued=self.max_queued,
                anonymous=str(self.anonymous).lower(),
                extra=self.extra_config,
                # run as: started by root, mosquitto would switch to user "mosquitto", which
                # cannot write to a private temporary directory
                user=getpass.getuser(),
            )
        )
        return [binary, "-c", str(conf)]

    def ready(self) -> bool:
        return _tcp_open(self.port)


class LocalInfluxDB(LocalServer):
    """InfluxDB 1.x (Debian's ``influxdb``): ``/write`` and InfluxQL ``/query``."""

    name = "influxdb"

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        super().__init__(data_dir, port)
        self.rpc_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = require_binary("influxd")
        conf = self.data_dir / "influxdb.conf"
        conf.write_text(
            INFLUXDB_CONF.format(port=self.port, rpc_port=self.rpc_port, data_dir=self.data_dir)
        )
        return [binary, "-config", str(conf)]

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/ping")


class LocalVictoriaMetrics(LocalServer):
    """VictoriaMetrics: answers InfluxDB's ``/api/v2/write``, so the v2 path runs for real."""

    name = "victoria-metrics"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = require_binary("victoria-metrics")
        return [
            binary,
            f"-storageDataPath={self.data_dir / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-retentionPeriod=100y",
            "-search.disableCache",
            "-search.latencyOffset=0s",
            "-loggerLevel=ERROR",
        ]

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/health")
