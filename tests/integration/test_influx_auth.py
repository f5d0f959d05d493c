"""InfluxDB 1.x with authentication: queries send the password as HTTP basic auth, never in
the URL (where access logs, proxies and shell histories keep it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cityflux.config import InfluxConfig
from cityflux.errors import StoreError
from cityflux.servers import LocalInfluxDB
from cityflux.store.influx import InfluxWriter

PASSWORD = "s3cret-pw"


class AuthInfluxDB(LocalInfluxDB):
    """The test InfluxDB with auth-enabled and its HTTP access log on."""

    def command(self) -> list[str]:
        command = super().command()
        conf = self.data_dir / "influxdb.conf"
        text = conf.read_text().replace("log-enabled = false", "log-enabled = true")
        conf.write_text(text + "  auth-enabled = true\n")
        return command


@pytest.fixture
def influx(tmp_path: Path) -> Iterator[AuthInfluxDB]:
    with AuthInfluxDB(tmp_path / "influxdb") as server:
        yield server


def test_queries_use_basic_auth_not_the_url(influx: AuthInfluxDB) -> None:
    # with no user yet, InfluxDB accepts exactly this statement without credentials
    InfluxWriter(InfluxConfig(url=influx.url)).query(
        f"CREATE USER admin WITH PASSWORD '{PASSWORD}' WITH ALL PRIVILEGES", method="POST"
    )
    config = InfluxConfig(url=influx.url, database="authdb", username="admin", password=PASSWORD)
    writer = InfluxWriter(config)
    writer.ensure_database()
    writer.send(writer.encode_body(["m v=1 1", "m v=2 2"]), gzipped=False)
    result = writer.query('SELECT count("v") FROM "m"')
    assert result["results"][0]["series"][0]["values"][0][1] == 2
    wrong = InfluxWriter(InfluxConfig(url=influx.url, username="admin", password="nope"))
    with pytest.raises(StoreError, match="401"):
        wrong.query("SHOW DATABASES")
    log = influx.log_file.read_text()
    assert "/query" in log  # the access log is on, so the check below can fail
    assert "p=" not in log and PASSWORD not in log
