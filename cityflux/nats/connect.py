"""A NATS connection from :class:`NatsConfig`, and the raw JetStream API calls nats-py lacks.

nats-py 2.16 has no priority groups (ADR-42) nor durable sourcing consumers (ADR-60), so
cityflux sends those requests itself: :func:`js_request` posts a JSON body to a
``$JS.API.…`` subject and turns the server's ``error`` into a :class:`NatsError` carrying the
server's error code and description.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any, Final

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsClientError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from cityflux.config import NatsConfig, TlsConfig
from cityflux.errors import NatsError

log = logging.getLogger(__name__)

# reconnect forever, at this pace: a cluster node comes back in 2-4 s (docs/scale.md)
RECONNECT_WAIT_S: Final = 1.0
CONNECT_TIMEOUT_S: Final = 5.0  # one attempt at one server
API_TIMEOUT_S: Final = 10.0  # a JetStream API answer (an R3 stream create takes ~0.1 s)

# JetStream API error codes cityflux tests for
JS_STREAM_NOT_FOUND: Final = 10059
JS_CONSUMER_NOT_FOUND: Final = 10014


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.insecure:
        context.check_hostname = False
    return context


async def connect(config: NatsConfig, name: str, wait_s: float | None = None) -> Client:
    """Connected to one of ``config.urls``; reconnects forever afterwards. ``wait_s`` bounds the
    first connection (a command line tool must not hang on a wrong URL): NatsError after it."""
    last: list[BaseException] = []

    async def error_cb(exc: Exception) -> None:
        # one line, not nats-py's default traceback per failed reconnect attempt
        if not last or type(last[-1]) is not type(exc):
            log.warning("NATS %s: %s", name, exc or type(exc).__name__)
        last[:] = [exc]

    async def reconnected_cb() -> None:
        log.info("NATS %s: reconnected", name)

    options: dict[str, Any] = {
        "servers": list(config.urls),
        "name": name,
        "error_cb": error_cb,
        "reconnected_cb": reconnected_cb,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "connect_timeout": CONNECT_TIMEOUT_S,
    }
    if config.user is not None:
        options |= {"user": config.user, "password": config.password or ""}
    if config.creds_file is not None:
        options["user_credentials"] = config.creds_file
    # a CA or a client certificate given means TLS with them: a nats:// URL to a server that
    # requires TLS is upgraded by nats-py, which would otherwise verify against the system CAs
    # (measured: CERTIFICATE_VERIFY_FAILED with nats.tls.ca_file set)
    tls = config.tls
    given = tls.enabled or tls.ca_file is not None or tls.cert_file is not None
    if given or any(url.startswith("tls://") for url in config.urls):
        options["tls"] = tls_context(tls)
    try:
        return await asyncio.wait_for(nats.connect(**options), wait_s)
    except TimeoutError as exc:
        why = f": {last[-1]}" if last else ""
        raise NatsError(
            f"cannot reach NATS at {', '.join(config.urls)} within {wait_s:.0f}s{why}"
        ) from exc
    except (OSError, NatsClientError) as exc:
        raise NatsError(f"cannot connect to NATS at {', '.join(config.urls)}: {exc}") from exc


async def js_request(
    nc: Client, subject: str, body: dict[str, Any] | None = None, timeout_s: float = API_TIMEOUT_S
) -> dict[str, Any]:
    """One JetStream API request (``$JS.API.…``); the server's error is a NatsError."""
    payload = json.dumps(body).encode() if body is not None else b""
    try:
        reply = await nc.request(subject, payload, timeout=timeout_s)
    except NoRespondersError as exc:
        raise NatsError(f"{subject}: no responders (is JetStream enabled?)", 503) from exc
    except NatsTimeoutError as exc:
        raise NatsError(f"{subject}: no answer within {timeout_s:.0f}s", 408) from exc
    answer: dict[str, Any] = json.loads(reply.data)
    error = answer.get("error")
    if error:
        code = int(error.get("err_code") or error.get("code") or 0)
        raise NatsError(f"{subject}: {error.get('description', error)} (error {code})", code)
    return answer
