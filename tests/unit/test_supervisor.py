"""The supervisor: restarts with backoff, counts, gives up, and the watchdog."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from cityflux.supervisor import Component, Policy, Supervisor
from tests.support import wait_for

FAST = Policy(restart_min_s=0.01, restart_max_s=0.02, max_restarts=3, stall_after_s=0.3)


def test_a_failing_component_is_restarted_and_counted() -> None:
    restarted: list[str] = []
    runs: list[int] = []
    done = threading.Event()

    def flaky(component: Component) -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        done.wait()  # the third run stays up

    supervisor = Supervisor(FAST, on_restart=restarted.append)
    component = supervisor.spawn("flaky", flaky)
    wait_for(lambda: len(runs) == 3, 5, "the third run")
    assert restarted == ["flaky", "flaky"]
    assert component.restarts == 2
    assert supervisor.problems() == {}
    assert supervisor.fatal is None
    supervisor.stop()
    done.set()
    assert supervisor.join(5) == []


def test_a_component_that_returns_while_running_is_a_failure() -> None:
    runs: list[int] = []
    supervisor = Supervisor(FAST)
    supervisor.spawn("quitter", lambda component: runs.append(1))
    wait_for(lambda: supervisor.fatal is not None, 5, "giving up")
    # max_restarts=3 restarts, then the fourth failure in the window ends it
    assert len(runs) == 4
    assert "quitter failed 4 times" in supervisor.fatal


def test_giving_up_calls_on_fatal_once_and_is_a_problem() -> None:
    fatal: list[str] = []

    def always(component: Component) -> None:
        raise ValueError("disk on fire")

    supervisor = Supervisor(FAST, on_fatal=fatal.append)
    supervisor.spawn("doomed", always)
    wait_for(lambda: fatal, 5, "on_fatal")
    assert supervisor.join(2) == []
    assert len(fatal) == 1
    assert "ValueError: disk on fire" in fatal[0]
    problems = supervisor.problems()
    assert "giving up" in problems["supervisor"]
    assert problems["doomed"].startswith("down: ValueError")


def test_down_between_a_crash_and_its_restart() -> None:
    release = threading.Event()

    def crash_once(component: Component) -> None:
        if component.restarts == 0:
            raise OSError("first run fails")
        release.wait()

    slow = Policy(restart_min_s=0.5, restart_max_s=0.5, stall_after_s=60)
    supervisor = Supervisor(slow)
    component = supervisor.spawn("once", crash_once)
    wait_for(supervisor.problems, 2, "the down state")
    assert supervisor.problems() == {"once": "down: OSError: first run fails"}
    wait_for(lambda: component.restarts == 1 and not supervisor.problems(), 3, "the restart")
    supervisor.stop()
    release.set()
    supervisor.join(2)


def test_watchdog_flags_no_progress_only_while_work_waits() -> None:
    work = {"waiting": False}
    supervisor = Supervisor(FAST)
    component = supervisor.watch("loop", lambda: work["waiting"])
    time.sleep(0.4)
    assert supervisor.problems() == {}  # idle is not stalled
    work["waiting"] = True
    problem = supervisor.problems()["loop"]
    assert problem.startswith("no progress for") and "while work is waiting" in problem
    component.beat()
    assert supervisor.problems() == {}


def test_a_broken_probe_counts_as_work_waiting() -> None:
    def probe() -> bool:
        raise KeyError("probe")

    supervisor = Supervisor(FAST)
    supervisor.watch("probed", probe)
    time.sleep(0.4)
    assert "probed" in supervisor.problems()


def test_names_are_unique() -> None:
    supervisor = Supervisor(FAST)
    supervisor.watch("one")
    with pytest.raises(ValueError, match="already supervised"):
        supervisor.watch("one")


def test_restarts_are_paced_not_a_hot_loop() -> None:
    starts: list[float] = []

    def fail(component: Component) -> None:
        starts.append(time.monotonic())
        raise RuntimeError("again")

    policy = Policy(restart_min_s=0.1, restart_max_s=0.4, max_restarts=4, stall_after_s=1)
    supervisor = Supervisor(policy)
    supervisor.spawn("paced", fail)
    wait_for(lambda: supervisor.fatal is not None, 10, "giving up")
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 4
    assert all(gap >= 0.1 for gap in gaps), gaps
