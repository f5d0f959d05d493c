"""The columnar batch that flows from decode to validate to the store, and rejections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.model.contract import Reason

IntArray = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.int32]
ObjectArray = npt.NDArray[np.object_]

# Bool fields are stored as int8 so that "absent" (-1) needs no mask beside the column.
BOOL_ABSENT = -1


@dataclass(frozen=True, slots=True)
class Rejection:
    """One rejected message (reading is None) or one rejected reading of an array payload."""

    reason: Reason
    message: str
    index: int  # position of the message in its batch
    reading: int | None = None


@dataclass(slots=True)
class Columns:
    """Readings of one kind, one row per reading (per lane for traffic), as numpy columns.

    ``tags`` hold strings (object arrays); ``fields`` hold float64 (NaN = absent), int64, or
    int8 bools (-1 = absent). ``message_index`` and ``reading_index`` point back at the payload
    each row came from, so a bad row can be rejected with a precise address.
    """

    kind: str
    tags: dict[str, ObjectArray]
    fields: dict[str, npt.NDArray[Any]]
    ts_ns: IntArray
    message_index: IndexArray
    reading_index: IndexArray
    # rows that belong to one reading share a group id (traffic: the lanes of one interval)
    group: IndexArray = field(default_factory=lambda: np.empty(0, np.int32))

    def __len__(self) -> int:
        return len(self.ts_ns)

    def select(self, keep: npt.NDArray[np.bool_]) -> Columns:
        return Columns(
            kind=self.kind,
            tags={name: column[keep] for name, column in self.tags.items()},
            fields={name: column[keep] for name, column in self.fields.items()},
            ts_ns=self.ts_ns[keep],
            message_index=self.message_index[keep],
            reading_index=self.reading_index[keep],
            group=self.group[keep],
        )

    def readings(self) -> int:
        """Readings (not rows): a traffic reading with four lanes is one reading."""
        return len(np.unique(self.group)) if len(self.group) else 0


@dataclass(slots=True)
class Decoded:
    """What the decoder made of one batch of messages."""

    columns: dict[str, Columns]
    rejections: list[Rejection]
    ignored: int = 0  # cityflux's own topics (dead letters, alerts) seen on the wildcard
