"""The worker and `cityflux nats init` over TLS to nats-server (issue 12: "URLs, credentials,
TLS"): a server that takes TLS clients only, its certificate from the shipped make-certs.sh;
the worker trusts it through ``nats.tls.ca_file`` and stores every reading the devices publish
over MQTT. Without the CA, or in plain text, the connection is refused with one clear error
within its wait, never a hang or a traceback. (Credentials files, NATS's JWT accounts, need an
operator's keys made with `nsc`, which is not installed here: not tested.)"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import pytest

from bench.stream import mixed_stream, points_in
from cityflux.config import NatsConfig
from cityflux.errors import NatsError
from cityflux.nats.admin import init
from cityflux.nats.connect import connect
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalInfluxDB
from cityflux.servers_nats import LocalNats
from tests.integration.test_nats_pipeline import nats_config, points
from tests.support import ROOT, publish_all, wait_for


def certificates(directory: Path) -> Path:
    subprocess.run(
        ["sh", str(ROOT / "deploy" / "mosquitto" / "make-certs.sh"), str(directory)],
        check=True,
        capture_output=True,
    )
    return directory


def test_a_worker_reads_and_stores_over_tls(influxdb: LocalInfluxDB, tmp_path: Path) -> None:
    certs = certificates(tmp_path / "certs")
    tls_only = (
        f'tls {{\n  cert_file: "{certs / "server.crt"}"\n  key_file: "{certs / "server.key"}"\n}}\n'
    )
    with LocalNats(tmp_path / "nats", extra_config=tls_only) as server:
        url = f"tls://127.0.0.1:{server.port}"
        config = nats_config([url], influxdb, tmp_path, f"w-{uuid.uuid4().hex[:6]}")
        config = config.with_overrides(
            {
                "nats.tls.ca_file": str(certs / "ca.crt"),
                "influx.database": f"test_tls_{uuid.uuid4().hex[:8]}",
            }
        )
        asyncio.run(init(config))  # the admin side over TLS too
        messages = mixed_stream(2_000, devices=200)
        with Pipeline(config, connect_timeout_s=10):
            assert server.mqtt_port is not None
            publish_all(server.mqtt_port, messages)
            wait_for(lambda: points(influxdb, config) >= points_in(messages), 60, "every point")
        assert points(influxdb, config) == points_in(messages)

        # not trusting the server's CA: refused, said once, within the wait
        untrusted = config.with_overrides({"nats.tls.ca_file": None})
        with pytest.raises(NatsError, match=r"cannot reach NATS .* CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(connect(untrusted.nats, "untrusted", wait_s=5))
        # a nats:// URL to it: upgraded to TLS as the server asks, with the CA given (it was
        # verified against the system's CAs instead, and refused)
        upgraded = config.with_overrides({"nats.urls": [server.url]})
        asyncio.run(_connect_and_close(upgraded.nats))


async def _connect_and_close(config: NatsConfig) -> None:
    nc = await connect(config, "upgraded", wait_s=5)
    assert nc.is_connected
    await nc.close()
