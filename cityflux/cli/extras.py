"""Commands whose dependencies are an optional extra (pyproject ``[project.optional-dependencies]``)
check for them first: without them the command ends with the one line that installs them, not
an ImportError traceback. ``cityflux run`` and the other core commands need no extra."""

from __future__ import annotations

from importlib.util import find_spec

import typer

# extra -> the top-level modules it provides that cityflux imports
EXTRAS = {
    "dashboards": ("grafana_foundation_sdk",),
    "report": ("matplotlib",),
}


def require(extra: str) -> None:
    """Exit (status 2) naming the ``pip install`` line when ``extra`` is not installed."""
    missing = [name for name in EXTRAS[extra] if find_spec(name) is None]
    if missing:
        typer.echo(
            f"error: this command needs {', '.join(missing)}: pip install 'cityflux[{extra}]'",
            err=True,
        )
        raise typer.Exit(2)
