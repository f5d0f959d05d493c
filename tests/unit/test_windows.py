"""Event-time panes: out-of-order and late readings, the lateness limit, de-duplication, and a
restart in the middle of a window (through a real checkpoint file) losing nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cityflux.analytics.windows import PaneBuffer, Watermark
from cityflux.model.units import NS

MIN = 60 * NS


def add(buffer: PaneBuffer, watermark: Watermark, entity: list[int], ts_min: list[float],
        values: list[float]) -> np.ndarray:  # fmt: skip
    ts = (np.array(ts_min) * MIN).astype(np.int64)
    late = buffer.add(watermark.value_ns, np.array(entity), ts, value=np.array(values, dtype=float))
    watermark.observe(ts)
    return late


def test_out_of_order_rows_land_in_their_pane_and_complete_panes_are_due() -> None:
    buffer, watermark = PaneBuffer(60, lateness_s=300), Watermark(delay_ns=2 * MIN)
    add(buffer, watermark, [1, 2, 1], [0.5, 1.5, 0.2], [10.0, 20.0, 30.0])
    assert sorted(buffer.panes) == [0, MIN]
    assert buffer.due(watermark.value_ns) == []  # newest 1.5 min - 2 min delay: nothing done
    add(buffer, watermark, [3], [3.5], [1.0])  # watermark -> 1.5 min: pane [0, 1) complete
    (pane,) = buffer.due(watermark.value_ns)
    assert pane.start_ns == 0
    rows = pane.rows()
    assert sorted(rows["value"].tolist()) == [10.0, 30.0]


def test_duplicates_count_once_and_the_last_arrival_wins() -> None:
    buffer, watermark = PaneBuffer(60, lateness_s=300), Watermark(delay_ns=0)
    add(buffer, watermark, [7, 7, 7], [0.5, 0.5, 0.7], [1.0, 2.0, 3.0])
    rows = buffer.panes[0].rows()
    assert rows["entity"].tolist() == [7, 7]
    assert rows["value"].tolist() == [2.0, 3.0]


def test_late_rows_within_lateness_update_an_emitted_pane_later_ones_are_refused() -> None:
    buffer, watermark = PaneBuffer(60, lateness_s=180), Watermark(delay_ns=0)
    add(buffer, watermark, [1], [0.5], [1.0])
    add(buffer, watermark, [1], [2.5], [1.0])  # watermark 2.5 min: pane 0 complete
    (pane,) = buffer.due(watermark.value_ns)
    pane.emitted, pane.dirty = True, False
    late = add(buffer, watermark, [2], [0.9], [5.0])  # 1.6 min late, lateness 3 min: accepted
    assert not late.any()
    assert [p.start_ns for p in buffer.due(watermark.value_ns)] == [0]  # pane 0 again
    assert sorted(buffer.panes[0].rows()["value"].tolist()) == [1.0, 5.0]
    add(buffer, watermark, [1], [4.5], [1.0])  # watermark 4.5: pane 0 closes at 1 + 3 = 4
    too_late = add(buffer, watermark, [3, 3], [0.8, 4.4], [9.0, 9.0])
    assert too_late.tolist() == [True, False]
    assert buffer.expire(watermark.value_ns) == [0]
    assert 0 not in buffer.panes


def test_restart_in_the_middle_of_a_window_loses_nothing(tmp_path: Path) -> None:
    buffer, watermark = PaneBuffer(60, lateness_s=300), Watermark(delay_ns=0)
    add(buffer, watermark, [1, 2], [0.1, 0.2], [1.0, 2.0])
    path = tmp_path / "checkpoint.npz"
    np.savez(path, **buffer.state("traffic"))
    # the process dies; the broker redelivers the unacknowledged message [2] and a new one
    restored = PaneBuffer(60, lateness_s=300)
    with np.load(path) as data:
        restored.restore("traffic", {k: data[k] for k in data.files})
    add(restored, watermark, [2, 3], [0.2, 0.3], [2.0, 3.0])
    rows = restored.panes[0].rows()
    assert rows["entity"].tolist() == [1, 2, 3]  # nothing lost, the redelivery counted once
    assert rows["value"].tolist() == [1.0, 2.0, 3.0]


def test_a_late_update_pending_at_the_checkpoint_is_emitted_after_the_restart(
    tmp_path: Path,
) -> None:
    buffer, watermark = PaneBuffer(60, lateness_s=300), Watermark(delay_ns=0)
    add(buffer, watermark, [1], [0.5], [1.0])
    add(buffer, watermark, [1], [2.5], [1.0])
    for pane in buffer.due(watermark.value_ns):
        pane.emitted, pane.dirty = True, False
    add(buffer, watermark, [2], [0.7], [5.0])  # late, within lateness: pane 0 must go again
    path = tmp_path / "checkpoint.npz"
    np.savez(path, **buffer.state("traffic"))
    restored = PaneBuffer(60, lateness_s=300)
    with np.load(path) as data:
        restored.restore("traffic", {k: data[k] for k in data.files})
    assert [p.start_ns for p in restored.due(watermark.value_ns)] == [0]
    assert sorted(restored.panes[0].rows()["value"].tolist()) == [1.0, 5.0]


def test_a_clock_ahead_of_the_wall_clock_moves_event_time_only_up_to_the_limit() -> None:
    watermark = Watermark(delay_ns=2 * MIN)
    now = 100 * MIN
    limit = now + 5 * NS  # wall clock + max_clock_skew_s
    watermark.observe(np.array([now - 30 * NS, now - 10 * NS]), limit)
    assert watermark.newest_ns == now - 10 * NS  # honest clocks: as before
    watermark.observe(np.array([now - 5 * NS, now + 300 * NS]), limit)  # one 5 minutes ahead
    assert watermark.newest_ns == limit and watermark.ahead_ns == now + 300 * NS
    assert watermark.value_ns == limit - 2 * MIN
    # flush ("everything seen is complete") trusts it only as far as the wall clock goes
    assert watermark.newest_until(limit) == limit
    assert watermark.newest_until(now + 400 * NS) == now + 300 * NS
    watermark.observe(np.array([now - 600 * NS]))  # no limit: replayed history, any speed
    assert watermark.newest_ns == limit
