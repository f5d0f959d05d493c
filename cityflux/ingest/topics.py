"""Topic parsing: ``{root}/{district}/{kind}/{device_id}`` and ``.../{device_id}/status``.

Devices publish to a few topics each, again and again, so parsed topics are cached: the
per-message cost on the hot path is one dict lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from cityflux.model.contract import ID_PATTERN, KINDS, READING_TYPES, Reason

# Levels under the root that cityflux itself publishes to: seen (we subscribe to root/#), counted
# as ignored, never dead-lettered (that would loop).
RESERVED_LEVELS: Final = frozenset({"deadletter", "alerts", "health"})
_CACHE_LIMIT: Final = 500_000
# a small number per reading kind, for grouping a batch by kind with numpy; -1: anything else
# (a status topic, a rejected or reserved one)
KIND_CODES: Final = {kind: code for code, kind in enumerate(READING_TYPES)}
OTHER_CODE: Final = -1


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
        self._codes: dict[str, int] = {}  # topic -> KIND_CODES value or OTHER_CODE

    def parse(self, topic: str) -> DeviceTopic | TopicRejection | None:
        """The device topic, a rejection, or None for cityflux's own (reserved) topics."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()  # bounded memory against topic floods
            self._codes.clear()
        result = self._parse(topic)
        self._cache[topic] = result
        return result

    def kind_codes(self, topics: Sequence[str]) -> npt.NDArray[np.int8]:
        """Per topic, the code of its reading kind (``KIND_CODES``), or ``OTHER_CODE``.

        A C-level ``map`` of a dict lookup when every topic was seen before (the usual batch);
        the ones not seen are parsed."""
        codes = list(map(self._codes.get, topics))
        if None in codes:
            for index, code in enumerate(codes):
                if code is None:
                    codes[index] = self._code(topics[index])
        return np.array(codes, dtype=np.int8)

    def _code(self, topic: str) -> int:
        parsed = self.parse(topic)
        if type(parsed) is DeviceTopic and not parsed.is_status:
            code = KIND_CODES[parsed.kind]
        else:
            code = OTHER_CODE
        self._codes[topic] = code
        return code

    def parse_all(self, topics: Sequence[str]) -> list[DeviceTopic | TopicRejection | None]:
        """:meth:`parse` of each topic: a C-level ``map`` when all are cached."""
        try:
            return list(map(self._cache.__getitem__, topics))
        except KeyError:  # the cache was cleared on the way
            return list(map(self.parse, topics))

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
