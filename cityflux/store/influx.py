"""HTTP writers for InfluxDB's v1 (``/write``) and v2 (``/api/v2/write``) APIs.

Both share one pooled urllib3 connection pool (one connection per writer thread, reused: a
connection per point exhausts file descriptors under load), gzip bodies, and the same reading
of status codes:

* 2xx: written.
* 400, 413, 422: the data itself was refused: :class:`WriteRejected`; the caller bisects the
  batch to find and dead-letter the offending lines.
* 401, 403, 404 (database or bucket missing), 429, 5xx and network errors:
  :class:`WriteRetryable`; the caller retries with backoff and, failing that, spools. An auth or
  missing-database error is a configuration problem, not bad data: data must not be thrown away
  for it.

The ``influxdb-client`` library is not used for writing: its write API runs its own batching
thread and retry loop, which would hide from us exactly when a batch is durable (we acknowledge
MQTT messages only after that), and it cannot talk to InfluxDB 1.x before 1.8.
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any, Protocol
from urllib.parse import urlencode

import urllib3

from cityflux.config import InfluxConfig
from cityflux.errors import StoreError, WriteRejected, WriteRetryable
from cityflux.supervisor import backoff

_REJECTED = frozenset({400, 413, 422})


class Writer(Protocol):
    """What the durable sink needs from a database writer."""

    gzip: bool

    def encode_body(self, lines: list[str]) -> bytes: ...

    def send(self, body: bytes, gzipped: bool) -> None: ...

    def ping(self) -> bool: ...


class InfluxWriter:
    """Speaks v1 or v2 according to ``config.api``."""

    def __init__(self, config: InfluxConfig, pool_size: int = 4) -> None:
        self.config = config
        self.gzip = config.gzip
        self._http = urllib3.PoolManager(
            num_pools=2,
            maxsize=pool_size,
            block=True,  # never open more than pool_size connections
            retries=False,  # we retry ourselves, with our own classification
            timeout=urllib3.Timeout(connect=min(2.0, config.timeout_s), read=config.timeout_s),
        )
        self._base = config.url.rstrip("/")
        self._write_url, self._headers = self._endpoint()

    def _endpoint(self) -> tuple[str, dict[str, str]]:
        c = self.config
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if c.api == "v2":
            query = {"org": c.org, "bucket": c.bucket, "precision": "ns"}
            headers["Authorization"] = f"Token {c.token}"
            return f"{self._base}/api/v2/write?{urlencode(query)}", headers
        query = {"db": c.database, "precision": "ns"}
        if c.retention_policy:
            query["rp"] = c.retention_policy
        if c.username:
            headers.update(urllib3.make_headers(basic_auth=f"{c.username}:{c.password or ''}"))
        return f"{self._base}/write?{urlencode(query)}", headers

    # -- writing ------------------------------------------------------------------------
    def encode_body(self, lines: list[str]) -> bytes:
        body = "\n".join(lines).encode("utf-8")
        return gzip.compress(body, compresslevel=1) if self.gzip else body

    def send(self, body: bytes, gzipped: bool) -> None:
        """One attempt: returns when written, raises WriteRetryable or WriteRejected."""
        headers = dict(self._headers)
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        response = self._request("POST", self._write_url, body=body, headers=headers)
        status = response.status
        if 200 <= status < 300:
            return
        message = _error_text(response.data)
        if status in _REJECTED:
            raise WriteRejected(status, message)
        raise WriteRetryable(f"HTTP {status} from {self._base}: {message}")

    def send_with_retry(self, body: bytes, gzipped: bool) -> None:
        """Retries retryable failures with exponential backoff and full jitter."""
        attempt = 0
        while True:
            try:
                self.send(body, gzipped)
                return
            except WriteRetryable:
                attempt += 1
                if attempt > self.config.max_retries:
                    raise
                time.sleep(backoff(attempt, self.config.retry_base_s, self.config.retry_max_s))

    # -- administration and queries (v1) ------------------------------------------------------
    def ping(self) -> bool:
        try:
            return 200 <= self._request("GET", f"{self._base}/ping").status < 300
        except WriteRetryable:
            return False

    def ensure_database(self) -> None:
        """InfluxDB 1.x: CREATE DATABASE is idempotent; nothing to do for v2."""
        if self.config.api == "v1" and self.config.create_database:
            self.query(f'CREATE DATABASE "{self.config.database}"', method="POST")

    def query(self, influxql: str, method: str = "GET") -> dict[str, Any]:
        """Run InfluxQL (v1 ``/query``; 2.x answers it for a bucket through its DBRP mapping,
        virtual since 2.4: database = bucket name); epoch=ns keeps timestamps exact."""
        c = self.config
        params = {"db": c.bucket if c.api == "v2" else c.database, "q": influxql, "epoch": "ns"}
        headers = {"Authorization": f"Token {c.token}"} if c.api == "v2" and c.token else {}
        if c.username and not headers:  # as /write does: never the password in the URL (logs)
            headers.update(urllib3.make_headers(basic_auth=f"{c.username}:{c.password or ''}"))
        response = self._request(method, f"{self._base}/query?{urlencode(params)}", headers=headers)
        if response.status >= 300:
            raise StoreError(f"query failed: HTTP {response.status}: {_error_text(response.data)}")
        result: dict[str, Any] = json.loads(response.data)
        return result

    def _request(self, method: str, url: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        try:
            return self._http.request(method, url, **kwargs)
        except urllib3.exceptions.HTTPError as exc:
            raise WriteRetryable(f"{self._base} unreachable: {exc}") from exc

    def close(self) -> None:
        self._http.clear()


def _error_text(data: bytes) -> str:
    try:
        decoded = json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")[:500]
    if isinstance(decoded, dict):
        return str(decoded.get("error") or decoded.get("message") or decoded)[:500]
    return str(decoded)[:500]
