"""``cityflux dashboards push``: create or update the InfluxDB data source, the cityflux folder
and every dashboard in a running Grafana through its HTTP API (grafana-client).

Idempotent: the data source and folder are looked up by their fixed uids and updated when they
exist, and dashboards are saved with ``overwrite``; pushing twice leaves Grafana as pushing
once. Grafana instances provisioned from deploy/grafana/provisioning/ need no push."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import niquests
from grafana_client.api import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaUnauthorizedError,
)

from cityflux.config import InfluxConfig
from cityflux.dashboards.influxql import DATASOURCE_TYPE, DATASOURCE_UID
from cityflux.dashboards.verify import MIN_INTERVAL_S
from cityflux.errors import CityfluxError

DATASOURCE_NAME = "cityflux InfluxDB"
FOLDER_UID = "cityflux"
FOLDER_TITLE = "cityflux"


class PushError(CityfluxError):
    """Grafana could not be reached, refused the credentials, or rejected a request."""


@dataclass(slots=True)
class PushReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def datasource(
    influx: InfluxConfig, url: str | None = None, min_interval_s: float = MIN_INTERVAL_S
) -> dict[str, Any]:
    """The data source as Grafana's API takes it: InfluxQL against ``url`` (InfluxDB as Grafana
    reaches it; default ``influx.url``), database and credentials from the configuration, and
    cityflux's health interval as the minimum bucket width. InfluxDB 2.x/3.x answer InfluxQL
    for a bucket with a token (docs/dashboards.md)."""
    database = influx.bucket if influx.api == "v2" else influx.database
    json_data: dict[str, Any] = {
        "version": "InfluxQL",
        "dbName": database,
        "httpMode": "POST",
        "timeInterval": f"{max(1, round(min_interval_s))}s",
    }
    secure: dict[str, str] = {}
    payload: dict[str, Any] = {
        "uid": DATASOURCE_UID,
        "name": DATASOURCE_NAME,
        "type": DATASOURCE_TYPE,
        "access": "proxy",
        "url": url or influx.url,
        "database": database,
        "isDefault": False,
    }
    if influx.api == "v2":
        json_data["httpHeaderName1"] = "Authorization"
        secure["httpHeaderValue1"] = f"Token {influx.token or ''}"
    elif influx.username:
        payload["user"] = influx.username
        secure["password"] = influx.password or ""
    payload["jsonData"] = json_data
    if secure:
        payload["secureJsonData"] = secure
    return payload


def connect(
    url: str, token: str | None = None, user: str | None = None, password: str | None = None
) -> GrafanaApi:
    """A client for the Grafana at ``url`` with a service-account token or basic auth."""
    if token:
        return GrafanaApi.from_url(url, credential=token, timeout=10.0)
    if user:
        return GrafanaApi.from_url(url, credential=(user, password or ""), timeout=10.0)
    raise PushError("give a Grafana token (--token, $GRAFANA_TOKEN) or --user and --password")


def push(
    api: GrafanaApi, source: dict[str, Any], dashboards: dict[str, dict[str, Any]], where: str
) -> PushReport:
    """Make the Grafana at ``where`` hold ``source``, the folder and ``dashboards``
    (name -> dashboard JSON)."""
    report = PushReport()
    try:
        _upsert_datasource(api, source, report)
        _ensure_folder(api, report)
        for name, dashboard in dashboards.items():
            body = {
                "dashboard": {**dashboard, "id": None},
                "folderUid": FOLDER_UID,
                "overwrite": True,
                "message": f"cityflux dashboards push ({name})",
            }
            saved = api.dashboard.update_dashboard(body)
            (report.created if saved.get("version") == 1 else report.updated).append(
                f"dashboard {dashboard['uid']}"
            )
    except GrafanaUnauthorizedError as exc:
        raise PushError(f"Grafana refused the credentials (HTTP 401): {exc.message}") from exc
    except GrafanaException as exc:
        raise PushError(f"Grafana rejected a request: {exc.message}") from exc
    except niquests.exceptions.RequestException as exc:
        raise PushError(f"cannot reach Grafana at {where}: {exc}") from exc
    return report


def _upsert_datasource(api: GrafanaApi, source: dict[str, Any], report: PushReport) -> None:
    name = f"data source {source['uid']}"
    if _exists(lambda: api.datasource.get_datasource_by_uid(source["uid"])):
        api.datasource.update_datasource_by_uid(source["uid"], source)
        report.updated.append(name)
    else:
        api.datasource.create_datasource(source)
        report.created.append(name)


def _ensure_folder(api: GrafanaApi, report: PushReport) -> None:
    if not _exists(lambda: api.folder.get_folder(FOLDER_UID)):
        api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
        report.created.append(f"folder {FOLDER_UID}")


def _exists(get: Any) -> bool:
    try:
        get()
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return False
        raise
    return True
