"""MQTT 5 sessions and username/password against a real mosquitto."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from cityflux.config import Config
from cityflux.errors import MqttError
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto, require_binary
from cityflux.store.influx import InfluxWriter
from tests.support import count_points, publish_all, running, wait_for

NOW_MS = int(time.time() * 1000) - 60_000


def readings(n: int, offset: int = 0) -> list[tuple[str, bytes]]:
    return [
        (
            f"cityflux/v1/d1/manhole/mh-{i % 7}",
            f'{{"ts": {NOW_MS + offset + i}, "battery_pct": 50}}'.encode(),
        )
        for i in range(n)
    ]


def test_mqtt5_session_survives_the_consumer_being_away(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    config = config.with_overrides({"mqtt.protocol": "5", "mqtt.session_expiry_s": 600})
    with running(Pipeline(config)):
        publish_all(broker.port, readings(500))
        wait_for(lambda: count_points(db, "manhole", "battery_pct") >= 500, what="first 500")
    publish_all(broker.port, readings(500, offset=500))  # queued in the MQTT 5 session
    with running(Pipeline(config)):
        wait_for(lambda: count_points(db, "manhole", "battery_pct") >= 1000, what="queued 500")
    assert count_points(db, "manhole", "battery_pct") == 1000


@pytest.fixture
def secured_broker(tmp_path: Path) -> LocalMosquitto:
    passwords = tmp_path / "passwd"
    passwords.write_text("")
    subprocess.run(
        [require_binary("mosquitto_passwd"), "-b", str(passwords), "cityflux", "s3cret"], check=True
    )
    broker = LocalMosquitto(
        tmp_path / "secure", extra_config=f"password_file {passwords}\n", anonymous=False
    )
    return broker


def test_username_and_password(secured_broker: LocalMosquitto, config: Config) -> None:
    with secured_broker:
        base = config.with_overrides({"mqtt.url": secured_broker.url})
        wrong = Pipeline(
            base.with_overrides({"mqtt.username": "cityflux", "mqtt.password": "wrong"})
        )
        with pytest.raises(MqttError, match="no CONNACK"):
            wrong.start(wait_connected_s=3)
        wrong.close()
        right = Pipeline(
            base.with_overrides({"mqtt.username": "cityflux", "mqtt.password": "s3cret"})
        )
        right.start(wait_connected_s=10)
        assert right.source.is_connected()
        right.close()


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""
    openssl = require_binary("openssl")
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            ca_key,
            "-out",
            ca,
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            key,
            "-out",
            csr,
        ],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            cert,
        ],
    ):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


def test_tls(tmp_path: Path, config: Config, db: InfluxWriter) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    with LocalMosquitto(tmp_path / "tls", extra_config=tls) as broker:
        tls_config = config.with_overrides(
            {"mqtt.url": f"mqtts://127.0.0.1:{broker.port}", "mqtt.tls.ca_file": str(ca)}
        )
        with running(Pipeline(tls_config)) as pipeline:
            assert pipeline.source.is_connected()
            subprocess.run(
                [
                    require_binary("mosquitto_pub"),
                    "-p",
                    str(broker.port),
                    "--cafile",
                    str(ca),
                    "-q",
                    "1",
                    "-t",
                    "cityflux/v1/d1/pole/p1",
                    "-m",
                    f'{{"ts": {NOW_MS}, "noise_dba": 55.5}}',
                ],
                check=True,
                timeout=20,
            )
            wait_for(lambda: count_points(db, "pole", "noise_dba") == 1, what="reading via TLS")
