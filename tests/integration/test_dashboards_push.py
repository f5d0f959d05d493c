"""``cityflux dashboards push`` against a stand-in for Grafana's HTTP API.

Grafana itself cannot be installed on this machine (no package, no container engine), so a
small HTTP server plays it: it implements the endpoints the push uses with Grafana's status
codes and answers, keeps their state (so a second push meets what the first created), checks
the credentials, and records every request. What is asserted is what Grafana would receive."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from cityflux.cli import app, extras
from cityflux.dashboards import catalog
from cityflux.dashboards.influxql import DATASOURCE_UID
from cityflux.servers import free_port

TOKEN = "glsa_cityflux_test_token"
BASIC = ("admin", "s3cret")


@dataclass
class FakeGrafana:
    """Grafana's datasource, folder and dashboard API, in memory."""

    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    provisioned: set[str] = field(default_factory=set)  # data sources from files: read-only

    def authorised(self, header: str | None) -> bool:
        basic = base64.b64encode(":".join(BASIC).encode()).decode()
        return header in (f"Bearer {TOKEN}", f"Basic {basic}")

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Route like Grafana: /api/<collection>[/uid]/<uid>, by method and depth."""
        parts = path.strip("/").split("/")
        routes = {
            ("GET", "datasources", 4): lambda: self.get(self.datasources, parts[3]),
            ("POST", "datasources", 2): lambda: self.create(self.datasources, body),
            ("PUT", "datasources", 4): lambda: self.update_datasource(parts[3], body),
            ("GET", "folders", 3): lambda: self.get(self.folders, parts[2]),
            ("POST", "folders", 2): lambda: self.create(self.folders, body),
            ("POST", "dashboards", 3): lambda: self.save_dashboard(body),
        }
        route = routes.get((method, parts[1] if len(parts) > 1 else "", len(parts)))
        return route() if route else (404, {"message": "Not found"})

    @staticmethod
    def get(items: dict[str, Any], uid: str) -> tuple[int, Any]:
        return (200, items[uid]) if uid in items else (404, {"message": "not found"})

    @staticmethod
    def create(items: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        if body["uid"] in items:
            return 409, {"message": "an item with the same uid already exists"}
        items[body["uid"]] = body
        return 200, {"uid": body["uid"], "message": "created"}

    def update_datasource(self, uid: str, body: dict[str, Any]) -> tuple[int, Any]:
        if uid not in self.datasources:
            return 404, {"message": "Data source not found"}
        if uid in self.provisioned:
            return 403, {"message": "Cannot update read-only data source"}
        self.datasources[uid] = body
        return 200, {"message": "Datasource updated", "datasource": body}

    def save_dashboard(self, body: dict[str, Any]) -> tuple[int, Any]:
        dashboard = body["dashboard"]
        uid = dashboard["uid"]
        if body.get("folderUid") not in self.folders:
            return 400, {"message": "folder not found"}
        if uid in self.dashboards and not body.get("overwrite"):
            return 412, {"status": "name-exists"}
        self.dashboards[uid] = body
        self.versions[uid] = self.versions.get(uid, 0) + 1
        return 200, {"uid": uid, "status": "success", "version": self.versions[uid]}


@pytest.fixture
def grafana() -> Iterator[tuple[FakeGrafana, str]]:
    fake = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            fake.requests.append((self.command, self.path, body))
            if fake.authorised(self.headers.get("Authorization")):
                status, answer = fake.handle(self.command, self.path, body)
            else:
                status, answer = 401, {"message": "Unauthorized"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["dashboards", "push", *args], catch_exceptions=False)


def writes(fake: FakeGrafana) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _ in fake.requests if m != "GET"]


def test_push_creates_the_datasource_folder_and_every_dashboard(
    grafana: tuple[FakeGrafana, str],
) -> None:
    fake, url = grafana
    result = run("--grafana-url", url, "--token", TOKEN, "--influx-url", "http://influxdb:8086")
    assert result.exit_code == 0, result.output
    committed = {p.name: catalog.load(p) for p in sorted(catalog.DEFAULT_DIR.glob("*.json"))}
    assert writes(fake) == [("POST", "/api/datasources"), ("POST", "/api/folders")] + [
        ("POST", "/api/dashboards/db")
    ] * len(committed)
    source = fake.datasources[DATASOURCE_UID]
    assert source["type"] == "influxdb" and source["url"] == "http://influxdb:8086"
    assert source["jsonData"]["version"] == "InfluxQL" and source["database"] == "cityflux"
    assert fake.folders == {"cityflux": {"uid": "cityflux", "title": "cityflux"}}
    for dashboard in committed.values():
        saved = fake.dashboards[dashboard["uid"]]
        assert saved["dashboard"] == {**dashboard, "id": None}  # the committed JSON, as is
        assert saved["folderUid"] == "cityflux" and saved["overwrite"] is True
    assert "created dashboard cityflux-overview" in result.output


def test_a_second_push_updates_in_place(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    assert run("--grafana-url", url, "--token", TOKEN).exit_code == 0
    first = len(fake.requests)
    result = run("--grafana-url", url, "--token", TOKEN)
    assert result.exit_code == 0, result.output
    second = [(m, p) for m, p, _ in fake.requests[first:] if m != "GET"]
    assert second[0] == ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")
    assert ("POST", "/api/folders") not in second  # the folder exists: not created again
    assert len(fake.datasources) == 1 and len(fake.folders) == 1
    assert len(fake.dashboards) == len(catalog.DASHBOARDS)
    assert set(fake.versions.values()) == {2}
    assert "updated dashboard cityflux-traffic" in result.output


def test_basic_auth_works_too(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    result = run("--grafana-url", url, "--user", BASIC[0], "--password", BASIC[1])
    assert result.exit_code == 0, result.output
    assert len(fake.dashboards) == len(catalog.DASHBOARDS)


def test_bad_credentials_are_a_clear_error_and_change_nothing(
    grafana: tuple[FakeGrafana, str],
) -> None:
    fake, url = grafana
    result = run("--grafana-url", url, "--token", "wrong")
    assert result.exit_code == 1
    assert "refused the credentials (HTTP 401)" in result.output
    assert writes(fake) == [] and not fake.dashboards


def test_missing_credentials_are_a_clear_error() -> None:
    result = run("--grafana-url", "http://127.0.0.1:9")
    assert result.exit_code == 1 and "give a Grafana token" in result.output


def test_an_unreachable_grafana_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run("--grafana-url", url, "--token", TOKEN)
    assert result.exit_code == 1
    assert f"cannot reach Grafana at {url}" in result.output


def test_a_refused_request_is_a_clear_error_and_stops_the_push(
    grafana: tuple[FakeGrafana, str],
) -> None:
    fake, url = grafana
    fake.datasources[DATASOURCE_UID] = {"uid": DATASOURCE_UID}
    fake.provisioned.add(DATASOURCE_UID)
    result = run("--grafana-url", url, "--token", TOKEN)
    assert result.exit_code == 1
    assert (
        f"Grafana rejected a request: PUT /api/datasources/uid/{DATASOURCE_UID}: HTTP 403: "
        "Cannot update read-only data source"
    ) in " ".join(result.output.split())  # unwrapped from the console's width
    assert writes(fake) == [("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")]
    assert fake.datasources[DATASOURCE_UID] == {"uid": DATASOURCE_UID} and not fake.dashboards


def test_without_the_extra_the_command_names_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a module that cannot be installed stands for the SDK of an install without [dashboards]
    monkeypatch.setitem(extras.EXTRAS, "dashboards", ("cityflux_no_such_module",))
    result = CliRunner().invoke(app, ["dashboards", "push", "--grafana-url", "http://x"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: this command needs cityflux_no_such_module: pip install 'cityflux[dashboards]'"
    ]
