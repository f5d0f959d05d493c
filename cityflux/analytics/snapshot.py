"""The engine's state as named arrays and back: what a checkpoint holds (written and read by
:mod:`cityflux.analytics.checkpoint`), and the :class:`~checkpoint.Layout` a file must fit.

Open panes, window partials, watermark and per-device state. (Alerts are in SQLite already.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics import checkpoint as checkpoint_file
from cityflux.analytics.environment import POLE_INPUTS, POLE_PARTIALS
from cityflux.analytics.traffic import PARTIALS

if TYPE_CHECKING:
    from cityflux.analytics.engine import AnalyticsEngine

Array = npt.NDArray[Any]
_LANE_COLUMNS = frozenset({"entity", "ts_ns", "count", "occupancy_pct", "speed_kmh", "interval_s"})
_POLE_COLUMNS = frozenset({"entity", "ts_ns", *POLE_INPUTS})
# what issue 13 added to the pole panes and partials: checkpoints from before it still load
_ADDED = frozenset({"so2_ugm3", "no2_ugm3", "co_mgm3", "o3_ugm3", "noise_lmax_dba"}) | (
    frozenset(POLE_PARTIALS) - {"pm25_sum", "pm25_n", "pm10_sum", "pm10_n", "energy_sum",
                                "noise_n", "lamp_rows", "lamp_bad"}
)  # fmt: skip


def state(engine: AnalyticsEngine) -> dict[str, Array]:
    """Everything a restart needs (caller holds the engine's locks)."""
    w = engine.watermark
    arrays: dict[str, Array] = {
        "watermark": np.array([w.newest_ns, w.forced_ns, w.ahead_ns], dtype=np.int64),
        "last_seen": engine.last_seen,
        "manhole_level": engine.manholes.last_level,
        "manhole_ts": engine.manholes.last_ts,
        "manhole_rise": engine.manholes.rise,
        "stuck_count": engine.stuck_count,
        "last_station_speed": engine.last_station_speed,
        "pole_hour_means": engine.pole_hours.values,
        "pole_hour_index": engine.pole_hours.hour,
    }
    arrays |= engine.traffic.state("traffic") | engine.poles.state("poles")
    for name, store in (("station", engine.station_parts), ("pole", engine.pole_parts)):
        for start, parts in store.items():
            arrays |= {f"{name}#{start}#{k}": v for k, v in parts.items()}
    for i, occupancy in enumerate(engine.california.history):
        arrays[f"california#{i}"] = occupancy
    california = engine.california
    arrays |= {"california_tentative": california.tentative,
               "california_active": california.active,
               "california_quiet": california.quiet}  # fmt: skip
    return arrays


def layout(engine: AnalyticsEngine) -> checkpoint_file.Layout:
    """What this engine's checkpoints hold (taken from its state before a restore)."""
    fixed = {k: v for k, v in state(engine).items() if "|" not in k and "#" not in k}
    stations, poles = len(engine.city.detectors), len(engine.city.poles)
    return checkpoint_file.Layout(
        arrays=fixed,
        optional=frozenset(
            {
                "manhole_rise",
                "stuck_count",
                "last_station_speed",
                "pole_hour_means",
                "pole_hour_index",
            }
        ),
        panes={"traffic": (_LANE_COLUMNS, stations * 16), "poles": (_POLE_COLUMNS, poles)},
        partials={
            "station": (frozenset(PARTIALS), stations),
            "pole": (frozenset(POLE_PARTIALS), poles),
        },
        series={"california": (3, stations)},
        added=_ADDED,
    )


def apply(engine: AnalyticsEngine, arrays: dict[str, Array]) -> None:
    """Take the state of a checked checkpoint (checkpoint_file.check: nothing here fails)."""
    newest, forced, *ahead = (int(v) for v in arrays["watermark"])
    engine.watermark.newest_ns, engine.watermark.forced_ns = newest, forced
    engine.watermark.ahead_ns = max([newest, *ahead])
    engine.last_seen = arrays["last_seen"]
    manholes = engine.manholes
    manholes.last_level, manholes.last_ts = arrays["manhole_level"], arrays["manhole_ts"]
    manholes.rise = arrays.get("manhole_rise", manholes.rise)
    engine.stuck_count = arrays.get("stuck_count", engine.stuck_count)
    engine.last_station_speed = arrays.get("last_station_speed", engine.last_station_speed)
    hours = engine.pole_hours
    hours.values = arrays.get("pole_hour_means", hours.values)
    hours.hour = arrays.get("pole_hour_index", hours.hour)
    engine.traffic.restore("traffic", arrays)
    engine.poles.restore("poles", arrays)
    for name, store in (("station", engine.station_parts), ("pole", engine.pole_parts)):
        for key, value in arrays.items():
            if key.startswith(f"{name}#"):
                _, start, part = key.split("#")
                store.setdefault(int(start), {})[part] = value
    california = engine.california
    california.history = [arrays[f"california#{i}"] for i in range(3)
                          if f"california#{i}" in arrays]  # fmt: skip
    california.tentative = arrays["california_tentative"]
    california.active = arrays["california_active"]
    california.quiet = arrays["california_quiet"]
    _fill_added(engine)


def _fill_added(engine: AnalyticsEngine) -> None:
    """An older checkpoint's pole panes and partials get what later versions added: no
    readings (NaN columns; zero sums and counts, empty ranges)."""
    for pane in engine.poles.panes.values():
        for chunk in pane.chunks:
            rows = len(chunk["ts_ns"])
            for name in _POLE_COLUMNS - set(chunk):
                chunk[name] = np.full(rows, np.nan)
    poles = len(engine.city.poles)
    empty = {"_min": np.inf, "_max": -np.inf}
    for parts in engine.pole_parts.values():
        for key in set(POLE_PARTIALS) - set(parts):
            parts[key] = np.full(poles, empty.get(key[-4:], 0.0))
