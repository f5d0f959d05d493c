"""`cityflux devices nats-accounts`: the passwords file, the subjects, the refusals. The
accounts themselves are run by real nats-servers in tests/integration/test_nats_accounts.py."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityflux.cli import app
from cityflux.cli.devices import nats_accounts, nats_subject, read_passwords
from cityflux.errors import ConfigError
from cityflux.model.citymap import load_city_map
from tests.support import ROOT

CITY_MAP = ROOT / "examples" / "city-map.json"
DEVICES = ["pole-0001", "pole-0107", "mh-0042", "det-0001", "det-0002", "det-0003", "det-0007",
           "det-0008"]  # fmt: skip


def test_subjects_are_what_the_mqtt_listener_makes_of_topics() -> None:
    assert nats_subject("cityflux/v1/d1/pole/p-1") == "cityflux.v1.d1.pole.p-1"
    assert nats_subject("cityflux/v1/d.1/pole/p.1/status") == "cityflux.v1.d//1.pole.p//1.status"


def test_missing_passwords_are_generated_once_into_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "devices.txt"
    first = read_passwords(path, ["a", "b", "a"])
    assert set(first) == {"a", "b"} and len(set(first.values())) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_passwords(path, ["a", "b"]) == first  # stable: nothing appended
    assert len(path.read_text().splitlines()) == 2
    path.write_text("# comment\n\nc:with:colons\n")
    assert read_passwords(path, ["c"]) == {"c": "with:colons"}


@pytest.mark.parametrize(
    ("line", "error"),
    [("cityflux:pw", "is a role"), ("pole-1:$2a$11$abc", "must not start with $2"),
     ("no-colon", "expected device_id:password"), ("empty:", "expected device_id:password")],
)  # fmt: skip
def test_bad_password_lines_are_refused(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "devices.txt"
    path.write_text(f"{line}\n")
    with pytest.raises(ConfigError, match=error.replace("$", r"\$")):
        read_passwords(path, [])


def test_every_device_may_publish_only_its_two_subjects() -> None:
    city = load_city_map(CITY_MAP)
    text = nats_accounts(city, "cityflux/v1", "cityflux.p", dict.fromkeys(DEVICES, "pw"))
    users = [line for line in text.splitlines() if line.strip().startswith("{user:")]
    assert len(users) == 1 + len(DEVICES)
    assert "password: $NATS_CITYFLUX_PASSWORD," in users[0]
    pole = next(line for line in users if '"pole-0001"' in line)
    grants = json.loads(pole[pole.index("permissions: ") + 13 : -1])
    assert grants == {
        "publish": {"allow": ["cityflux.v1.centre.pole.pole-0001",
                              "cityflux.v1.centre.pole.pole-0001.status"]},
        "subscribe": {"deny": [">"]},
    }  # fmt: skip
    with pytest.raises(ConfigError, match="has no password"):
        nats_accounts(city, "cityflux/v1", "cityflux.p", {})
    with pytest.raises(ConfigError, match="control character"):
        nats_accounts(city, "cityflux/v1", "cityflux.p", dict.fromkeys(DEVICES, "a\nb"))


def test_a_device_named_like_a_role_is_refused(tmp_path: Path) -> None:
    city = json.loads(CITY_MAP.read_text())
    city["poles"][0]["id"] = "cityflux"
    city_map = tmp_path / "city.json"
    city_map.write_text(json.dumps(city))
    out = tmp_path / "accounts.conf"
    result = CliRunner().invoke(app, ["devices", "nats-accounts", str(city_map), "--passwords",
                                      str(tmp_path / "d.txt"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1 and "role account" in result.output
    assert not out.exists()


def test_the_command_writes_a_private_file(tmp_path: Path) -> None:
    out = tmp_path / "accounts.conf"
    args = ["devices", "nats-accounts", str(CITY_MAP), "--passwords", str(tmp_path / "d.txt"),
            "-o", str(out), "--role", "operator"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "$NATS_OPERATOR_PASSWORD" in out.read_text()
    bad = CliRunner().invoke(app, [*args[:-1], "admin"])
    assert bad.exit_code == 1 and "--role must be operator or simulator" in bad.output
