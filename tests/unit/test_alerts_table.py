"""`cityflux alerts list` fits the terminal: no header cut at 80 columns, nothing lost."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cityflux.analytics.alerts import Alert
from cityflux.cli import alerts as alerts_cli

ALERTS = [
    Alert(id=1017, rule="segment_severe_congestion", entity="seg-00080:forward",
          district="d02", severity="critical", value=8.4257, started_ns=1_764_000_000 * 10**9,
          updated_ns=0, message="TPI 8.4 (forward), speed 14 km/h", acknowledged=True,
          acknowledged_by="ops-1"),
    Alert(id=3, rule="manhole_battery_low", entity="mh-0031", district="d03",
          severity="minor", value=17.3, started_ns=1_764_000_000 * 10**9, updated_ns=0,
          message="battery_pct 17.3 < 20", state="cleared"),
]  # fmt: skip


def listing(monkeypatch: pytest.MonkeyPatch, width: int, show_state: bool) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    monkeypatch.setattr(alerts_cli, "console", console)
    console.print(alerts_cli._table(ALERTS, "2 all alerts in x.sqlite", show_state))
    return str(console.file.getvalue()).splitlines()  # type: ignore[attr-defined]


@pytest.mark.parametrize("show_state", [True, False])
def test_80_columns_keeps_every_header_and_every_value(
    monkeypatch: pytest.MonkeyPatch, show_state: bool
) -> None:
    lines = listing(monkeypatch, 80, show_state)
    assert max(len(line) for line in lines) <= 80
    header = lines[1].split()
    assert header == ["id", "severity", "rule,", "message", "entity",
                      *(["state"] if show_state else []), "since", "(UTC)"]  # fmt: skip
    text = " ".join(" ".join(lines).split())
    assert "…" not in text
    squeezed = "".join(text.split())  # a long name may fold onto the next line: not cut
    for value in ("1017", "critical", "segment_severe_congestion", "seg-00080:forward",
                  "8.4257: TPI 8.4 (forward), speed 14 km/h (acked by ops-1)",
                  "battery_pct 17.3 < 20", "11-24 16:00"):  # fmt: skip
        assert "".join(value.split()) in squeezed, value
    assert ("cleared" in text) == show_state


def test_wide_terminals_get_a_column_each(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = listing(monkeypatch, 160, True)
    assert lines[1].split() == ["id", "severity", "rule", "entity", "district", "state",
                                "acked", "by", "since", "(UTC)", "value:", "message"]  # fmt: skip
    row = next(line for line in lines if line.lstrip().startswith("1017"))
    assert "d02" in row and "ops-1" in row and "8.4257: TPI 8.4 (forward)" in row
