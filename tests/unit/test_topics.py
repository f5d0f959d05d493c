from __future__ import annotations

import pytest

from cityflux.ingest.topics import DeviceTopic, TopicParser, TopicRejection
from cityflux.model.contract import Reason

parser = TopicParser("cityflux/v1")


def test_device_and_status_topics() -> None:
    assert parser.parse("cityflux/v1/centre/pole/p-1") == DeviceTopic(
        "centre", "pole", "p-1", False
    )
    assert parser.parse("cityflux/v1/centre/traffic/d.2/status") == DeviceTopic(
        "centre", "traffic", "d.2", True
    )


def test_own_topics_are_ignored_not_rejected() -> None:
    assert parser.parse("cityflux/v1/deadletter/schema") is None
    assert parser.parse("cityflux/v1/health/cityflux/status") is None


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/v1/centre/pole/p1", Reason.BAD_TOPIC),
        ("cityflux/v1/centre/pole", Reason.BAD_TOPIC),
        ("cityflux/v1/centre/pole/p1/state", Reason.BAD_TOPIC),
        ("cityflux/v1/centre/pole/", Reason.BAD_TOPIC),
        ("cityflux/v1/centre/pole/-p1", Reason.BAD_TOPIC),
        ("cityflux/v1/centre/pole/" + "a" * 65, Reason.BAD_TOPIC),
        ("cityflux/v1/centre/pole/p\u00e9", Reason.BAD_TOPIC),
        ("cityflux/v1/centre/lamp/p1", Reason.UNKNOWN_KIND),
    ],
)
def test_bad_topics(topic: str, reason: Reason) -> None:
    result = parser.parse(topic)
    assert isinstance(result, TopicRejection)
    assert result.reason is reason
    assert parser.parse(topic) is result  # cached
