"""The ``cityflux`` command (also ``python -m cityflux``): one module per group of commands."""

from __future__ import annotations

from cityflux.cli import (
    alerts,
    dashboards,
    demo,
    devices,
    doctor,
    ingest,
    nats,
    scenario,
    simulate,
)
from cityflux.cli.common import app

__all__ = [
    "alerts",
    "app",
    "dashboards",
    "demo",
    "devices",
    "doctor",
    "ingest",
    "main",
    "nats",
    "scenario",
    "simulate",
]


def main() -> None:
    app()
