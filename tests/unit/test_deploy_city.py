"""The city on NATS as deploy/ ships it, checked without a container engine: compose's `city`
profile hangs together with nats/nats.conf and with cityflux's configuration, and the systemd
template unit runs one named worker. (nats.conf itself runs in three real nats-servers in
tests/integration/test_nats_accounts.py.)"""

from __future__ import annotations

import configparser
import re
from typing import Any

import msgspec
import yaml

from cityflux.config import ENV_PREFIX, Config, load_config
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
NATS_CONF = (DEPLOY / "nats" / "nats.conf").read_text()


def services(profile: str) -> dict[str, dict[str, Any]]:
    """What `docker compose --profile PROFILE up` starts: services of no profile, and its own."""
    every = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    return {n: s for n, s in every.items() if profile in s.get("profiles", [profile])}


def _config_keys(struct: type, prefix: str = "") -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(struct):
        name = f"{prefix}{field.name.upper()}"
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            keys |= _config_keys(field.type, f"{name}__")
        else:
            keys.add(name)
    return keys


def _environment(service: dict[str, Any]) -> dict[str, str]:
    # ${VAR:?...} and ${VAR:-default}: what compose would put there from .env
    return {k: re.sub(r"\$\{\w+:[?-][^}]*\}", "secret", str(v))
            for k, v in service.get("environment", {}).items()}  # fmt: skip


def test_the_city_profile_runs_nats_workers_influxdb_and_grafana_not_mosquitto() -> None:
    city = services("city")
    nodes = sorted(n for n in city if n.startswith("nats-") and n[5:].isdigit())
    workers = sorted(n for n in city if n.startswith("worker-"))
    assert nodes == ["nats-1", "nats-2", "nats-3"] and len(workers) >= 2
    assert {"nats-accounts", "nats-init", "influxdb", "grafana", "city-map"} <= set(city)
    assert not {"mosquitto", "mqtt-credentials", "cityflux", "simulator"} & set(city)
    # and the one-machine profiles do not start NATS
    for profile in ("mqtt", "demo"):
        assert {"mosquitto", "cityflux"} <= set(services(profile))
        assert not [n for n in services(profile) if n.startswith(("nats", "worker"))]
    # no two services publish the same host port
    published = [p.rsplit(":", 1)[0].split("}:")[-1] for s in city.values()
                 for p in s.get("ports", [])]  # fmt: skip
    assert len(published) == len(set(published)), published


def test_every_cityflux_variable_is_a_config_key_and_loads() -> None:
    keys = _config_keys(Config)
    for name, service in services("city").items():
        env = _environment(service)
        # as load_config reads them (Grafana's CITYFLUX_INFLUX_URL has no "__": not ours)
        ours = {k[len(ENV_PREFIX) :]: v for k, v in env.items()
                if k.startswith(ENV_PREFIX) and "__" in k}  # fmt: skip
        assert set(ours) <= keys, f"{name}: {set(ours) - keys}"
        if not ours:
            continue
        config = load_config(None, env)  # types convert: a list of URLs, a number
        assert config.source.kind == "nats", name
        assert config.nats.urls == tuple(f"nats://nats-{i}:4222" for i in (1, 2, 3))
        assert config.nats.replicas == 3 and config.nats.user == "cityflux"


def test_workers_wait_for_init_which_waits_for_three_healthy_nodes() -> None:
    city = services("city")
    assert city["nats-init"]["depends_on"] == {
        f"nats-{i}": {"condition": "service_healthy"} for i in (1, 2, 3)
    }
    assert "nats init" in " ".join(city["nats-init"]["command"])
    workers = {n: s for n, s in city.items() if n.startswith("worker-")}
    for worker in workers.values():
        assert worker["depends_on"]["nats-init"] == {"condition": "service_completed_successfully"}
        assert worker["command"][:2] == ["cityflux", "run"] and worker["restart"]
    # each worker a name of its own in the cluster, its own spool, its own metrics port
    for key in ("CITYFLUX_MQTT__CLIENT_ID", "CITYFLUX_SPOOL__DIR"):
        values = [w["environment"][key] for w in workers.values()]
        assert len(set(values)) == len(workers), key
    assert len({w["ports"][0] for w in workers.values()}) == len(workers)


def test_the_nodes_run_the_shipped_conf_with_the_generated_accounts() -> None:
    city = services("city")
    # nats.conf's variables are set on every node, and its routes name the three services
    settings = "\n".join(line for line in NATS_CONF.splitlines() if not line.startswith("#"))
    variables = set(re.findall(r"\$(NATS_\w+)", settings))
    assert variables == {"NATS_SERVER_NAME"}
    routes = re.findall(r"nats-route://([\w-]+):6222", NATS_CONF)
    assert sorted(routes) == ["nats-1", "nats-2", "nats-3"]
    include = re.search(r'^include "(.+)"$', NATS_CONF, re.M).group(1)  # type: ignore[union-attr]
    writer = city["nats-accounts"]
    out = writer["command"][writer["command"].index("--out") + 1]
    volume = next(v.split(":")[0] for v in writer["volumes"] if out.startswith(v.split(":")[1]))
    for name in routes:
        node = city[name]
        assert node["environment"]["NATS_SERVER_NAME"] == name
        assert "NATS_CITYFLUX_PASSWORD" in node["environment"]  # the accounts file reads it
        mounts = dict(v.split(":")[:2][::-1] for v in node["volumes"])
        assert mounts["/etc/nats/nats.conf"] == "./nats/nats.conf"
        assert node["command"] == ["--config", "/etc/nats/nats.conf"]
        # the include, relative to nats.conf, is the file nats-accounts writes
        directory = f"/etc/nats/{include.rsplit('/', 1)[0]}"
        assert mounts[directory] == volume and out.endswith(include.rsplit("/", 1)[1])
        assert node["depends_on"]["nats-accounts"] == {
            "condition": "service_completed_successfully"
        }
        assert "/healthz" in " ".join(node["healthcheck"]["test"])
    data = {next(v for v in city[n]["volumes"] if v.endswith(":/data")) for n in routes}
    assert len(data) == 3  # a store directory each
    assert "stream_replicas: 3" in NATS_CONF


def test_the_template_unit_runs_one_named_worker() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "cityflux@.service")
    service = unit["Service"]
    assert "cityflux run --config /etc/cityflux/cityflux.toml" in service["ExecStart"]
    assert service["Restart"] == "always" and service["KillSignal"] == "SIGTERM"
    # configparser keeps the last of repeated keys: read the instance settings from the text
    text = (DEPLOY / "systemd" / "cityflux@.service").read_text()
    settings = dict(re.findall(r"^Environment=(CITYFLUX_\w+)=(.*)$", text, re.M))
    assert settings["CITYFLUX_MQTT__CLIENT_ID"] == "cityflux-%i"
    assert all("%i" in settings[k] for k in settings)
    assert {k[len(ENV_PREFIX) :] for k in settings} <= _config_keys(Config)
    assert "ReadWritePaths=/var/lib/cityflux/%i" in text
    # the same hardening as the single unit
    single = (DEPLOY / "systemd" / "cityflux.service").read_text()
    for line in ("NoNewPrivileges=true", "ProtectSystem=strict", "ProtectHome=true",
                 "PrivateTmp=true"):  # fmt: skip
        assert line in single and line in text


def test_a_list_key_takes_comma_separated_items_from_the_environment() -> None:
    config = load_config(None, {"CITYFLUX_NATS__URLS": "nats://a:4222, nats://b:4222",
                                "CITYFLUX_NATS__PASSWORD": "p,w"})  # fmt: skip
    assert config.nats.urls == ("nats://a:4222", "nats://b:4222")
    assert config.nats.password == "p,w"  # a string key keeps its commas
