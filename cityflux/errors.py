"""The one error tree of cityflux.

Library errors (paho, urllib3, msgspec, OS) are translated at the edge of each stage with
``raise ... from exc``, so callers only ever catch :class:`CityfluxError` subclasses.
"""

from __future__ import annotations


class CityfluxError(Exception):
    """Root of every error cityflux raises on purpose."""


class ConfigError(CityfluxError):
    """The configuration file or a ``CITYFLUX_*`` variable is invalid."""


class ServerError(CityfluxError):
    """A local server (mosquitto, influxd, victoria-metrics) is missing or failed to start."""


class MqttError(CityfluxError):
    """The MQTT side failed: connect, subscribe, publish or acknowledge."""


class MqttProtocolError(MqttError):
    """The broker sent a malformed or forbidden packet: drop the connection and reconnect."""


class NatsError(CityfluxError):
    """NATS or JetStream failed: unreachable, or the server refused a request (its error code
    and description are in the message and in ``code``)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class StoreError(CityfluxError):
    """Writing to the time-series database failed."""


class WriteRetryable(StoreError):
    """The database is unreachable or overloaded (network error, 5xx, 429): try again later."""


class WriteRejected(StoreError):
    """The database refused the data itself (4xx other than 429): retrying cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class SpoolError(StoreError):
    """The disk spool cannot accept or return data."""


class SpoolFull(SpoolError):
    """The spool reached its size cap: stop acknowledging so the broker keeps the messages."""
