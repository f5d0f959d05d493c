"""Retries on 429/5xx: a fault-injecting HTTP proxy in front of the real InfluxDB answers the
first requests with an error status, then forwards. Nothing here imitates InfluxDB itself."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cityflux.config import Config
from cityflux.errors import WriteRetryable
from cityflux.servers import LocalInfluxDB
from cityflux.store.influx import InfluxWriter
from tests.support import count_points


class FaultyProxy:
    def __init__(self, upstream: str, failures: list[int]) -> None:
        self.failures = list(failures)  # statuses to answer before forwarding
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if proxy.failures:
                    self.send_response(proxy.failures.pop(0))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = urllib.request.Request(
                    upstream + self.path, data=body, method="POST", headers=dict(self.headers)
                )
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        status, data = response.status, response.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def writer(config: Config, influxdb: LocalInfluxDB) -> Iterator[InfluxWriter]:
    direct = InfluxWriter(config.influx)
    direct.ensure_database()
    yield direct
    direct.close()


@pytest.mark.parametrize("statuses", [[503], [429, 500], [502, 503, 504]])
def test_retryable_statuses_are_retried_until_written(
    config: Config, writer: InfluxWriter, statuses: list[int]
) -> None:
    proxy = FaultyProxy(config.influx.url, statuses)
    try:
        through = InfluxWriter(
            config.with_overrides(
                {"influx.url": proxy.url, "influx.max_retries": 3, "influx.retry_base_s": 0.01}
            ).influx
        )
        body = through.encode_body(["pole,device_id=p,district=d noise_dba=50 1700000000000000000"])
        through.send_with_retry(body, through.gzip)
    finally:
        proxy.close()
    assert proxy.requests == len(statuses) + 1
    assert count_points(writer, "pole", "noise_dba") == 1


def test_retries_are_bounded(config: Config, writer: InfluxWriter) -> None:
    proxy = FaultyProxy(config.influx.url, [503] * 10)
    try:
        through = InfluxWriter(
            config.with_overrides(
                {"influx.url": proxy.url, "influx.max_retries": 2, "influx.retry_base_s": 0.01}
            ).influx
        )
        with pytest.raises(WriteRetryable, match="503"):
            through.send_with_retry(through.encode_body(["m f=1 1"]), through.gzip)
    finally:
        proxy.close()
    assert proxy.requests == 3  # the first attempt and two retries; then the caller spools
