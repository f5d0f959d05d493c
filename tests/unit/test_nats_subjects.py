"""Reading JetStream subjects without nats-py's per-message objects (cityflux/nats/partition.py):
the delivery count from a reply subject as ``Msg.metadata`` reads it, and the topic of a
subject, remembered per subject."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from cityflux.nats.partition import TopicCache, deliveries, topic_of

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
numbers = st.integers(min_value=0, max_value=2**63 - 1)


@given(names, names, numbers, numbers, numbers, numbers, numbers)
def test_deliveries_reads_the_v1_reply_as_nats_py(
    stream: str, consumer: str, delivered: int, sseq: int, cseq: int, ts: int, pending: int
) -> None:
    reply = f"$JS.ACK.{stream}.{consumer}.{delivered}.{sseq}.{cseq}.{ts}.{pending}"
    assert deliveries(reply) == Msg.Metadata._from_reply(reply).num_delivered == delivered


@given(names, names, names, names, numbers, numbers, numbers, st.booleans())
def test_deliveries_reads_the_v2_reply_as_nats_py(
    domain: str, account: str, stream: str, consumer: str, delivered: int, seq: int, ts: int,
    random_token: bool,
) -> None:  # fmt: skip
    reply = f"$JS.ACK.{domain}.{account}.{stream}.{consumer}.{delivered}.{seq}.{seq}.{ts}.0"
    if random_token:
        reply += ".x1y2"
    assert deliveries(reply) == Msg.Metadata._from_reply(reply).num_delivered == delivered


@pytest.mark.parametrize(
    "reply", ["", "_INBOX.abc", "$JS.ACK.s.c.1.2", "$JS.API.s.c.1.2.3.4.5", "$JS.ACK.s.c.x.2.3.4.5"]
)
def test_a_reply_that_is_no_jetstream_ack_is_refused(reply: str) -> None:
    with pytest.raises(ValueError):
        deliveries(reply)


@given(st.lists(st.sampled_from(["d1", "d//2", "x.y"]), min_size=1, max_size=5))
def test_the_topic_cache_answers_as_topic_of(levels: list[str]) -> None:
    cache = TopicCache("cityflux.p", "cityflux/v1", limit=3)
    subjects = [f"cityflux.p.7.{level}.pole.p-{i}" for i, level in enumerate(levels)]
    for subject in subjects + subjects:  # the second round from the cache (or after a clear)
        assert cache(subject) == topic_of(subject, "cityflux.p", "cityflux/v1")
    assert len(cache._topics) <= 3
