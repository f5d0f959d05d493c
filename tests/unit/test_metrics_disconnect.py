"""A /metrics or /healthz client that hangs up before its answer is one log line, not a
BrokenPipeError traceback on stderr (a real socket on loopback, reset by the client)."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import urllib.request
from typing import Any

import pytest

from cityflux.observability import Metrics, MetricsServer


def test_a_client_that_disconnects_early_is_one_line(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    hung_up = threading.Event()

    def health() -> dict[str, Any]:
        hung_up.wait(10)  # answer only once the client is gone
        time.sleep(0.2)  # its RST has arrived
        return {"healthy": True, "padding": "x" * 200_000}

    server = MetricsServer(Metrics(), health, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="cityflux.observability"):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)  # the server has read the request
            # linger 0: close sends a reset, as a killed scraper's kernel does
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            hung_up.set()
            deadline = time.monotonic() + 10
            while "disconnected early" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        lines = [r.getMessage() for r in caplog.records if "disconnected early" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0]
        assert "Traceback" not in capfd.readouterr().err
        # the server still answers
        hung_up.set()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200
    finally:
        server.stop()
