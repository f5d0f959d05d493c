"""Every example payload of docs/contract.md, sent verbatim with mosquitto_pub, lands in
InfluxDB with exact values, tags and timestamps; the field tables match the code."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import msgspec

from cityflux.config import Config
from cityflux.model.contract import KIND_FIELDS
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto
from cityflux.store.influx import InfluxWriter
from tests.support import ROOT, mosquitto_pub, running, select, wait_for

CONTRACT = (ROOT / "docs" / "contract.md").read_text()
EXAMPLES = re.findall(r"<!-- example topic=(\S+) -->\s*```json\n(.*?)```", CONTRACT, re.S)
MEASUREMENT = {"pole": "pole", "manhole": "manhole", "traffic": "traffic"}


def expected_ns(reading: dict[str, Any]) -> int:
    """Computed independently of cityflux.ingest.timestamps."""
    if "ts_ns" in reading:
        return int(reading["ts_ns"])
    ts = reading["ts"]
    if isinstance(ts, int):
        return ts * 1_000_000
    match = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", ts)
    assert match
    offset = "+00:00" if match.group(3) == "Z" else match.group(3)
    seconds = int(datetime.fromisoformat(match.group(1) + offset).timestamp())
    return seconds * 1_000_000_000 + int((match.group(2) or "").ljust(9, "0"))


def expected_rows(topic: str, payload: str) -> list[dict[str, Any]]:
    _, _, district, kind, device_id = topic.split("/")[:5]
    readings = msgspec.json.decode(payload)
    rows = []
    for reading in readings if isinstance(readings, list) else [readings]:
        base = {"time": expected_ns(reading), "district": district, "device_id": device_id}
        fields = {
            k: v
            for k, v in reading.items()
            if k not in {"ts", "ts_ns", "device_id", "kind", "lanes"} and v is not None
        }
        if kind != "traffic":
            rows.append(base | fields)
            continue
        for lane in reading["lanes"]:
            lane_fields = {k: v for k, v in lane.items() if v is not None and k != "lane"}
            rows.append(base | fields | lane_fields | {"lane": str(lane["lane"])})
    return rows


def test_contract_has_an_example_of_every_kind_and_status() -> None:
    topics = [topic for topic, _ in EXAMPLES]
    for kind in ("pole", "manhole", "traffic"):
        assert any(f"/{kind}/" in t and not t.endswith("/status") for t in topics), kind
    assert any(t.endswith("/status") for t in topics)
    assert any(payload.lstrip().startswith("[") for _, payload in EXAMPLES)


def test_field_tables_match_the_code() -> None:
    for kind, specs in KIND_FIELDS.items():
        table = CONTRACT.split(f"<!-- fields:{kind} -->")[1].split("\n\n")[0]
        rows = [line.split("|")[1:-1] for line in table.strip().splitlines()[2:]]
        documented = [
            (cells[0].strip(" `"), cells[1].strip(), cells[2].strip(), cells[3].strip())
            for cells in rows
        ]
        coded = [
            (s.name, s.type, s.unit, "-" if s.low is None else f"{s.low:g} to {s.high:g}")
            for s in specs
        ]
        assert documented == coded, kind


def test_every_example_lands_exactly(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    readings = [(t, p) for t, p in EXAMPLES if not t.endswith("/status")]
    with running(Pipeline(config)) as pipeline:
        for topic, payload in EXAMPLES:
            mosquitto_pub(broker.port, topic, payload)
        total = sum(len(expected_rows(t, p)) for t, p in readings)
        wait_for(
            lambda: pipeline.metrics.value("lines_written_total") >= total + 2,
            what="all example points written",
        )
        rejected = pipeline.metrics.rejected_total()
    assert rejected == 0
    for topic, payload in readings:
        kind, device_id = topic.split("/")[3:5]
        stored = select(db, f"SELECT * FROM {MEASUREMENT[kind]} WHERE device_id = '{device_id}'")
        for want in expected_rows(topic, payload):
            matches = [
                r for r in stored if r["time"] == want["time"] and r.get("lane") == want.get("lane")
            ]
            assert len(matches) == 1, (topic, want, stored)
            got = {k: v for k, v in matches[0].items() if v is not None and k != "_measurement"}
            assert got == want


def test_status_examples_land(broker: LocalMosquitto, config: Config, db: InfluxWriter) -> None:
    with running(Pipeline(config)):
        for topic, payload in EXAMPLES:
            if topic.endswith("/status"):
                mosquitto_pub(broker.port, topic, payload)
        rows = wait_for(
            lambda: len(r := select(db, "SELECT * FROM device_status")) >= 2 and r,
            what="status points",
        )
    by_device = {row["device_id"]: row for row in rows}
    assert by_device["pole-0001"]["online"] is True
    assert by_device["pole-0001"]["time"] == 1795570800000 * 1_000_000
    assert by_device["pole-0001"]["kind"] == "pole"
    assert by_device["mh-0042"]["online"] is False
