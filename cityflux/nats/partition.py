"""Which partition a district's readings go to: the same hash nats-server applies.

The stream's subject transform ``{{partition(P,1)}}`` files a reading under FNV-1a (32 bit) of
its district token modulo P (nats-server ``subject_transform.go``, ``getHashPartition``).
cityflux computes the same number to know which districts a partition holds (its analytics
state, its checkpoint); a test checks it against the server.

nats-server turns an MQTT topic into a subject level by level and writes a '.' inside a level
as '//' (server/mqtt.go ``mqttToNATSSubjectConversion``; ids may contain '.', docs/contract.md):
the district ``d.1`` is the token ``d//1``, and that token is what the server hashes.
"""

from __future__ import annotations

from typing import Final

_FNV_OFFSET: Final = 0x811C9DC5
_FNV_PRIME: Final = 0x01000193


def fnv1a_32(data: bytes) -> int:
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


def subject_token(level: str) -> str:
    """The NATS subject token of one MQTT topic level (a '.' is written '//')."""
    return level.replace(".", "//")


def topic_level(token: str) -> str:
    """The MQTT topic level of one NATS subject token (the inverse of :func:`subject_token`)."""
    return token.replace("//", ".")


def partition_of(district: str, partitions: int) -> int:
    return fnv1a_32(subject_token(district).encode()) % partitions


def partition_transform(topic_root: str, subject_root: str, partitions: int) -> tuple[str, str]:
    """(source, destination) of the subject transform for the readings: MQTT topic
    ``cityflux/v1/{district}/{kind}/{device}`` is NATS subject ``cityflux.v1.{district}...``,
    filed as ``{subject_root}.{partition}.{district}.{kind}.{device}``."""
    root = topic_root.strip("/").replace("/", ".")
    return (
        f"{root}.*.>",
        f"{subject_root}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.>",
    )


# where the server's MQTT layer stores QoS 1 publishes before it PUBACKs them; the readings
# stream sources from it (docs/scale.md, "Setting up the stream")
MQTT_MSGS_STREAM: Final = "$MQTT_msgs"
MQTT_MSGS_PREFIX: Final = "$MQTT.msgs."


def source_transforms(
    topic_root: str, subject_root: str, partitions: int
) -> dict[str, tuple[str, str]]:
    """(filter, destination) of the two sourcing transforms from ``$MQTT_msgs``, by name:
    ``readings`` ``{topic}.{district}.{kind}.{device}`` and ``status`` (the same plus
    ``.status``), each filed as ``{subject_root}.{partition}.{district}.{kind}.{device}[.status]``.
    Token counts keep ``deadletter/…``, ``alerts/ack`` and the alerts out (docs/scale.md)."""
    root = MQTT_MSGS_PREFIX + topic_root.strip("/").replace("/", ".")
    dest = (
        f"{subject_root}.{{{{partition({partitions},1)}}}}"
        ".{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}"
    )
    return {
        "readings": (f"{root}.*.*.*", dest),
        "status": (f"{root}.*.*.*.status", f"{dest}.status"),
    }


def partition_subject(subject_root: str, partition: int) -> str:
    """What the consumer of one partition filters on."""
    return f"{subject_root}.{partition}.>"


def topic_of(subject: str, subject_root: str, topic_root: str) -> str:
    """The MQTT topic a stored subject came from (the pipeline speaks topics):
    ``cityflux.p.7.d1.pole.p-1`` -> ``cityflux/v1/d1/pole/p-1``, ``…det//1`` -> ``…det.1``."""
    rest = subject[len(subject_root) + 1 :]
    _, _, tail = rest.partition(".")
    return "/".join([topic_root.rstrip("/"), *map(topic_level, tail.split("."))])


class TopicCache:
    """:func:`topic_of` remembered per subject: a device's readings all come under one
    subject, so a worker converts each of its devices once instead of each message (it was 3 %
    of a JetStream worker's samples). Bounded: emptied when it holds ``limit`` subjects."""

    def __init__(self, subject_root: str, topic_root: str, limit: int = 500_000) -> None:
        self.subject_root = subject_root
        self.topic_root = topic_root
        self.limit = limit
        self._topics: dict[str, str] = {}

    def __call__(self, subject: str) -> str:
        topic = self._topics.get(subject)
        if topic is None:
            if len(self._topics) >= self.limit:
                self._topics.clear()
            topic = self._topics[subject] = topic_of(subject, self.subject_root, self.topic_root)
        return topic


def deliveries(reply: str) -> int:
    """How often JetStream delivered a message, from its reply subject (``$JS.ACK.…``), read as
    nats-py's ``Msg.metadata`` reads it (the v1 form of 9 tokens, the v2 form of 11 or 12 with
    a domain and an account hash), without building that object: 3.8 µs a message, 7 % of a
    JetStream worker's samples. ValueError for a reply that is not a JetStream ack subject."""
    tokens = reply.split(".")
    if len(tokens) < 2 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream reply subject: {reply!r}")
    if len(tokens) == 9:
        return int(tokens[4])
    if len(tokens) >= 11:
        return int(tokens[6])
    raise ValueError(f"not a JetStream reply subject: {reply!r}")
