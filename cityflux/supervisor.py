"""One small supervisor for every long-lived thread of a cityflux process.

Erlang's rule, in threads: a component that fails is restarted from a known state, with
backoff, and the restart is counted; a component that keeps failing ends the process with a
non-zero exit so that systemd or compose restart it whole. A live process that does nothing is
the one outcome not allowed.

Each component also reports progress (:meth:`Component.beat`) and, optionally, whether work is
waiting for it. ``/healthz`` asks :meth:`Supervisor.problems`: a component that is down
(between a crash and its restart) or that has work waiting and made no progress for
``stall_after_s`` is a reason to answer 503 (a watchdog, not just "the socket is connected").
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Waiting = Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Policy:
    """How restarts are paced and when the supervisor gives up."""

    restart_min_s: float = 0.5
    restart_max_s: float = 30.0
    max_restarts: int = 10  # within restart_window_s; one more and the process ends
    restart_window_s: float = 300.0
    stall_after_s: float = 60.0  # work waiting and no progress for this long: unhealthy


@dataclass(slots=True)
class Component:
    """A supervised thread: its target runs until the supervisor stops (returns) or raises."""

    name: str
    target: Target | None
    waiting: Waiting | None = None
    restarts: int = 0
    down_reason: str | None = None
    last_progress: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    recent: deque[float] = field(default_factory=deque)  # monotonic times of recent restarts
    retired: bool = False  # its work is over: returning is expected (Supervisor.retire)

    def beat(self) -> None:
        """The component did some work (or confirmed it has none): the watchdog's input."""
        self.last_progress = time.monotonic()


Target = Callable[[Component], None]  # runs until stopped; beats its component on progress
# starts a supervised thread for a lower layer that must not know the supervisor's policy
Spawn = Callable[[str, Target], threading.Thread]
OnRestart = Callable[[str], None]
OnFatal = Callable[[str], None]


class Supervisor:
    def __init__(
        self,
        policy: Policy | None = None,
        on_restart: OnRestart | None = None,
        on_fatal: OnFatal | None = None,
    ) -> None:
        self.policy = policy or Policy()
        self.components: dict[str, Component] = {}
        self.fatal: str | None = None  # why the process must end, once a component gave up
        self.stopping = threading.Event()
        self._on_restart = on_restart
        self._on_fatal = on_fatal
        self._lock = threading.Lock()

    def spawn(self, name: str, target: Target, waiting: Waiting | None = None) -> Component:
        """Start ``target`` on its own thread under supervision. Names must be unique."""
        component = self.watch(name, waiting)
        component.target = target
        thread = threading.Thread(target=self._keep_running, args=(component,), name=name)
        thread.daemon = True  # a stuck target must not keep a killed process alive
        component.thread = thread
        thread.start()
        return component

    def start_thread(self, name: str, target: Target) -> threading.Thread:
        """:meth:`spawn` as a :data:`Spawn`: the supervised thread itself."""
        thread = self.spawn(name, target).thread
        assert thread is not None
        return thread

    def watch(self, name: str, waiting: Waiting | None = None) -> Component:
        """Watch progress of work done on a thread the supervisor does not own (the main
        loop): no restarts, only the stall check in :meth:`problems`."""
        component = Component(name, None, waiting)
        with self._lock:
            if name in self.components:
                raise ValueError(f"component {name!r} is already supervised")
            self.components[name] = component
        return component

    def stop(self) -> None:
        """No more restarts; targets see :attr:`stopping` (or their own stop) and return."""
        self.stopping.set()

    def retire(self, name: str) -> None:
        """The component's work is over while the process goes on (a partition's analytics
        handed to another worker): when its target returns it is not restarted, and it is
        no longer watched. Call it before making the target return."""
        with self._lock:
            component = self.components.get(name)
            if component is not None:
                component.retired = True

    def join(self, timeout_s: float = 10.0) -> list[str]:
        """Wait for every component's thread; the names of those still running."""
        deadline = time.monotonic() + timeout_s
        for component in list(self.components.values()):
            if component.thread is not None:
                component.thread.join(max(0.0, deadline - time.monotonic()))
        return [c.name for c in self.components.values() if c.thread and c.thread.is_alive()]

    # -- health -----------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """Components that are down or stalled, with the reason; empty when all is well."""
        now = time.monotonic()
        found: dict[str, str] = {}
        if self.fatal is not None:
            found["supervisor"] = self.fatal
        for name, component in list(self.components.items()):
            if component.down_reason is not None:
                found[name] = f"down: {component.down_reason}"
                continue
            idle = now - component.last_progress
            if idle > self.policy.stall_after_s and _has_work(component):
                found[name] = f"no progress for {idle:.0f}s while work is waiting"
        return found

    # -- the supervising loop ------------------------------------------------------------------
    def _keep_running(self, component: Component) -> None:
        while not self.stopping.is_set():
            component.down_reason = None
            component.beat()
            try:
                assert component.target is not None
                component.target(component)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("component %s failed; restarting it", component.name)
            else:
                if self.stopping.is_set() or component.retired:
                    with self._lock:
                        if component.retired and self.components.get(component.name) is component:
                            del self.components[component.name]
                    return
                reason = "returned while the process was running"
                log.error("component %s %s; restarting it", component.name, reason)
            component.down_reason = reason
            if not self._may_restart(component, reason):
                return
            if self.stopping.wait(self._delay(len(component.recent))):
                return

    def _may_restart(self, component: Component, reason: str) -> bool:
        now = time.monotonic()
        recent = component.recent
        recent.append(now)
        while recent and now - recent[0] > self.policy.restart_window_s:
            recent.popleft()
        if len(recent) > self.policy.max_restarts:
            self.fatal = (
                f"{component.name} failed {len(recent)} times in "
                f"{self.policy.restart_window_s:.0f}s (last: {reason}); giving up"
            )
            log.critical("%s: the process will exit for its supervisor to restart it", self.fatal)
            if self._on_fatal is not None:
                self._on_fatal(self.fatal)
            return False
        component.restarts += 1
        if self._on_restart is not None:
            self._on_restart(component.name)
        return True

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter, never below the minimum (no hot crash loop)."""
        policy = self.policy
        ceiling = min(policy.restart_max_s, policy.restart_min_s * 2 ** (attempt - 1))
        return random.uniform(policy.restart_min_s, max(policy.restart_min_s, ceiling))


def _has_work(component: Component) -> bool:
    if component.waiting is None:
        return False
    try:
        return component.waiting()
    except Exception:  # a broken probe must not break /healthz; say there is work
        log.exception("the progress probe of %s failed", component.name)
        return True


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS architecture blog, 2015)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
