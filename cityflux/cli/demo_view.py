"""The demo's live view, laid out for the terminal it is in.

An 80x24 terminal gets the compact view: a three-line summary, one table of the districts
(readings published, points stored, congestion) and as many active alerts as the remaining
rows hold. Wider and taller terminals get the long labels, the congestion table with its
level, congested share and CV, the most congested segments and the rejections by reason. What
is shown is chosen by measuring the rendered panels against the terminal's height, so a frame
is never taller than the screen (rich's Live would cut it with "...").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table

from cityflux.analytics.alerts import Alert
from cityflux.cli.demo_figures import Reconciliation

WIDE = 120  # columns from which panels sit side by side with their long labels
MIN_ALERT_ROWS = 3  # the optional panels give way before the alerts get fewer rows
STORED_KINDS = ("pole", "manhole", "traffic")


@dataclass(frozen=True, slots=True)
class TpiRow:
    tpi: float
    level: str
    congested: float  # share of the length
    cv: float


@dataclass(frozen=True, slots=True)
class SegmentRow:
    segment: str
    direction: str
    tpi: float
    speed_kmh: float
    los: str


@dataclass(slots=True)
class Frame:
    """Everything one frame shows, as plain values (no servers needed to draw it)."""

    scenario: str
    clock: str  # simulated local time
    elapsed_s: float
    rate: float  # messages/s into cityflux
    devices: int
    online: int
    figures: Reconciliation
    published_by_district: dict[str, int]  # readings (messages) published
    stored: dict[str, dict[str, int]]  # district -> kind -> points in InfluxDB
    rejections: dict[str, int] = field(default_factory=dict)
    analytics: bool = True
    tpi: dict[str, TpiRow] = field(default_factory=dict)  # district (and "city") -> TPI
    segments: list[SegmentRow] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)  # active, most severe first

    @property
    def readings_stored(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.stored.values())


def render(frame: Frame, console: Console) -> RenderableType:
    """The frame, fitted to ``console``'s width and height: the optional panels (most
    wanted first) while the alerts keep a few rows, then as many alerts as the rest holds."""
    width, height = console.size
    wide = width >= WIDE
    budget = height - 1  # Live keeps the cursor on the line below the frame
    optional = ["rejections", "segments"]
    chrome = _height(_alerts_table(frame, 0), console, width) if frame.analytics else 0
    for count in range(len(optional), -1, -1):
        head = _head(frame, wide, optional[:count])
        used = _height(head, console, width)
        if count == 0 or used + chrome + MIN_ALERT_ROWS * frame.analytics <= budget:
            break
    if not frame.analytics:
        return head
    return Group(head, _alerts_table(frame, max(0, budget - used - chrome)))


def _head(frame: Frame, wide: bool, optional: list[str]) -> RenderableType:
    """Everything above the alerts."""
    if not wide:
        parts: list[RenderableType] = [_summary_lines(frame), _districts(frame, wide=False)]
        if "rejections" in optional:
            parts.append(_rejections_line(frame))
        if frame.analytics:  # the table where it fits, else its top three on one line
            table = "segments" in optional
            parts.append(_segments_table(frame) if table else _segments_line(frame))
        return Group(*parts)
    left: list[RenderableType] = [_summary_table(frame)]
    right: list[RenderableType] = [_districts(frame, wide=True)]
    if frame.analytics:
        right.append(_tpi_table(frame))
    if "rejections" in optional:
        left.append(_rejections_table(frame))
    if "segments" in optional and frame.analytics:
        right.append(_segments_table(frame))
    return _side_by_side(left, right)


def _height(renderable: RenderableType, console: Console, width: int) -> int:
    return len(console.render_lines(renderable, console.options.update(width=width)))


def _side_by_side(left: list[RenderableType], right: list[RenderableType]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column()
    grid.add_row(Group(*left), Group(*right))
    return grid


def _compact(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                 collapse_padding=True, title_justify="left", title_style="bold")  # fmt: skip


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _summary_lines(frame: Frame) -> Table:
    f, c = frame.figures.published, frame.figures.counted
    grid = Table.grid()
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_row(
        f"[bold]cityflux demo[/] {frame.scenario} · {frame.clock} local · "
        f"{frame.rate:,.0f} msg/s · {_elapsed(frame.elapsed_s)}"
    )
    grid.add_row(
        f"messages: published {f.total:,} · received {c.received:,} "
        f"({c.own:,} cityflux's own) · acked {c.acked:,}"
    )
    grid.add_row(
        f"  landed {c.landed:,} · rejected {c.rejected:,} · "
        f"devices online {frame.online:,}/{frame.devices:,}"
    )
    grid.add_row(
        f"points: written {c.written:,} · readings in InfluxDB {frame.readings_stored:,} · "
        f"spooled {c.spooled:,}"
    )
    return grid


def _summary_table(frame: Frame) -> Table:
    p, c = frame.figures.published, frame.figures.counted
    table = Table(title=f"cityflux demo: {frame.scenario}", show_header=False, box=box.ROUNDED)
    table.add_column()
    table.add_column(justify="right")
    rows = (
        ("simulated time (local)", frame.clock),
        ("elapsed", _elapsed(frame.elapsed_s)),
        ("messages/s into cityflux", f"{frame.rate:,.0f}"),
        ("messages published by devices", f"{p.total:,}"),
        ("  of which status births / wills", f"{p.births:,} / {p.wills:,}"),
        ("messages received (+ cityflux's own)", f"{c.received:,} ({c.own:,})"),
        ("messages acknowledged (durable)", f"{c.acked:,}"),
        ("messages landed / rejected", f"{c.landed:,} / {c.rejected:,}"),
        ("points written (all lines)", f"{c.written:,}"),
        ("points of readings in InfluxDB", f"{frame.readings_stored:,}"),
        ("points spooled (InfluxDB down)", f"{c.spooled:,}"),
        ("devices online", f"{frame.online:,} / {frame.devices:,}"),
    )
    for label, value in rows:
        table.add_row(label, value)
    return table


def _districts(frame: Frame, wide: bool) -> Table:
    """Readings published (messages) against points stored, per district; compact: with
    each district's congestion index in the same table."""
    title = (
        "per district: messages published, points in InfluxDB"
        if wide
        else "districts: messages published, points stored, congestion"
    )
    table = Table(title=title) if wide else _compact(title)
    columns = ["district", "published", "pole", "manhole", "traffic (lanes)"]
    if not wide and frame.analytics:
        columns += ["TPI", "level"]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True, overflow="ellipsis")
    for district in sorted(set(frame.stored) | set(frame.published_by_district)):
        row = frame.stored.get(district, {})
        cells = [district, f"{frame.published_by_district.get(district, 0):,}"]
        cells += [f"{row.get(kind, 0):,}" for kind in STORED_KINDS]
        if not wide and frame.analytics:
            cells += _tpi_cells(frame.tpi.get(district))
        table.add_row(*cells)
    if not wide and frame.analytics and "city" in frame.tpi:
        table.add_row("city", "", "", "", "", *_tpi_cells(frame.tpi["city"]))
    return table


def _tpi_cells(row: TpiRow | None) -> list[str]:
    return ["-", ""] if row is None else [f"{row.tpi:.1f}", row.level]


def _tpi_table(frame: Frame) -> Table:
    table = Table(title="congestion (GB/T 33171 TPI, last minute)")
    for column in ("district", "TPI", "level", "congested length", "CV"):
        table.add_column(column, justify="right")
    for name, row in frame.tpi.items():
        table.add_row(name, f"{row.tpi:.1f}", row.level, f"{row.congested:.0%}", f"{row.cv:.2f}")
    return table


def _segments_table(frame: Frame) -> Table:
    table = _compact("most congested segments")
    for column in ("segment", "direction", "TPI", "speed km/h", "LOS"):
        table.add_column(column, justify="right")
    for s in frame.segments:
        table.add_row(s.segment, s.direction, f"{s.tpi:.1f}", f"{s.speed_kmh:.0f}", s.los)
    if not frame.segments:
        table.add_row("(none yet)", "", "", "", "")
    return table


def _segments_line(frame: Frame) -> Table:
    grid = Table.grid()
    grid.add_column(no_wrap=True, overflow="ellipsis")
    worst = " · ".join(
        f"{s.segment} {s.direction} TPI {s.tpi:.1f} LOS {s.los}" for s in frame.segments[:3]
    )
    grid.add_row(f"[bold]most congested segments:[/] {worst or 'none yet'}")
    return grid


def _rejections_table(frame: Frame) -> Table:
    table = _compact("rejections by reason")
    table.min_width = 30
    table.add_column("reason")
    table.add_column("count", justify="right")
    for reason, count in sorted(frame.rejections.items()):
        table.add_row(reason, f"{count:,}")
    if not frame.rejections:
        table.add_row("(none)", "0")
    return table


def _rejections_line(frame: Frame) -> Table:
    grid = Table.grid()
    grid.add_column(no_wrap=True, overflow="ellipsis")
    reasons = " · ".join(f"{r} {n:,}" for r, n in sorted(frame.rejections.items()))
    grid.add_row(f"[bold]rejections by reason:[/] {reasons or 'none'}")
    return grid


def _alerts_table(frame: Frame, rows: int) -> Table:
    shown = frame.alerts[:rows]
    more = f", {len(shown)} shown" if len(shown) < len(frame.alerts) else ""
    table = _compact(f"active alerts ({len(frame.alerts)}{more})")
    table.expand = True  # the columns share the width by ratio: none is squeezed out
    widest = max((len(str(a.id)) for a in shown), default=2)
    table.add_column("id", justify="right", width=widest, no_wrap=True)
    table.add_column("severity", width=8, no_wrap=True)
    for column, ratio in (("rule", 3), ("entity", 3), ("message", 5)):
        table.add_column(column, no_wrap=True, overflow="ellipsis", ratio=ratio)
    for alert in shown:
        table.add_row(str(alert.id), alert.severity, alert.rule, alert.entity, alert.message)
    return table
