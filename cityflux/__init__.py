"""cityflux: MQTT ingest, validation and storage for a city's street-level IoT."""

from cityflux.config import Config, load_config
from cityflux.errors import (
    CityfluxError,
    ConfigError,
    MqttError,
    ServerError,
    SpoolError,
    SpoolFull,
    StoreError,
    WriteRejected,
    WriteRetryable,
)
from cityflux.pipeline.pipeline import Pipeline

__version__ = "0.1.0"

__all__ = [
    "CityfluxError",
    "Config",
    "ConfigError",
    "MqttError",
    "Pipeline",
    "ServerError",
    "SpoolError",
    "SpoolFull",
    "StoreError",
    "WriteRejected",
    "WriteRetryable",
    "__version__",
    "load_config",
]
