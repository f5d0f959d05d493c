"""Partition balance of a generated city: how evenly the stream's partitions share the readings.

    python -m bench.partitions [--partitions 16,64] [--devices 100000] [--seed 1]
                               [--workers 1,2,4,8,16]

The city is generated as bench.analytics builds its 100,000-device city
(``generate_city(CitySpec.for_devices(devices, seed))``, seed 1 = the scenarios' city seed).
Every device sends one reading a minute; nats-server files a reading under partition
FNV-1a(district) mod P (cityflux.nats.partition.partition_of computes the same number), so a
partition's load is the devices of the districts hashed to it. For each P: messages per minute
per partition, their coefficient of variation (standard deviation / mean, over all P
partitions, empty ones included: an empty partition is a worker slot with nothing to do), the
districts per partition, the empty partitions, and the busiest partition's share against an
even 1/P; and for W workers (worker i owns p % W == i) how much the busiest carries
against the mean. No servers: arithmetic on the map. JSON to
bench/results/partitions-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from bench.figures import envelope, utc_stamp, write_json
from cityflux.nats.partition import partition_of
from cityflux.simulators.citygen import CitySpec, generate_city

ROOT = Path(__file__).resolve().parent.parent
READINGS_PER_DEVICE_PER_MIN = 1


def devices_per_district(devices: int, seed: int) -> tuple[dict[str, int], dict[str, int]]:
    """(devices per district, devices per kind) of the generated city."""
    city = generate_city(CitySpec.for_devices(devices, seed=seed))
    by_kind = city.devices_by_kind()
    per_district = Counter(district for kind in by_kind.values() for _, district in kind)
    return dict(sorted(per_district.items())), {k: len(v) for k, v in by_kind.items()}


def balance(per_district: dict[str, int], partitions: int) -> dict[str, Any]:
    """Messages per minute per partition and how unevenly they fall, for P partitions."""
    messages = [0] * partitions
    districts: list[list[str]] = [[] for _ in range(partitions)]
    for district, count in per_district.items():
        p = partition_of(district, partitions)
        messages[p] += count * READINGS_PER_DEVICE_PER_MIN
        districts[p].append(district)
    mean = statistics.fmean(messages)
    used = [m for m in messages if m]
    return {
        "partitions": partitions,
        "messages_per_min": messages,
        "districts": districts,
        "districts_per_partition": [len(d) for d in districts],
        "empty_partitions": sum(1 for m in messages if not m),
        "mean_per_min": round(mean, 1),
        "cv": round(statistics.pstdev(messages) / mean, 4),
        "cv_of_used": round(statistics.pstdev(used) / statistics.fmean(used), 4),
        "max_share": round(max(messages) / sum(messages), 4),
        "even_share": round(1 / partitions, 4),
        # workers beyond this many get nothing: a partition is owned by one worker at a time
        "useful_workers": len(used),
    }


def worker_loads(messages: list[int], workers: int) -> dict[str, Any]:
    """What each of ``workers`` workers carries: worker i of n owns the partitions p with
    p % n == i (cityflux/nats/members.py); busiest over mean = how much faster than an even
    share the busiest worker must be (the city's rate is bounded by it)."""
    loads = [sum(messages[p] for p in range(i, len(messages), workers)) for i in range(workers)]
    mean = statistics.fmean(loads)
    return {
        "workers": workers,
        "messages_per_min": loads,
        "busiest_over_mean": round(max(loads) / mean, 3),
        "idle_workers": sum(1 for load in loads if not load),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--partitions", default="16,64", help="comma-separated counts")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", default="1,2,4,8,16", help="worker counts to share out")
    args = parser.parse_args()
    stamp = utc_stamp()
    per_district, kinds = devices_per_district(args.devices, args.seed)
    total = sum(per_district.values())
    district_cv = statistics.pstdev(per_district.values()) / statistics.fmean(per_district.values())
    print(
        f"city: {total:,} devices ({', '.join(f'{n:,} {k}' for k, n in kinds.items())}) in "
        f"{len(per_district)} districts ({min(per_district.values()):,}-"
        f"{max(per_district.values()):,} devices each, CV {district_cv:.3f}); one reading per "
        f"device per minute = {total * READINGS_PER_DEVICE_PER_MIN:,} messages/min "
        f"({total / 60:,.0f}/s)"
    )
    results = []
    for p in (int(x) for x in args.partitions.split(",")):
        result = balance(per_district, p)
        result["workers"] = [
            worker_loads(result["messages_per_min"], n)
            for n in (int(x) for x in args.workers.split(","))
            if n <= p
        ]
        results.append(result)
        shown = " ".join(
            f"{m:,}" + (f"[{n}]" if n > 1 else "")
            for m, n in zip(
                result["messages_per_min"], result["districts_per_partition"], strict=True
            )
        )
        print(
            f"\nP={p}: messages/min per partition (partition 0 first; [n] = n districts):\n"
            f"  {shown}\n"
            f"  CV {result['cv']:.3f} over all {p} partitions ({result['cv_of_used']:.3f} over "
            f"the {result['useful_workers']} that hold a district); {result['empty_partitions']} "
            f"empty; busiest {result['max_share']:.1%} of the city against an even "
            f"{result['even_share']:.1%}; at most {result['useful_workers']} workers get work"
        )
        for w in result["workers"]:
            print(
                f"  {w['workers']:3} workers (p % n): busiest carries {w['busiest_over_mean']:.2f}"
                f"x the mean, {w['idle_workers']} idle"
            )
    path = write_json(
        "partitions",
        stamp,
        {
            **envelope("partitions", stamp),
            "devices": total,
            "devices_by_kind": kinds,
            "seed": args.seed,
            "readings_per_device_per_min": READINGS_PER_DEVICE_PER_MIN,
            "devices_per_district": per_district,
            "district_cv": round(district_cv, 4),
            "balance": results,
        },
    )
    print(f"\nJSON: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
