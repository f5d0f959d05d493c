"""Quality control of the poles' low-cost air sensors, for all poles at once (docs/analytics.md).

* **stuck**: a PM value repeating exactly: at least ``STUCK_MIN_READINGS`` readings over the
  last ``STUCK_PANES`` panes (15 minutes) and all equal. PM sensors report to 0.1 µg/m³ with a
  few % of noise, so ten equal values in a row do not happen to a working one; the gases are
  reported to whole µg/m³ and legitimately repeat, so they are not judged stuck.
* **drift**: a pole's 1-hour mean departing from the robust median of its district (its
  neighbours) by more than ``DRIFT_K`` scaled median absolute deviations (1.4826 MAD, the
  normal-consistent scale) and by at least the item's floor, while the neighbours agree (at
  least ``MIN_NEIGHBOURS`` poles with data, their scaled MAD under ``AGREE_SHARE`` of the
  median). How long it must last before it is alerted is the rule's ``for_s``.
* **out of physics**: PM2.5 above PM10 (PM10 includes PM2.5).

Flagged poles keep their own AQI (with the flag written beside it) and are left out of the
district AQI (:func:`district_means`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from cityflux.analytics.aqi import joined

Array = npt.NDArray[Any]
STUCK_ITEMS: Final = ("pm25", "pm10")
STUCK_PANES: Final = 3
STUCK_MIN_READINGS: Final = 10
# least departure worth calling drift, in the item's unit (CO mg/m³, the rest µg/m³)
DRIFT_FLOOR: Final = {"pm25": 15.0, "pm10": 20.0, "no2": 30.0, "so2": 20.0, "co": 0.5, "o3": 40.0}
DRIFT_K: Final = 3.0
MAD_SCALE: Final = 1.4826
MIN_NEIGHBOURS: Final = 5
AGREE_SHARE: Final = 0.5


@dataclass(slots=True)
class Quality:
    stuck: Array  # float 1/0 per pole (any PM item stuck), NaN: no readings to judge
    drift: Array  # float 1/0 per pole, NaN: not judged (no data or the district disagrees)
    physics: Array  # float 1/0: PM2.5 above PM10
    flags: Array  # str: "stuck:pm25,drift:no2,pm25>pm10", "" when clean

    @property
    def flagged(self) -> Array:
        result: Array = (self.stuck == 1) | (self.drift == 1) | (self.physics == 1)
        return result


def stuck_items(recent: dict[str, Array]) -> dict[str, Array]:
    """Per stuck item: 1 stuck, 0 not, NaN too few readings, from the recent panes' partials
    (``{item}_n``, ``{item}_min``, ``{item}_max``)."""
    out = {}
    for item in STUCK_ITEMS:
        enough = recent[f"{item}_n"] >= STUCK_MIN_READINGS
        same = recent[f"{item}_min"] == recent[f"{item}_max"]
        out[item] = np.where(enough, same.astype(np.float64), np.nan)
    return out


def group_median(values: Array, group: Array, groups: int) -> tuple[Array, Array]:
    """(median, count) of the non-NaN ``values`` of each group, vectorised: one sort."""
    ok = ~np.isnan(values)
    v, g = values[ok], group[ok]
    order = np.lexsort((v, g))
    v, g = v[order], g[order]
    count = np.bincount(g, minlength=groups)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    has = count > 0
    lo = np.where(has, start + (count - 1) // 2, 0)
    hi = np.where(has, start + count // 2, 0)
    if len(v) == 0:
        return np.full(groups, np.nan), count
    median = np.where(has, (v[np.minimum(lo, len(v) - 1)] + v[np.minimum(hi, len(v) - 1)]) / 2,
                      np.nan)  # fmt: skip
    return median, count


def drifting(means: dict[str, Array], district: Array, districts: int) -> dict[str, Array]:
    """Per item: 1 the pole departs from its agreeing district, 0 it does not, NaN unjudged."""
    out = {}
    for item, floor in DRIFT_FLOOR.items():
        x = means[item]
        median, count = group_median(x, district, districts)
        mad, _ = group_median(np.abs(x - median[district]), district, districts)
        scale = MAD_SCALE * mad
        agree = (count >= MIN_NEIGHBOURS) & (scale <= AGREE_SHARE * np.abs(median))
        departure = np.abs(x - median[district])
        with np.errstate(invalid="ignore"):
            far = (departure > DRIFT_K * scale[district]) & (departure >= floor)
        judged = agree[district] & ~np.isnan(x)
        out[item] = np.where(judged, far.astype(np.float64), np.nan)
    return out


def check(
    means: dict[str, Array], recent: dict[str, Array], district: Array, districts: int
) -> Quality:
    """The quality of every pole's last hour: ``means`` the 1-hour means (pm25, pm10, ...),
    ``recent`` the partials of the last ``STUCK_PANES`` panes, ``district`` each pole's
    district index."""
    stuck = stuck_items(recent)
    drift = drifting(means, district, districts)
    with np.errstate(invalid="ignore"):
        physics = np.where(
            np.isnan(means["pm25"]) | np.isnan(means["pm10"]),
            np.nan,
            (means["pm25"] > means["pm10"]).astype(np.float64),
        )
    labels = [(f"stuck:{k}", v) for k, v in stuck.items()]
    labels += [(f"drift:{k}", v) for k, v in drift.items()] + [("pm25>pm10", physics)]
    flags = joined([name for name, _ in labels], np.vstack([v == 1 for _, v in labels]))
    return Quality(
        stuck=_any(list(stuck.values())), drift=_any(list(drift.values())), physics=physics,
        flags=flags,
    )  # fmt: skip


def _any(columns: list[Array]) -> Array:
    """1 where any column is 1, 0 where some is 0 and none 1, NaN where all are NaN."""
    stacked = np.vstack(columns)
    result: Array = np.where(
        (stacked == 1).any(axis=0), 1.0, np.where((stacked == 0).any(axis=0), 0.0, np.nan)
    )
    return result


def district_means(
    values: dict[str, Array], usable: Array, district: Array, districts: int
) -> dict[str, Array]:
    """Per district, the mean of each item over the ``usable`` poles that have it."""
    out = {}
    for item, x in values.items():
        ok = usable & ~np.isnan(x)
        total = np.bincount(district[ok], weights=x[ok], minlength=districts)
        count = np.bincount(district[ok], minlength=districts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[item] = np.where(count > 0, total / count, np.nan)
    return out
