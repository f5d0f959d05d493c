"""``cityflux doctor``'s checks of the database and the spool, and :class:`Finding`, what
every check returns (the broker's checks are in :mod:`cityflux.cli.doctor_broker`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import urllib3

from cityflux.config import Config
from cityflux.errors import CityfluxError, StoreError
from cityflux.store.influx import InfluxWriter

Level = Literal["loss", "warning", "ok", "check"]


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    check: str
    detail: str
    fix: str = ""


class DoctorError(CityfluxError):
    """A server could not be reached or refused the doctor."""


# -- InfluxDB -------------------------------------------------------------------------------
def check_database(config: Config, timeout_s: float) -> list[Finding]:
    influx = msgspec.structs.replace(config.influx, timeout_s=timeout_s)
    writer = InfluxWriter(influx)
    try:
        if not writer.ping():
            return [
                Finding(
                    "loss",
                    "database",
                    f"{influx.url} does not answer /ping",
                    "cityflux.toml [influx]: url (or start the database)",
                )
            ]
        if influx.api == "v2":
            return [_retention_v2(influx, timeout_s), _write_probe(writer, read_back=False)]
        retention, exists = _retention_v1(writer)
        if not exists:
            return [retention]
        return [retention, _write_probe(writer, read_back=True)]
    finally:
        writer.close()


def _retention_v1(writer: InfluxWriter) -> tuple[Finding, bool]:
    """(the finding, whether the database exists)."""
    c = writer.config
    check = "database retention"
    try:
        result = writer.query(f'SHOW RETENTION POLICIES ON "{c.database}"')["results"][0]
    except (StoreError, KeyError, IndexError) as exc:
        return Finding("loss", check, f"SHOW RETENTION POLICIES failed: {exc}"), False
    if "error" in result:
        if "not found" in result["error"] and c.create_database:
            return Finding(
                "check",
                check,
                f"database {c.database} does not exist yet: cityflux "
                "creates it at start (infinite retention)",
            ), False
        return Finding("loss", check, result["error"], "cityflux.toml [influx]: database"), False
    series = result.get("series", [{}])[0]
    rows = [
        dict(zip(series.get("columns", []), row, strict=True)) for row in series.get("values", [])
    ]
    wanted = [
        r
        for r in rows
        if r["name"] == c.retention_policy or (c.retention_policy is None and r["default"])
    ]
    if not wanted:
        return Finding(
            "loss",
            check,
            f"no retention policy {c.retention_policy!r} on {c.database}",
            "cityflux.toml [influx]: retention_policy",
        ), True
    rp = wanted[0]
    if rp["duration"] in ("0s", "0"):
        return Finding("ok", check, f"{c.database}.{rp['name']} keeps data forever"), True
    return Finding(
        "warning",
        check,
        f"{c.database}.{rp['name']} deletes readings older than {rp['duration']}",
        f'if not meant: ALTER RETENTION POLICY "{rp["name"]}" ON "{c.database}" DURATION INF',
    ), True


def _retention_v2(influx: Any, timeout_s: float) -> Finding:
    check = "database retention"
    url = f"{influx.url.rstrip('/')}/api/v2/buckets"
    headers = {"Authorization": f"Token {influx.token}"}
    try:
        response = urllib3.request(
            "GET",
            url,
            fields={"name": influx.bucket, "org": influx.org},
            headers=headers,
            timeout=timeout_s,
            retries=False,
        )
        buckets = json.loads(response.data).get("buckets", []) if response.status == 200 else []
    except (urllib3.exceptions.HTTPError, ValueError) as exc:
        return Finding("warning", check, f"cannot read the bucket: {exc}")
    if not buckets:
        return Finding(
            "loss",
            check,
            f"no bucket {influx.bucket} in org {influx.org} (HTTP {response.status})",
            "cityflux.toml [influx]: bucket, org, token",
        )
    expire = [r.get("everySeconds", 0) for r in buckets[0].get("retentionRules", [])]
    if not expire or not expire[0]:
        return Finding("ok", check, f"bucket {influx.bucket} keeps data forever")
    return Finding(
        "warning",
        check,
        f"bucket {influx.bucket} deletes readings older than {expire[0]}s",
        f"if not meant: influx bucket update --name {influx.bucket} --retention 0",
    )


def _write_probe(writer: InfluxWriter, read_back: bool) -> Finding:
    """One point in its own measurement: the least a write test can leave behind."""
    check = "database writable"
    ts = time.time_ns()
    line = f"cityflux_doctor,host={_tag(socket.gethostname())} probe=1i {ts}"
    try:
        writer.send(writer.encode_body([line]), writer.gzip)
        if read_back:
            rows = writer.query(f'SELECT "probe" FROM "cityflux_doctor" WHERE time = {ts}')
            if not rows["results"][0].get("series"):
                return Finding("loss", check, "a written point could not be read back")
    except (StoreError, KeyError, IndexError) as exc:
        return Finding(
            "loss",
            check,
            f"writing a point failed: {exc}",
            "cityflux.toml [influx]: database/bucket, username/password or token",
        )
    done = "written and read back" if read_back else "written"
    return Finding("ok", check, f"a point in cityflux_doctor was {done}")


def _tag(value: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in value) or "unknown"


# -- the spool ------------------------------------------------------------------------------
def check_spool(config: Config) -> list[Finding]:
    directory = Path(config.spool.dir)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".cityflux-doctor-"):
            pass
    except OSError as exc:
        return [
            Finding(
                "loss",
                "spool directory",
                f"cannot write in {existing}: {exc}",
                "cityflux.toml [spool]: dir (a directory cityflux's user can write)",
            )
        ]
    used = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    free = shutil.disk_usage(existing).free
    room = config.spool.max_bytes - used
    if free < room:
        return [
            Finding(
                "warning",
                "spool disk space",
                f"{existing} has {free / 2**20:.0f} MiB free, less than the {room / 2**20:.0f} MiB "
                "more spool.max_bytes allows: the disk fills before the spool limit",
                f"cityflux.toml [spool]: max_bytes = {max(0, used + free // 2)} (or free space)",
            )
        ]
    return [
        Finding(
            "ok",
            "spool",
            f"{directory} writable ({os.fspath(existing)}: "
            f"{free / 2**30:.1f} GiB free for spool.max_bytes {room / 2**30:.1f} GiB)",
        )
    ]
