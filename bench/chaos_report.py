"""The chaos run's accounting: exact counts in InfluxDB against what the broker acknowledged,
the missing readings named by device and time, and the markdown table for the docs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from bench.chaos_city import COUNT_FIELD, KIND_CODES, POISON_PREFIX, Stream
from cityflux.store.influx import InfluxWriter
from cityflux.store.schema import DEADLETTER_MEASUREMENT
from tests.support import select

NOT_POISON = f'"device_id" !~ /^{POISON_PREFIX}/'
MAX_SECONDS_EXAMINED = 40
MAX_RANGES_SHOWN = 25


def _count(writer: InfluxWriter, influxql: str) -> int:
    rows = select(writer, influxql)
    return int(sum(row.get("count") or 0 for row in rows))


def landed_points(writer: InfluxWriter) -> dict[str, int]:
    """Points of the good devices per measurement (every lane of a traffic reading)."""
    return {
        kind: _count(
            writer, f'SELECT count("{COUNT_FIELD[kind]}") FROM "{kind}" WHERE {NOT_POISON}'
        )
        for kind in KIND_CODES
    }


def landed_readings(writer: InfluxWriter, points: dict[str, int]) -> int:
    """Readings, not points: a traffic reading is counted once, by its lane 1."""
    lane1 = _count(
        writer, f'SELECT count("count") FROM "traffic" WHERE {NOT_POISON} AND "lane" = \'1\''
    )
    return points["pole"] + points["manhole"] + lane1


def poison_landed(writer: InfluxWriter) -> int:
    return sum(
        _count(
            writer,
            f'SELECT count("{COUNT_FIELD[kind]}") FROM "{kind}" '
            f'WHERE "device_id" =~ /^{POISON_PREFIX}/',
        )
        for kind in KIND_CODES
    )


def deadletters(writer: InfluxWriter) -> tuple[dict[str, int], dict[str, int]]:
    """(every dead-letter point by reason, distinct poison topics by reason)."""
    every: dict[str, int] = {}
    for row in select(
        writer, f'SELECT count("message") FROM "{DEADLETTER_MEASUREMENT}" GROUP BY "reason"'
    ):
        every[row["reason"]] = int(row["count"])
    poison: dict[str, int] = {}
    q = (
        f'SELECT count(distinct("topic")) FROM "{DEADLETTER_MEASUREMENT}" '
        f'WHERE "topic" =~ /\\/{POISON_PREFIX}/ GROUP BY "reason"'
    )
    for row in select(writer, q):
        poison[row["reason"]] = int(row["count"])
    return every, poison


@dataclass
class Missing:
    """Readings the broker acknowledged that are not in InfluxDB, as seq ranges. Seconds past
    the first MAX_SECONDS_EXAMINED that fall short are counted in points (a traffic reading
    is one per lane), not read back."""

    count: int = 0
    ranges: list[str] = field(default_factory=list)
    seconds_not_examined: int = 0


def find_missing(writer: InfluxWriter, stream: Stream, acked: npt.NDArray[np.bool_]) -> Missing:
    """Compare per second and kind, then read the points of the seconds that differ and name
    the readings that are not there. Readings published but never acknowledged may land or
    not (the broker may have them): they are neither required nor counted as extra."""
    missing = Missing()
    seqs = np.flatnonzero(acked).astype(np.int64)
    if not len(seqs):
        return missing
    devices = stream.devices
    numbers = seqs % len(devices)
    seconds = (stream.start_ms + seqs * 1000 // stream.rate) // 1000  # as Stream.ts_ms
    lost: list[int] = []
    examined = 0
    for code, kind in enumerate(KIND_CODES):
        mine = devices.kind[numbers] == code
        if not mine.any():
            continue
        weights = devices.lanes[numbers[mine]].astype(np.int64) if kind == "traffic" else None
        keys, index = np.unique(seconds[mine], return_inverse=True)
        sums = np.bincount(index, weights=weights).astype(np.int64)
        expected = dict(zip(keys.tolist(), sums.tolist(), strict=True))
        got = _per_second(writer, kind, min(expected), max(expected) + 1)
        for second in sorted(expected):
            if got.get(second, 0) >= expected[second]:
                continue
            if examined >= MAX_SECONDS_EXAMINED:
                missing.seconds_not_examined += 1
                missing.count += expected[second] - got.get(second, 0)
                continue
            examined += 1
            lost += _lost_in_second(writer, stream, kind, second, seqs[mine & (seconds == second)])
    missing.count += len(lost)
    missing.ranges = _ranges(stream, sorted(lost))
    return missing


def _per_second(writer: InfluxWriter, kind: str, first: int, end: int) -> dict[int, int]:
    q = (
        f'SELECT count("{COUNT_FIELD[kind]}") FROM "{kind}" WHERE {NOT_POISON} '
        f"AND time >= {first}s AND time < {end}s GROUP BY time(1s)"
    )
    return {int(row["time"]) // 1_000_000_000: int(row["count"] or 0) for row in select(writer, q)}


def _lost_in_second(
    writer: InfluxWriter, stream: Stream, kind: str, second: int, seqs: npt.NDArray[np.int64]
) -> list[int]:
    q = (
        f'SELECT "{COUNT_FIELD[kind]}", "device_id" FROM "{kind}" WHERE {NOT_POISON} '
        f"AND time >= {second}s AND time < {second + 1}s"
    )
    found: dict[tuple[str, int], int] = defaultdict(int)
    for row in select(writer, q):
        found[(row["device_id"], int(row["time"]) // 1_000_000)] += 1
    lost = []
    for seq in seqs.tolist():
        number = seq % len(stream.devices)
        need = int(stream.devices.lanes[number]) if kind == "traffic" else 1
        if found.get((stream.devices.ids[number], stream.ts_ms(seq)), 0) < need:
            lost.append(seq)
    return lost


def _ranges(stream: Stream, lost: list[int]) -> list[str]:
    """Runs of lost seqs (gaps under a second of stream): size, time span, devices."""
    runs: list[tuple[int, int, int, set[str]]] = []  # first, last, count, device ids
    for seq in lost:
        device = stream.devices.ids[seq % len(stream.devices)]
        if runs and seq - runs[-1][1] <= stream.rate:
            first, _, n, ids = runs[-1]
            ids.add(device)
            runs[-1] = (first, seq, n + 1, ids)
        else:
            runs.append((seq, seq, 1, {device}))
    out = []
    for first, last, n, ids in runs[:MAX_RANGES_SHOWN]:
        names = sorted(ids)
        out.append(
            f"{n} readings, seq {first}..{last}, ts {_iso(stream.ts_ms(first))} .. "
            f"{_iso(stream.ts_ms(last))}, devices {', '.join(names[:6])}"
            + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        )
    if len(runs) > MAX_RANGES_SHOWN:
        out.append(f"... and {len(runs) - MAX_RANGES_SHOWN} more ranges")
    return out


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


def summed(lifetimes_metrics: list[dict[str, float]], name: str) -> dict[str, float]:
    """A labelled counter summed over every process lifetime, by its label value."""
    totals: dict[str, float] = defaultdict(float)
    for metrics in lifetimes_metrics:
        for key, value in metrics.items():
            if key.startswith(name + "{"):
                label = key[len(name) + 1 : -1].split("=", 1)[-1]
                totals[label] += value
            elif key == name:
                totals[""] += value
    return dict(totals)


def table(rows: list[tuple[str, str]]) -> str:
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def fmt_counts(counts: dict[str, float] | dict[str, int]) -> str:
    shown = {k: v for k, v in sorted(counts.items()) if v}
    return ", ".join(f"{k or '-'} {v:,.0f}" for k, v in shown.items()) or "0"
