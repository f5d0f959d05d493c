"""InfluxQL queries for Grafana's InfluxDB data source, in the foundation SDK's shape.

The SDK ships query types for Prometheus, Loki and others but none for InfluxDB, so this is the
one piece we add: a ``Dataquery`` variant (the SDK's extension point) with a builder, and an
annotation target. InfluxQL is what InfluxDB 1.x, 2.x (through DBRP mappings) and 3.x all
answer (docs/dashboards.md)."""

from __future__ import annotations

from typing import Any, Literal, Self

from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

DATASOURCE_TYPE = "influxdb"
DATASOURCE_UID = "cityflux-influxdb"
DATASOURCE = dashboard.DataSourceRef(type_val=DATASOURCE_TYPE, uid=DATASOURCE_UID)

ResultFormat = Literal["time_series", "table"]


class Dataquery(cogvariants.Dataquery):
    """A raw InfluxQL query as Grafana's InfluxDB data source stores it in a panel target."""

    def __init__(
        self,
        query: str = "",
        ref_id: str = "A",
        result_format: ResultFormat = "time_series",
        alias: str | None = None,
        hide: bool | None = None,
    ) -> None:
        self.query = query
        self.ref_id = ref_id
        self.result_format = result_format
        self.alias = alias
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "datasource": DATASOURCE,
            "refId": self.ref_id,
            "query": self.query,
            "rawQuery": True,
            "resultFormat": self.result_format,
        }
        if self.alias is not None:
            payload["alias"] = self.alias
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        return cls(
            query=data.get("query", ""),
            ref_id=data.get("refId", "A"),
            result_format=data.get("resultFormat", "time_series"),
            alias=data.get("alias"),
            hide=data.get("hide"),
        )


def variant_config() -> cogruntime.DataqueryConfig:
    """Register with ``cogruntime.register_dataquery_variant`` so that the SDK's
    ``Dashboard.from_json`` reads our targets back as this type."""
    return cogruntime.DataqueryConfig(
        identifier=DATASOURCE_TYPE, from_json_hook=Dataquery.from_json
    )


class Query(cogbuilder.Builder[cogvariants.Dataquery]):
    """``Query('SELECT ...').table().alias('$tag_segment')``"""

    def __init__(self, query: str) -> None:
        self._internal = Dataquery(query=query)

    def build(self) -> Dataquery:
        return self._internal

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def table(self) -> Self:
        self._internal.result_format = "table"
        return self

    def alias(self, alias: str) -> Self:
        """Series name; ``$tag_<key>`` is replaced by the series' tag value."""
        self._internal.alias = alias
        return self


class AnnotationTarget(dashboard.AnnotationTarget):
    """The query of an InfluxDB annotation: each row is one annotation at its ``time``, with
    the text and tags taken from the named columns (Grafana 10+ keeps them in the target)."""

    def __init__(self, query: str, text_column: str, tags_column: str) -> None:
        super().__init__()
        self.query = query
        self.text_column = text_column
        self.tags_column = tags_column

    def to_json(self) -> dict[str, object]:
        return {
            "refId": "Anno",
            "query": self.query,
            "rawQuery": True,
            "fromAnnotations": True,
            "textEditor": True,
            "resultFormat": "table",
            "textColumn": self.text_column,
            "tagsColumn": self.tags_column,
        }


def annotation(
    name: str, query: str, color: str, text_column: str, tags_column: str
) -> cogbuilder.Builder[dashboard.AnnotationQuery]:
    """An annotation from InfluxDB (``tags_column``: comma-separated column names)."""
    return (
        dashboard_builders.AnnotationQuery()
        .name(name)
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color(color)
        .target(_Target(AnnotationTarget(query, text_column, tags_column)))
    )


class _Target(cogbuilder.Builder[dashboard.AnnotationTarget]):
    def __init__(self, target: AnnotationTarget) -> None:
        self.target = target

    def build(self) -> AnnotationTarget:
        return self.target
