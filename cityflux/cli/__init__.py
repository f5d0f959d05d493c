"""The ``cityflux`` command (also ``python -m cityflux``): one module per group of commands."""

from __future__ import annotations

from cityflux.cli import demo, ingest, simulate
from cityflux.cli.common import app

__all__ = ["app", "demo", "ingest", "main", "simulate"]


def main() -> None:
    app()
