from __future__ import annotations

from pathlib import Path

import pytest

from cityflux.config import Config, load_config
from cityflux.errors import ConfigError


def test_defaults_work_locally() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert (config.mqtt.host, config.mqtt.port) == ("127.0.0.1", 1883)


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[mqtt]\nurl = "mqtts://broker.city:8884"\n[ingest]\nbatch_size = 100\n')
    config = load_config(
        path, environ={"CITYFLUX_INGEST__BATCH_SIZE": "250", "CITYFLUX_INFLUX__GZIP": "false"}
    )
    assert config.mqtt.port == 8884
    assert config.ingest.batch_size == 250
    assert config.influx.gzip is False


@pytest.mark.parametrize(
    ("toml", "environ", "message"),
    [
        ("[mqtt]\nurl = 'http://x'\n", {}, "mqtt.url"),
        ("[ingest]\nbatch_sise = 1\n", {}, "batch_sise"),
        ("", {"CITYFLUX_INGEST__BATCH_SIZE": "many"}, "batch_size"),
        ("", {"CITYFLUX_INGEST__BATCH_SIZE": "50000"}, "receive_maximum"),
        ("[influx]\napi = 'v2'\n", {}, "token"),
        ("[influx]\napi = 'v3'\n", {}, "api"),
        ("not toml [", {}, "invalid TOML"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, toml: str, environ: dict[str, str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ=environ)


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().mqtt.url = "mqtt://elsewhere"  # type: ignore[misc]


def test_example_city_map_is_valid() -> None:
    from cityflux.model.citymap import load_city_map
    from tests.support import ROOT

    city = load_city_map(ROOT / "examples" / "city-map.json")
    assert {d.id for d in city.districts} == {"centre", "riverside"}
    assert city.segment("seg-0001").next == ["seg-0002"]


def test_city_map_errors_are_specific(tmp_path: Path) -> None:
    import json

    from cityflux.model.citymap import load_city_map
    from tests.support import ROOT

    data = json.loads((ROOT / "examples" / "city-map.json").read_text())
    data["detectors"][0]["segment"] = "seg-9999"
    data["poles"][0]["district"] = "nowhere"
    path = tmp_path / "map.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown segment 'seg-9999'.*unknown district"):
        load_city_map(path)


def test_the_shipped_config_file_states_the_defaults() -> None:
    from tests.support import ROOT

    assert load_config(ROOT / "deploy" / "cityflux.toml", environ={}) == Config()


def test_the_packaged_city_map_is_the_example_map() -> None:
    """`analytics.city_map`'s default falls back to a copy shipped in the package (installs
    without a checkout): the two must not drift apart."""
    from tests.support import ROOT

    packaged = ROOT / "cityflux" / "analytics" / "city-map.json"
    assert packaged.read_bytes() == (ROOT / "examples" / "city-map.json").read_bytes()
