"""What the analytics hand to the store: typed results, not yet line protocol.

A :class:`Table` is the result of one measurement at one instant for a fixed set of entities
(the links, the districts, the poles of the city map): its tag columns never change between
windows, so the encoder builds each row's series once and keys that cache by ``series``. A
:class:`Point` is one point on its own (an alert's state). ``store.lineprotocol`` encodes both;
docs/schema.md says which measurement holds what.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

FieldValue = float | int | bool | str
Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Table:
    """One row per selected entity of a fixed tag set, all at ``ts_ns``.

    ``tags`` holds the tag columns of *every* entity of the set (the same each time for the
    same ``series``, e.g. ``"segment/1m"``); ``rows`` selects the rows this table has (a
    boolean mask or indices into those columns; ``None``: all of them). ``fields`` are numpy
    columns of the selected rows only, in the order they are written: NaN, an empty string
    or -1 in an int8 bool column means absent, and a row with no field present is skipped.
    """

    measurement: str
    series: str
    tags: Mapping[str, Sequence[str]]
    fields: Mapping[str, Array]
    ts_ns: int
    rows: Array | None = None


@dataclass(frozen=True, slots=True)
class Point:
    """A single point; empty tag values are dropped, fields are written in their order."""

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    ts_ns: int


Result = Table | Point
