"""The ``cityflux`` command (also ``python -m cityflux``): one module per group of commands."""

from __future__ import annotations

from cityflux.cli import alerts, demo, ingest, scenario, simulate
from cityflux.cli.common import app

__all__ = ["alerts", "app", "demo", "ingest", "main", "scenario", "simulate"]


def main() -> None:
    app()
