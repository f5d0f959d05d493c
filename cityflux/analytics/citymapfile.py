"""Where the analytics find their city map: configuration first, then the packaged default.

``analytics.city_map`` names a file. A path that exists is used as given (absolute, or relative
to the working directory). The shipped default name (``examples/city-map.json``, the config's
default) falls back to the copy packaged with cityflux (``cityflux/analytics/city-map.json``), so
an installed cityflux runs from any directory without a checkout. Any other missing path is
returned unchanged and fails loudly when loaded.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cityflux.model.citymap import CityMap, load_city_map

DEFAULT_NAME = "examples/city-map.json"  # config.AnalyticsConfig.city_map's default
PACKAGED = "city-map.json"  # package data of cityflux.analytics (pyproject package-data)


def load_configured_map(path: str) -> CityMap:
    """The city map ``analytics.city_map`` names (see the module docstring)."""
    if path != DEFAULT_NAME or Path(path).exists():
        return load_city_map(path)
    with resources.as_file(resources.files("cityflux.analytics").joinpath(PACKAGED)) as shipped:
        return load_city_map(shipped)
