"""Topic parsing: ``{root}/{district}/{kind}/{device_id}`` and ``.../{device_id}/status``.

Devices publish to a few topics each, again and again, so parsed topics are cached: the
per-message cost on the hot path is one dict lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cityflux.model.contract import ID_PATTERN, KINDS, Reason

# Levels under the root that cityflux itself publishes to: seen (we subscribe to root/#), counted
# as ignored, never dead-lettered (that would loop).
RESERVED_LEVELS: Final = frozenset({"deadletter", "alerts", "health"})
_CACHE_LIMIT: Final = 500_000


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    district: str
    kind: str
    device_id: str
    is_status: bool


@dataclass(frozen=True, slots=True)
class TopicRejection:
    reason: Reason
    message: str


class TopicParser:
    """Parses topics under ``root``; results (good or bad) are cached per topic string."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._prefix = self.root + "/"
        self._cache: dict[str, DeviceTopic | TopicRejection | None] = {}

    def parse(self, topic: str) -> DeviceTopic | TopicRejection | None:
        """The device topic, a rejection, or None for cityflux's own (reserved) topics."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()  # bounded memory against topic floods
        result = self._parse(topic)
        self._cache[topic] = result
        return result

    def _parse(self, topic: str) -> DeviceTopic | TopicRejection | None:
        if not topic.startswith(self._prefix):
            return TopicRejection(Reason.BAD_TOPIC, f"topic is not under {self.root}/")
        levels = topic[len(self._prefix) :].split("/")
        if levels[0] in RESERVED_LEVELS:
            return None
        is_status = len(levels) == 4 and levels[3] == "status"
        if len(levels) != 3 and not is_status:
            return TopicRejection(
                Reason.BAD_TOPIC,
                f"expected {self.root}/{{district}}/{{kind}}/{{device_id}}[/status], "
                f"got {len(levels)} levels",
            )
        district, kind, device_id = levels[:3]
        for name, value in (("district", district), ("device_id", device_id)):
            if not ID_PATTERN.fullmatch(value):
                return TopicRejection(
                    Reason.BAD_TOPIC,
                    f"{name} {value!r} must match {ID_PATTERN.pattern}",
                )
        if kind not in KINDS:
            return TopicRejection(
                Reason.UNKNOWN_KIND, f"kind {kind!r} is not one of {', '.join(KINDS)}"
            )
        return DeviceTopic(district, kind, device_id, is_status)
