"""Event-time panes with a watermark, allowed lateness, de-duplication and checkpoints.

Windows are built from *panes* (Li et al., "No pane, no gain", SIGMOD Record 2005): every
reading falls in exactly one pane of ``pane_s`` seconds; a tumbling window is one pane and a
sliding window of ``k`` panes sums the last ``k`` panes' partial aggregates. So a reading is
stored once however many windows it belongs to.

* The **watermark** is the newest event time seen minus ``delay_s``: readings up to ``delay_s``
  out of order are on time. A pane is *complete* when the watermark passes its end: its result
  is emitted. The event time one batch can advance it to is capped at the wall clock plus the
  allowed clock skew: one device whose clock runs ahead cannot close everyone's windows early
  (its readings still land in their own panes).
* **Allowed lateness**: a pane keeps its raw rows until the watermark passes its end plus
  ``lateness_s``. A late reading within it lands in the pane, which is emitted again (results
  are idempotent points, so the update overwrites). A reading later than that is *too late*:
  the caller counts and dead-letters it.
* **De-duplication**: rows are keyed by (entity, event time); when a pane is reduced only the
  last row of each key counts. So a message redelivered after a crash, or sent twice by a
  gateway, is never counted twice.
* **Checkpoints**: :meth:`PaneBuffer.state` and :meth:`PaneBuffer.restore` give the open panes
  as plain arrays, which the engine saves to disk with the watermark (``checkpoint.py``).

State is keyed by entity index, so a partition (a set of districts) can run in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.model.units import NS

Array = npt.NDArray[Any]


@dataclass(slots=True)
class Watermark:
    """Event-time progress of one partition."""

    delay_ns: int
    newest_ns: int = 0  # newest event time seen, each batch's capped at its limit (observe)
    forced_ns: int = 0  # set by flush(): treat everything up to here as complete
    ahead_ns: int = 0  # newest event time seen, uncapped (a clock ahead of the wall clock)

    @property
    def value_ns(self) -> int:
        return max(self.observed_ns, self.forced_ns)

    @property
    def observed_ns(self) -> int:
        """What the data says, ignoring flush(): deadman timers must not jump ahead."""
        return self.newest_ns - self.delay_ns

    def observe(self, ts_ns: Array, limit_ns: int | None = None) -> None:
        """Advance event time to the batch's newest reading, but not past ``limit_ns`` (the
        wall clock + the allowed skew): event time is what the honest clocks say."""
        if len(ts_ns):
            newest = int(ts_ns.max())
            self.ahead_ns = max(self.ahead_ns, newest)
            capped = newest if limit_ns is None else min(newest, limit_ns)
            self.newest_ns = max(self.newest_ns, capped)

    def newest_until(self, limit_ns: int | None = None) -> int:
        """The newest event time seen, readings ahead of ``limit_ns`` counted up to it
        (flush(): "everything seen so far" without trusting a clock from the future)."""
        ahead = self.ahead_ns if limit_ns is None else min(self.ahead_ns, limit_ns)
        return max(self.newest_ns, ahead)


@dataclass(slots=True)
class Pane:
    start_ns: int
    chunks: list[dict[str, Array]] = field(default_factory=list)
    emitted: bool = False
    dirty: bool = True  # rows added since the last emission

    def rows(self) -> dict[str, Array]:
        """All rows, de-duplicated on (entity, ts_ns): the last arrival wins."""
        return self.dedup(self.chunks)

    @staticmethod
    def dedup(chunks: list[dict[str, Array]]) -> dict[str, Array]:
        if not chunks:
            return {}
        if len(chunks) == 1:
            rows = chunks[0]
        else:
            rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        order = np.lexsort((np.arange(len(rows["ts_ns"])), rows["ts_ns"], rows["entity"]))
        entity, ts = rows["entity"][order], rows["ts_ns"][order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = (entity[1:] != entity[:-1]) | (ts[1:] != ts[:-1])
        keep = order[last]
        return {k: v[keep] for k, v in rows.items()}


class PaneBuffer:
    """Raw rows of one input, by pane, from arrival until the pane can no longer change."""

    def __init__(self, pane_s: float, lateness_s: float) -> None:
        self.pane_ns = round(pane_s * NS)
        self.lateness_ns = round(lateness_s * NS)
        self.panes: dict[int, Pane] = {}

    def pane_of(self, ts_ns: Array) -> Array:
        starts: Array = (ts_ns // self.pane_ns) * self.pane_ns
        return starts

    def add(self, watermark_ns: int, entity: Array, ts_ns: Array, **values: Array) -> Array:
        """Store rows; returns the mask of rows that came too late (not stored)."""
        starts = self.pane_of(ts_ns)
        too_late = starts + self.pane_ns + self.lateness_ns <= watermark_ns
        keep = ~too_late
        if not keep.any():
            return too_late
        starts, entity, ts_ns = starts[keep], entity[keep], ts_ns[keep]
        values = {k: v[keep] for k, v in values.items()}
        for start in np.unique(starts).tolist():
            rows = starts == start
            pane = self.panes.get(start)
            if pane is None:
                pane = self.panes[start] = Pane(start)
            chunk = {"entity": entity[rows], "ts_ns": ts_ns[rows]}
            chunk.update({k: v[rows] for k, v in values.items()})
            pane.chunks.append(chunk)
            pane.dirty = True
        return too_late

    def due(self, watermark_ns: int) -> list[Pane]:
        """Panes to emit: complete and never emitted, or updated by late rows since."""
        return sorted(
            (
                p
                for p in self.panes.values()
                if p.dirty and p.start_ns + self.pane_ns <= watermark_ns
            ),
            key=lambda p: p.start_ns,
        )

    def expire(self, watermark_ns: int) -> list[int]:
        """Forget panes that no reading can change any more; returns their starts."""
        gone = [s for s in self.panes if s + self.pane_ns + self.lateness_ns <= watermark_ns]
        for start in gone:
            del self.panes[start]
        return gone

    # -- checkpoints ----------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, Array]:
        out: dict[str, Array] = {}
        for start, pane in self.panes.items():
            for key, column in pane.rows().items():
                # flags: emitted, then dirty (late rows since the emission)
                out[f"{prefix}|{start}|{int(pane.emitted)}{int(pane.dirty)}|{key}"] = column
        return out

    def restore(self, prefix: str, arrays: dict[str, Array]) -> None:
        for name, column in arrays.items():
            if not name.startswith(f"{prefix}|"):
                continue
            _, start, flags, key = name.split("|")
            pane = self.panes.setdefault(int(start), Pane(int(start)))
            if not pane.chunks:
                pane.chunks.append({})
            pane.chunks[0][key] = column
            pane.emitted = flags[0] == "1"
            # older checkpoints have one flag: an emitted pane was taken as clean
            pane.dirty = flags[1] == "1" if len(flags) > 1 else not pane.emitted
