"""The table, the ratios and the JSON of a ``bench.scale`` run (bench/scale.py)."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from bench.figures import envelope, fmt_load, write_json
from cityflux.config import Config

if TYPE_CHECKING:
    from bench.scale import Run, Scale


HEADER = (
    f"{'run':18} {'msg/s':>7} {'secs':>6} {'wCPU/100k':>9} {'per worker CPU/100k':>20} "
    f"{'1st msg s':>11} {'start CPU':>9} {'db CPU':>6} {'mq CPU':>6} {'load 1/5/15':>15} "
    f"{'stored':>9}"
)


def row(run: Run) -> str:
    per = " ".join(f"{w.steady_cpu_per_100k:.2f}" for w in run.per_worker)
    first = [w.first_message_s for w in run.per_worker]
    startup = " ".join("-" if s is None else f"{s:.2f}" for s in first)
    # more than expected: redelivered messages written twice (VictoriaMetrics keeps both
    # samples; InfluxDB overwrites), at-least-once after a reconnect
    lost = ""
    if run.points_stored < run.points_expected:
        lost = " LOST"
    elif run.points_stored > run.points_expected:
        lost = f" DUP ({run.reconnects} reconnects)"
    return (
        f"{run.mode + f' r{run.round} {run.workers}w':18} {run.msg_per_s:7,} {run.seconds:6.2f} "
        f"{run.worker_cpu_per_100k:9.2f} {per:>20} {startup:>11} {run.startup_cpu_s:9.2f} "
        f"{run.database_cpu_s:6.1f} "
        f"{run.broker_cpu_s:6.1f} {fmt_load(run.loadavg_end):>15} {run.points_stored:9,}{lost}"
    )


def ratios(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per mode: 2 workers' msg/s over 1 worker's, each round, and the medians' ratio."""
    out: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r.mode for r in runs):
        rate = {(r.round, r.workers): r.msg_per_s for r in runs if r.mode == mode}
        rounds = sorted({r for r, _ in rate})
        per_round = [
            rate[(r, 2)] / rate[(r, 1)] for r in rounds if (r, 1) in rate and (r, 2) in rate
        ]
        one = statistics.median(v for (_, w), v in rate.items() if w == 1)
        two = statistics.median(v for (_, w), v in rate.items() if w == 2)
        out[mode] = {
            "per_round": [round(x, 3) for x in per_round],
            "median_1w_msg_per_s": round(one),
            "median_2w_msg_per_s": round(two),
            "ratio_of_medians": round(two / one, 3),
        }
    return out


def report(scale: Scale, stamp: str) -> Path:
    print(f"\n{HEADER}")
    for run in scale.runs:
        print(row(run))
    table = ratios(scale.runs)
    print("\n2 workers / 1 worker (msg/s, same mode; target >= 1.5)")
    for mode, values in table.items():
        print(
            f"  {mode:9} rounds {values['per_round']}, medians {values['median_1w_msg_per_s']:,}"
            f" -> {values['median_2w_msg_per_s']:,} msg/s = {values['ratio_of_medians']:.2f}x"
        )
    print(
        "wCPU/100k: all workers' CPU-s per 100k messages, first message to all acknowledged; "
        "per worker: its own CPU-s per 100k of the messages it took; 1st msg: `cityflux run` "
        "start to each worker's first message; start CPU: all its processes' CPU-s by the "
        "first message"
    )
    path = write_json(
        "scale",
        stamp,
        {
            **envelope("scale", stamp),
            "messages": scale.n,
            "points": scale.points,
            "target": scale.args.target,
            "isolation": {
                "pinned": f"workers (supervisor + worker processes): taskset -c "
                f"{scale.args.worker_cores}; mosquitto and the database: taskset -c "
                f"{scale.args.server_cores} (server binary started under taskset)",
                "unpinned": "no taskset",
                "cpus_allowed_seen": scale.servers,
            },
            "overrides": scale.overrides,
            "settings": msgspec.to_builtins(
                Config().with_overrides({"analytics.enabled": False, **scale.overrides})
            ),
            "runs": [
                {
                    **asdict(r),
                    "worker_cpu_s_per_100k": round(r.worker_cpu_per_100k, 3),
                    "per_worker": [
                        {**asdict(w), "steady_cpu_s_per_100k": round(w.steady_cpu_per_100k, 3)}
                        for w in r.per_worker
                    ],
                }
                for r in scale.runs
            ],
            "ratios_2w_over_1w": table,
        },
    )
    print(f"\nJSON: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path
