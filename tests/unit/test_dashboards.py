"""The dashboards as code: the committed JSON is the generator's, valid for the foundation
SDK's schema, wired to the provisioned data source; and the deploy files hang together."""

from __future__ import annotations

import configparser
import json
import re
import shutil
from importlib import metadata
from pathlib import Path

import urllib3
import yaml

from cityflux.dashboards import catalog
from cityflux.dashboards.influxql import DATASOURCE_TYPE, DATASOURCE_UID
from cityflux.dashboards.verify import expand, interval_for, targets
from tests.support import ROOT

DEPLOY = ROOT / "deploy"


def committed() -> dict[str, dict]:
    return {p.name: catalog.load(p) for p in sorted(catalog.DEFAULT_DIR.glob("*.json"))}


def test_committed_json_is_what_the_generator_makes() -> None:
    assert catalog.stale() == []
    assert set(committed()) == set(catalog.DASHBOARDS)


def test_the_check_notices_a_hand_edit(tmp_path: Path) -> None:
    shutil.copytree(catalog.DEFAULT_DIR, tmp_path / "d")
    edited = tmp_path / "d" / "traffic.json"
    edited.write_text(edited.read_text().replace('"Flow"', '"Flow!"'))
    (tmp_path / "d" / "mine.json").write_text("{}")
    (tmp_path / "d" / "alerts.json").unlink()
    assert sorted(catalog.stale(tmp_path / "d")) == [
        "alerts.json: missing", "mine.json: extra (not generated)",
        "traffic.json: differs from the generator",
    ]  # fmt: skip


def test_dashboards_fit_the_sdk_schema() -> None:
    for name, dashboard in committed().items():
        assert catalog.schema_problems(dashboard) == [], name
    broken = committed()["overview.json"]
    broken["panels"][0]["colour"] = "red"
    assert catalog.schema_problems(broken) == [".panels[0].colour: not in the schema"]


def test_every_query_uses_the_provisioned_influxdb_source() -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/cityflux.yaml")
                                 .read_text())["datasources"]  # fmt: skip
    assert [(d["uid"], d["type"]) for d in provisioned] == [(DATASOURCE_UID, DATASOURCE_TYPE)]
    assert provisioned[0]["jsonData"]["version"] == "InfluxQL"
    for name, dashboard in committed().items():
        panels = dashboard["panels"]
        assert [p["id"] for p in panels] == list(range(1, len(panels) + 1)), name
        for panel in panels:
            assert panel["datasource"] == {"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID}
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID and target["rawQuery"]
        for variable in dashboard.get("templating", {}).get("list", []):
            assert variable["datasource"]["uid"] == DATASOURCE_UID


def test_panels_do_not_overlap() -> None:
    for name, dashboard in committed().items():
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, (name, panel["title"])
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"])}  # fmt: skip
            assert not cells & mine, (name, panel["title"])
            cells |= mine


def test_grafana_macros_expand_like_grafana() -> None:
    query = (
        'SELECT mean("tpi") FROM "traffic_segment" WHERE "segment" =~ /^$segment$/ AND '
        '"district" =~ /^$district$/ AND $timeFilter GROUP BY time($__interval)'
    )
    start, end = 1_700_000_000_000_000_000, 1_700_003_600_000_000_000
    values = {"segment": r"s\-0001", "district": ".*"}
    assert expand(query, start, end, "10s", values) == (
        'SELECT mean("tpi") FROM "traffic_segment" WHERE "segment" =~ /^s\\-0001$/ AND '
        '"district" =~ /^.*$/ AND time >= 1700000000000ms and time <= 1700003600000ms '
        "GROUP BY time(10s)"
    )
    hour, week = 3600 * 10**9, 7 * 86400 * 10**9
    assert interval_for(0, hour, None) == "10s"  # 3.6 s raw, rounded to 5 s: the minimum
    assert interval_for(0, hour, None, floor_s=1) == "5s"
    assert interval_for(0, 6 * hour, None) == "20s"  # 21.6 s raw, as Grafana rounds it
    assert interval_for(0, week, None) == "10m"  # 605 s raw
    assert interval_for(0, 10**9 * 60, "30s") == "30s"  # the panel's own minimum


def test_every_panel_has_a_query_and_the_annotations_are_alert_changes() -> None:
    for name, dashboard in committed().items():
        found = list(targets(dashboard))
        assert {t.panel for t in found if not t.panel.startswith("annotation")} == {
            p["title"] for p in dashboard["panels"]
        }, name
        for annotation in dashboard.get("annotations", {}).get("list", []):
            target = annotation["target"]
            assert 'FROM "cityflux_alert"' in target["query"] and "$timeFilter" in target["query"]
            assert target["textColumn"] == "message"


def test_urllib3_is_the_real_one_and_nothing_pulls_urllib3_future() -> None:
    # urllib3-future's wheel (pulled by grafana-client's niquests, dropped for urllib3 in
    # dashboards/push.py) writes its own files over urllib3's: the module imported would then
    # not be the distribution installed, and its patch version is >= 900
    assert urllib3.__version__ == metadata.version("urllib3")
    assert int(urllib3.__version__.split(".")[2]) < 900
    gone = {"urllib3-future", "niquests", "grafana-client"}
    installed = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    assert not gone & installed
    # nor does cityflux or any of its extras ask for them
    required = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower()
                for r in metadata.requires("cityflux") or []}  # fmt: skip
    assert "urllib3" in required and not gone & required


def test_compose_references_only_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mosquitto", "influxdb", "grafana", "cityflux"} <= set(services)
    assert services["influxdb"]["image"].startswith("influxdb:2")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source}"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        for dependency in service.get("depends_on", []):
            assert dependency in services


def test_compose_secrets_come_from_the_environment() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    example = dict(
        line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            if re.search("PASSWORD|TOKEN", key):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required and required <= set(example)
    assert ".env" in (ROOT / ".gitignore").read_text()


def test_the_broker_grafana_and_cityflux_agree_on_paths() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    mounts = {v.split(":")[1] for s in compose.values() for v in s.get("volumes", [])}
    conf = (DEPLOY / "mosquitto/mosquitto.conf").read_text()
    for key in ("password_file", "acl_file"):
        path = re.search(rf"^{key} (\S+)$", conf, re.M).group(1)  # type: ignore[union-attr]
        assert any(path == m or path.startswith(m + "/") for m in mounts), key
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cityflux.yaml")
                              .read_text())["providers"][0]  # fmt: skip
    assert provider["options"]["path"] in mounts
    grafana_env = compose["grafana"]["environment"]
    source = (DEPLOY / "grafana/provisioning/datasources/cityflux.yaml").read_text()
    for variable in re.findall(r"\$\{(\w+)\}", source):
        assert variable in grafana_env, variable


def test_systemd_unit_runs_cityflux() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd/cityflux.service")
    service = unit["Service"]
    assert "cityflux run --config /etc/cityflux/cityflux.toml" in service["ExecStart"]
    assert service["Restart"] == "always" and service["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_dashboard_json_is_plain_json() -> None:
    for path in catalog.DEFAULT_DIR.glob("*.json"):
        assert json.loads(path.read_text())["uid"].startswith("cityflux-")


def test_docs_list_every_panel() -> None:
    docs = (ROOT / "docs" / "dashboards.md").read_text()
    for name, dashboard in committed().items():
        assert f"`{name}`" in docs
        for panel in dashboard["panels"]:
            assert f"| {panel['title']} | {panel['type']} | " in docs, panel["title"]
