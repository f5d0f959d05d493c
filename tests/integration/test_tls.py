"""The shipped TLS listener (8883 in deploy/mosquitto/mosquitto.conf) with the certificate
from the shipped make-certs.sh, and `cityflux alerts ack` over mqtts:// against it.

Before: `alerts ack` to an mqtts:// URL connected in plain TCP, sent the operator's password in
clear, and ended in a traceback. Now it speaks TLS with mqtt.tls.ca_file, and every failure
is one line on stderr with exit code 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cityflux.analytics.alerts import Alert, AlertStore
from tests.integration.shipped_mosquitto import PASSWORDS, Client, ShippedMosquitto, make_auth
from tests.support import ROOT, wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    with ShippedMosquitto(tmp_path / "mosquitto", make_auth(tmp_path)) as server:
        yield server


@pytest.fixture
def alert_db(tmp_path: Path) -> Path:
    path = tmp_path / "alerts.sqlite"
    store = AlertStore(path)
    store.save([Alert(rule="manhole_cover_open", entity="mh-0042", district="centre",
                      severity="critical", value=1.0, message="open", started_ns=1,
                      updated_ns=1)])  # fmt: skip
    store.close()
    return path


def ack(
    alert_db: Path, url: str, ca_file: Path | None = None, password: str = ""
) -> tuple[int, str]:
    """`cityflux alerts ack 1 --by ops-7` as the operator; (exit code, stdout + stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYFLUX_")}
    env |= {
        "CITYFLUX_MQTT__URL": url,
        "CITYFLUX_MQTT__PROTOCOL": "5",
        "CITYFLUX_MQTT__USERNAME": "operator",
        "CITYFLUX_MQTT__PASSWORD": password or PASSWORDS["operator"],
        "CITYFLUX_ANALYTICS__ALERTS_DB": str(alert_db),
    }
    if ca_file:
        env["CITYFLUX_MQTT__TLS__CA_FILE"] = str(ca_file)
    done = subprocess.run(
        [sys.executable, "-m", "cityflux", "alerts", "ack", "1", "--by", "ops-7"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def one_line_error(output: str) -> str:
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


def test_alerts_ack_over_tls_with_the_scripts_ca(
    broker: ShippedMosquitto, alert_db: Path, tmp_path: Path
) -> None:
    service = Client(broker.port, "cityflux", PASSWORDS["cityflux"])
    try:
        service.subscribe("cityflux/v1/alerts/ack")
        code, output = ack(
            alert_db, f"mqtts://127.0.0.1:{broker.tls_port}", tmp_path / "certs/ca.crt"
        )
        assert code == 0, output
        assert "acknowledged by ops-7 and sent to the broker" in output
        assert wait_for(lambda: service.received, 10)
        ((topic, payload, _),) = service.received
        assert topic == "cityflux/v1/alerts/ack"
        assert msgspec.json.decode(payload) == {"id": 1, "by": "ops-7"}
        # the certificate also names localhost
        code, output = ack(
            alert_db, f"mqtts://localhost:{broker.tls_port}", tmp_path / "certs/ca.crt"
        )
        assert code == 0, output
    finally:
        service.close()


def test_tls_refuses_a_client_without_the_ca_and_a_wrong_password(
    broker: ShippedMosquitto, alert_db: Path, tmp_path: Path
) -> None:
    service = Client(broker.port, "cityflux", PASSWORDS["cityflux"])
    url = f"mqtts://127.0.0.1:{broker.tls_port}"
    try:
        service.subscribe("cityflux/v1/alerts/ack")
        code, output = ack(alert_db, url)  # the system's CAs do not know the local CA
        assert code == 1
        assert "certificate" in one_line_error(output) and "not trusted" in output
        other_ca = tmp_path / "other"
        subprocess.run(["sh", str(ROOT / "deploy/mosquitto/make-certs.sh"), str(other_ca)],
                       check=True, capture_output=True)  # fmt: skip
        code, output = ack(alert_db, url, other_ca / "ca.crt")  # a CA, not the broker's
        assert code == 1 and "not trusted" in one_line_error(output)
        code, output = ack(alert_db, url, tmp_path / "certs/ca.crt", password="wrong")
        assert code == 1 and "refused the connection" in one_line_error(output)
        code, output = ack(alert_db, url, tmp_path / "missing.crt")
        assert code == 1 and "missing.crt" in one_line_error(output)
        # TLS to the plain listener, and a closed port: one line each, never a traceback
        code, output = ack(alert_db, f"mqtts://127.0.0.1:{broker.port}", tmp_path / "certs/ca.crt")
        assert code == 1 and one_line_error(output)
        time.sleep(0.5)  # had anything got through, it would be here
        assert service.received == []  # nothing got through
    finally:
        service.close()


def test_the_password_is_never_sent_in_clear_to_an_mqtts_url(alert_db: Path) -> None:
    """A plain TCP listener where an mqtts:// URL points: what arrives is a TLS ClientHello,
    not an MQTT CONNECT with the password (which is what the old code sent)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray()

    def capture() -> None:
        connection, _ = server.accept()
        connection.settimeout(5)
        try:
            while chunk := connection.recv(4096):
                received.extend(chunk)
                if len(received) > 5:
                    break  # enough to see what it is; then hang up
        except OSError:
            pass
        connection.close()

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    code, output = ack(alert_db, f"mqtts://127.0.0.1:{port}")
    thread.join(10)
    server.close()
    assert code == 1 and one_line_error(output)
    assert received[:1] == b"\x16"  # TLS handshake record
    assert PASSWORDS["operator"].encode() not in received and b"MQTT" not in received
