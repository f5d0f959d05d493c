"""The table, ratios and JSON of `python -m bench.scale_nats` (bench/scale_nats.py)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from bench.figures import envelope, fmt_load, write_json
from cityflux.config import Config

if TYPE_CHECKING:
    from bench.scale_nats import Run, ScaleNats

ROOT = Path(__file__).resolve().parent.parent


HEADER = (
    f"{'run':9} {'msg/s':>7} {'secs':>6} {'1st ack':>7} {'wCPU/100k':>9} "
    f"{'per worker CPU/100k (msgs)':>34} {'broker':>6} {'influxd':>7} {'all/100k':>8} "
    f"{'cores':>5} {'RSS MB':>6} {'load 1/5/15':>15} {'stored':>9}"
)


def row(run: Run) -> str:
    per = " ".join(f"{w.steady_cpu_per_100k:.2f}({w.messages // 1000}k)" for w in run.per_worker)
    lost = "" if run.points_stored == run.points_expected else f" != {run.points_expected:,}"
    return (
        f"{run.source + f' {run.workers}w':9} {run.msg_per_s:7,} {run.seconds:6.2f} "
        f"{run.first_ack_s:7.2f} {run.per_100k(run.worker_cpu_s):9.2f} {per:>34} "
        f"{run.broker_cpu_s:6.1f} {run.influxd_cpu_s:7.1f} {run.per_100k(run.total_cpu_s):8.2f} "
        f"{run.cores_busy:5.2f} {run.peak_rss_mb:6.0f} {fmt_load(run.loadavg_end):>15} "
        f"{run.points_stored:9,}{lost}"
    )


def ratios(runs: list[Run]) -> dict[str, float]:
    nats = {r.workers: r for r in runs if r.source == "nats"}
    mqtt = next((r for r in runs if r.source == "mqtt"), None)
    out = {}
    for w in sorted(nats):
        if w != 1 and 1 in nats:
            out[f"nats_{w}w/nats_1w msg/s"] = nats[w].msg_per_s / nats[1].msg_per_s
    if mqtt is not None and 1 in nats:
        one = nats[1]
        out["nats_1w/mqtt_1w msg/s"] = one.msg_per_s / mqtt.msg_per_s
        out["nats_1w/mqtt_1w worker CPU/100k"] = one.per_100k(one.worker_cpu_s) / mqtt.per_100k(
            mqtt.worker_cpu_s
        )
        out["nats_1w/mqtt_1w peak RSS"] = one.peak_rss_mb / mqtt.peak_rss_mb
    return {k: round(v, 3) for k, v in out.items()}


def report(bench: ScaleNats, stamp: str) -> Path:
    print(f"\n{HEADER}")
    for run in bench.runs:
        print(row(run))
    table = ratios(bench.runs)
    print("\nratios (same run)")
    for name, value in table.items():
        print(f"  {name:36} {value:6.2f}")
    cores = os.cpu_count() or 1
    print(
        f"\nwhat bounds it: 'all/100k' = CPU-s of the workers + broker + influxd per 100k "
        f"messages; 'cores' = those CPU-s per second of the drain ({cores} cores here: at "
        f"{cores:.2f} nothing more can run). CPU-bound rate = {cores} x 100k / all-per-100k:"
    )
    for run in bench.runs:
        print(f"  {run.source} {run.workers}w: {run.cpu_bound_msg_per_s:,.0f} msg/s")
    path = write_json(
        "scale_nats",
        stamp,
        {
            **envelope("scale_nats", stamp),
            "messages": bench.n,
            "points": bench.points,
            "partitions": bench.partitions,
            "analytics": "on (shipped default map examples/city-map.json; the mixed stream's "
            "devices are not on it)",
            "backlog": bench.publish,
            "settings": msgspec.to_builtins(Config()),
            "runs": [
                {
                    **asdict(r),
                    "worker_cpu_s_per_100k": round(r.per_100k(r.worker_cpu_s), 3),
                    "broker_cpu_s_per_100k": round(r.per_100k(r.broker_cpu_s), 3),
                    "influxd_cpu_s_per_100k": round(r.per_100k(r.influxd_cpu_s), 3),
                    "all_cpu_s_per_100k": round(r.per_100k(r.total_cpu_s), 3),
                    "cores_busy": round(r.cores_busy, 3),
                    "cpu_bound_msg_per_s": round(r.cpu_bound_msg_per_s),
                    "per_worker": [
                        {**asdict(w), "steady_cpu_s_per_100k": round(w.steady_cpu_per_100k, 3)}
                        for w in r.per_worker
                    ],
                }
                for r in bench.runs
            ],
            "ratios": table,
        },
    )
    print(f"\nJSON: {path.relative_to(ROOT)}")
    return path
