"""Per-domain handlers of the analytics engine: what each kind of reading does on arrival
(``INTAKE``, one entry per kind) and the windows of the kinds that have them.

Adding a device kind: write its ``add(engine, cols, entity, out)`` in a module here and register
it in ``INTAKE``; a kind without an entry is stored raw and only counts for the deadman.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from cityflux.analytics.domains import manholes, poles, status, traffic
from cityflux.analytics.results import Output
from cityflux.model.columns import Columns

if TYPE_CHECKING:
    from cityflux.analytics.engine import AnalyticsEngine

Intake = Callable[["AnalyticsEngine", Columns, npt.NDArray[Any], Output], None]

INTAKE: dict[str, Intake] = {
    "traffic": traffic.add,
    "pole": poles.add,
    "manhole": manholes.add,
    "status": status.add,
}
