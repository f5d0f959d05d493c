"""Two benchmark runs side by side: ``python -m bench.compare A.json B.json``.

Works on the JSON that bench.ingest and bench.simulate write to bench/results/: per consumer
(or publisher) msg/s, CPU-seconds per 100k messages and load, then the ratios of each run.
Compare ratios more than absolute rates: the machine is shared and its speed moves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(path: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _change(a: Any, b: Any) -> str:
    return f"{b / a:6.2f}x" if a and b is not None else "      -"


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for label, run in (("A", a), ("B", b)):
        git = run.get("git", {})
        dirty = "+dirty" if git.get("dirty") else ""
        out.append(
            f"{label}: {run['bench']} {run['utc']} {git.get('commit', '')[:10]}{dirty}, "
            f"{run.get('messages', 0):,} messages, {run.get('cpu_count')} CPUs: {run['command']}"
        )
    rows_a = {row["key"]: row for row in a["rows"]}
    rows_b = {row["key"]: row for row in b["rows"]}
    out.append(
        f"\n{'':30} {'msg/s A':>9} {'msg/s B':>9} {'B/A':>7} {'CPU/100k A':>10} "
        f"{'CPU/100k B':>10} {'load A':>6} {'load B':>6}"
    )
    for key in [*rows_a, *(k for k in rows_b if k not in rows_a)]:
        ra, rb = rows_a.get(key, {}), rows_b.get(key, {})
        rate_a, rate_b = ra.get("msg_per_s"), rb.get("msg_per_s")
        lost = " LOST" if ra.get("lost") or rb.get("lost") else ""
        out.append(
            f"{key + lost:30} {_num(rate_a, '9,.0f'):>9} {_num(rate_b, '9,.0f'):>9} "
            f"{_change(rate_a, rate_b):>7} {_num(ra.get('cpu_s_per_100k'), '.2f'):>10} "
            f"{_num(rb.get('cpu_s_per_100k'), '.2f'):>10} "
            f"{_num((ra.get('loadavg') or [None])[0], '.2f'):>6} "
            f"{_num((rb.get('loadavg') or [None])[0], '.2f'):>6}"
        )
    ratios_a, ratios_b = a.get("ratios", {}), b.get("ratios", {})
    out.append(f"\n{'ratio':30} {'A':>9} {'B':>9}")
    for name in [*ratios_a, *(k for k in ratios_b if k not in ratios_a)]:
        out.append(
            f"{name:30} {_num(ratios_a.get(name), '9.2f'):>9} {_num(ratios_b.get(name), '9.2f'):>9}"
        )
    if a.get("settings") != b.get("settings"):
        out.append("\nnote: the runs' cityflux settings differ (see 'settings' in each JSON)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    print("\n".join(compare(_load(args.a), _load(args.b))))


if __name__ == "__main__":
    main()
