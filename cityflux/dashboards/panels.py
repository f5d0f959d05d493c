"""Panels as cityflux draws them: one function per visualisation, all on the InfluxDB data
source, so the dashboard modules read as a list of questions and their queries."""

from __future__ import annotations

from typing import Protocol, Self, TypeVar

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import gauge, geomap, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models import geomap as geomap_model

from cityflux.dashboards.influxql import DATASOURCE, DATASOURCE_TYPE, Query

AnyPanel = cogbuilder.Builder[dashboard.Panel]

# GB/T 33171-2016 congestion levels of the TPI (0-10): smooth, basically smooth, light,
# moderate, severe (docs/analytics.md)
TPI_STEPS = [(None, "green"), (2.0, "#9ac48a"), (4.0, "yellow"), (6.0, "orange"), (8.0, "red")]
LEVEL_STEPS = [(None, "green"), (2.0, "#9ac48a"), (3.0, "yellow"), (4.0, "orange"), (5.0, "red")]
# HJ 633 AQI categories: good, moderate, light, moderate, heavy, severe pollution
AQI_STEPS = [
    (None, "green"),
    (51.0, "yellow"),
    (101.0, "orange"),
    (151.0, "red"),
    (201.0, "purple"),
    (301.0, "dark-red"),
]
SEVERITY_STEPS = [(None, "blue"), (1.0, "orange")]


def thresholds(steps: list[tuple[float | None, str]]) -> dash.ThresholdsConfig:
    return (
        dash.ThresholdsConfig()
        .mode(dashboard.ThresholdsMode.ABSOLUTE)
        .steps([dashboard.Threshold(value=value, color=color) for value, color in steps])
    )


def _last() -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


class _PanelBuilder(Protocol):
    """What every panel builder of the SDK has (each its own class, no common base)."""

    def title(self, title: str) -> Self: ...
    def description(self, description: str) -> Self: ...
    def datasource(self, datasource: dashboard.DataSourceRef) -> Self: ...
    def targets(self, targets: list[cogbuilder.Builder[cogvariants.Dataquery]]) -> Self: ...
    def span(self, w: int) -> Self: ...
    def height(self, h: int) -> Self: ...
    def time_from(self, time_from: str) -> Self: ...


P = TypeVar("P", bound=_PanelBuilder)


def _framed(
    panel: P,
    title: str,
    queries: tuple[Query, ...],
    width: int,
    height: int,
    description: str,
    time_from: str | None = None,
) -> P:
    """A panel on the cityflux data source, with its title, queries and size; ``time_from``
    gives it its own range, the last this long ("15m"), as "now" panels want."""
    framed = (
        panel.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(list(queries))
        .span(width)
        .height(height)
    )
    return framed.time_from(time_from) if time_from else framed


def time_series(
    title: str,
    *queries: Query,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    description: str = "",
    steps: list[tuple[float | None, str]] | None = None,
    interval: str | None = None,
) -> timeseries.Panel:
    panel = (
        _framed(timeseries.Panel(), title, queries, width, height, description)
        .unit(unit)
        .line_width(1)
        .fill_opacity(10)
        .span_nulls(False)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
    )
    if steps is not None:
        panel = panel.thresholds(thresholds(steps)).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED)
        )
    if interval is not None:
        panel = panel.interval(interval)
    return panel


def single_stat(
    title: str,
    *queries: Query,
    unit: str = "short",
    width: int = 6,
    height: int = 5,
    steps: list[tuple[float | None, str]] | None = None,
    description: str = "",
    no_value: str | None = None,
    time_from: str | None = None,
) -> stat.Panel:
    panel = (
        _framed(stat.Panel(), title, queries, width, height, description, time_from)
        .unit(unit)
        .reduce_options(_last())
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .thresholds(thresholds(steps or [(None, "green")]))
    )
    return panel.no_value(no_value) if no_value is not None else panel


def dial(
    title: str,
    *queries: Query,
    steps: list[tuple[float | None, str]],
    maximum: float,
    width: int = 6,
    height: int = 8,
    unit: str = "short",
    description: str = "",
) -> gauge.Panel:
    return (
        _framed(gauge.Panel(), title, queries, width, height, description)
        .unit(unit)
        .min(0)
        .max(maximum)
        .decimals(1)
        .reduce_options(_last())
        .thresholds(thresholds(steps))
        .show_threshold_markers(True)
    )


def grid(
    title: str,
    *queries: Query,
    width: int = 12,
    height: int = 8,
    sort_by: str | None = None,
    description: str = "",
    time_from: str | None = None,
) -> table.Panel:
    panel = (
        _framed(table.Panel(), title, queries, width, height, description, time_from)
        # InfluxQL returns one frame per series: merged, each series is one row
        .with_transformation(dashboard.DataTransformerConfig(id_val="merge", options={}))
    )
    if sort_by is not None:
        panel = panel.sort_by(
            [common_builders.TableSortByFieldState().display_name(sort_by).desc(True)]
        )
    return panel


def states(
    title: str,
    *queries: Query,
    width: int = 24,
    height: int = 8,
    steps: list[tuple[float | None, str]] | None = None,
    colors: dict[str, str] | None = None,
    description: str = "",
) -> statetimeline.Panel:
    panel = (
        _framed(statetimeline.Panel(), title, queries, width, height, description)
        .show_value(common.VisibilityMode.AUTO)
        .merge_values(True)
        .line_width(0)
        .fill_opacity(70)
    )
    if steps is not None:
        panel = panel.thresholds(thresholds(steps)).color_scheme(
            dash.FieldColor().mode(dashboard.FieldColorModeId.THRESHOLDS)
        )
    if colors:
        panel = panel.mappings([_value_colors(colors)])
    return panel


def _value_colors(colors: dict[str, str]) -> dashboard.ValueMap:
    return dashboard.ValueMap(
        options={
            value: dashboard.ValueMappingResult(color=color, index=index)
            for index, (value, color) in enumerate(colors.items())
        }
    )


def points_layer(
    name: str, ref_id: str, color_field: str | None, fixed_color: str = "dark-green"
) -> common_builders.MapLayerOptions:
    """Markers at each row's ``lat``/``lon`` from query ``ref_id``, coloured by the panel's
    thresholds applied to ``color_field`` (or all ``fixed_color``)."""
    color: dict[str, object] = {"fixed": fixed_color}
    if color_field is not None:
        color["field"] = color_field
    return (
        common_builders.MapLayerOptions()
        .type("markers")
        .name(name)
        .tooltip(True)
        .location(
            common_builders.FrameGeometrySource()
            .mode(common.FrameGeometrySourceMode.COORDS)
            .latitude("lat")
            .longitude("lon")
        )
        .filter_data({"id": "byRefId", "options": ref_id})
        .config(
            {
                "showLegend": True,
                "style": {
                    "size": {"fixed": 6, "min": 4, "max": 12},
                    "color": color,
                    "opacity": 0.8,
                    "symbol": {"mode": "fixed", "fixed": "img/icons/marker/circle.svg"},
                },
            }
        )
    )


def city_map(
    title: str,
    *queries: Query,
    layers: list[cogbuilder.Builder[common.MapLayerOptions]],
    steps: list[tuple[float | None, str]],
    width: int = 24,
    height: int = 14,
    description: str = "",
    time_from: str | None = None,
) -> geomap.Panel:
    return (
        _framed(geomap.Panel(), title, queries, width, height, description, time_from)
        .view(geomap.MapViewConfig().id("fit").zoom(12).all_layers(True))
        .tooltip(geomap.TooltipOptions().mode(geomap_model.TooltipMode.DETAILS))
        .basemap(common_builders.MapLayerOptions().type("default").name("Basemap"))
        .layers(layers)
        .thresholds(thresholds(steps))
        .color_scheme(dash.FieldColor().mode(dashboard.FieldColorModeId.THRESHOLDS))
    )


def fixed_colour(colour: str) -> dashboard.DynamicConfigValue:
    """A field override: always this colour."""
    return dashboard.DynamicConfigValue(
        id_val="color", value={"mode": "fixed", "fixedColor": colour}
    )


def rename_by_regex(regex: str, pattern: str) -> dashboard.DataTransformerConfig:
    """Rename series: regex columns come back as ``last_rejections_total.schema``."""
    return dashboard.DataTransformerConfig(
        id_val="renameByRegex", options={"regex": regex, "renamePattern": pattern}
    )


__all__ = ["DATASOURCE_TYPE", "AnyPanel"]


def tag_variable(
    name: str,
    label: str,
    query: str,
    *,
    include_all: bool = True,
    multi: bool = False,
) -> dash.QueryVariable:
    """A variable listing a tag's values; "All" matches everything (``.*``) instead of
    expanding to every value, which keeps the queries short on a large city."""
    variable = (
        dash.QueryVariable(name)
        .id(name)  # the SDK gives every variable the same zero uuid
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dashboard.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(include_all)
    )
    return variable.all_value(".*") if include_all else variable


def district_variable(measurement: str) -> dash.QueryVariable:
    return tag_variable(
        "district", "District", f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "district"'
    )
