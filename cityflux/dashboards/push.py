"""``cityflux dashboards push``: create or update the InfluxDB data source, the cityflux folder
and every dashboard in a running Grafana through its HTTP API.

The push makes six calls (see :class:`Grafana`), over urllib3: the HTTP client the InfluxDB
writer already uses. grafana-client was used before; its HTTP stack (niquests) needs
urllib3-future, whose wheel replaces urllib3 in a plain ``pip install``.

Idempotent: the data source and folder are looked up by their fixed uids and updated when they
exist, and dashboards are saved with ``overwrite``; pushing twice leaves Grafana as pushing
once. Grafana instances provisioned from deploy/grafana/provisioning/ need no push."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import urllib3

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


class Grafana:
    """The six calls of Grafana's HTTP API the push makes, with a service-account token or
    basic auth. A 4xx/5xx answer or a network error is a :class:`PushError`."""

    def __init__(self, url: str, authorization: dict[str, str], timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Accept": "application/json", **authorization}
        self._http = urllib3.PoolManager(
            retries=False,  # one attempt: the push is run by hand and is idempotent
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        )

    def __enter__(self) -> Grafana:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.clear()

    def get_datasource(self, uid: str) -> dict[str, Any] | None:
        return self._get(f"/api/datasources/uid/{uid}")

    def create_datasource(self, source: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/datasources", source)

    def update_datasource(self, uid: str, source: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", f"/api/datasources/uid/{uid}", source)

    def get_folder(self, uid: str) -> dict[str, Any] | None:
        return self._get(f"/api/folders/{uid}")

    def create_folder(self, title: str, uid: str) -> dict[str, Any]:
        return self._call("POST", "/api/folders", {"title": title, "uid": uid})

    def save_dashboard(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/dashboards/db", body)

    def _get(self, path: str) -> dict[str, Any] | None:
        """The item at ``path``, or None where Grafana answers 404."""
        status, answer = self._send("GET", path, None)
        if status == 404:
            return None
        return _checked(status, answer, "GET", path)

    def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = self._send(method, path, body)
        return _checked(status, answer, method, path)

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, self.url + path, body=data, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            raise PushError(f"cannot reach Grafana at {self.url}: {exc}") from exc
        try:
            answer = json.loads(response.data) if response.data else {}
        except ValueError:
            answer = {"message": response.data[:200].decode(errors="replace")}
        return response.status, answer


def _checked(status: int, answer: Any, method: str, path: str) -> dict[str, Any]:
    """``answer`` when ``status`` is 2xx; else the :class:`PushError` that explains it."""
    if 200 <= status < 300:
        return answer if isinstance(answer, dict) else {}
    message = answer.get("message", "") if isinstance(answer, dict) else ""
    if status == 401:
        raise PushError(f"Grafana refused the credentials (HTTP 401): {message}")
    raise PushError(f"Grafana rejected a request: {method} {path}: HTTP {status}: {message}")


def connect(
    url: str, token: str | None = None, user: str | None = None, password: str | None = None
) -> Grafana:
    """A client for the Grafana at ``url`` with a service-account token or basic auth."""
    if token:
        return Grafana(url, {"Authorization": f"Bearer {token}"})
    if user:
        return Grafana(url, urllib3.make_headers(basic_auth=f"{user}:{password or ''}"))
    raise PushError("give a Grafana token (--token, $GRAFANA_TOKEN) or --user and --password")


def push(api: Grafana, source: dict[str, Any], dashboards: dict[str, dict[str, Any]]) -> PushReport:
    """Make the Grafana behind ``api`` hold ``source``, the folder and ``dashboards``
    (name -> dashboard JSON)."""
    report = PushReport()
    _upsert_datasource(api, source, report)
    _ensure_folder(api, report)
    for name, dashboard in dashboards.items():
        body = {
            "dashboard": {**dashboard, "id": None},
            "folderUid": FOLDER_UID,
            "overwrite": True,
            "message": f"cityflux dashboards push ({name})",
        }
        saved = api.save_dashboard(body)
        (report.created if saved.get("version") == 1 else report.updated).append(
            f"dashboard {dashboard['uid']}"
        )
    return report


def _upsert_datasource(api: Grafana, source: dict[str, Any], report: PushReport) -> None:
    name = f"data source {source['uid']}"
    if api.get_datasource(source["uid"]) is not None:
        api.update_datasource(source["uid"], source)
        report.updated.append(name)
    else:
        api.create_datasource(source)
        report.created.append(name)


def _ensure_folder(api: Grafana, report: PushReport) -> None:
    if api.get_folder(FOLDER_UID) is None:
        api.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
        report.created.append(f"folder {FOLDER_UID}")
