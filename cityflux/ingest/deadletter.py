"""Dead letters: what a rejected message looks like on ``{root}/deadletter/{reason}``.

The payload is JSON: the reason code, a human-readable message, the original topic, the index
of the rejected reading in an array payload (null for a whole message), and the original
payload (its first ``prefix_bytes`` bytes: as text when it is UTF-8, else base64).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import msgspec

from cityflux.model.columns import Rejection
from cityflux.model.contract import Reason
from cityflux.store.lineprotocol import encode_point
from cityflux.store.schema import DEADLETTER_MEASUREMENT


class DeadLetter(msgspec.Struct, frozen=True, omit_defaults=True):
    reason: str
    message: str
    topic: str
    reading: int | None
    payload_bytes: int
    truncated: bool
    received_ns: int
    payload: str | None = None
    payload_base64: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterFactory:
    topic_root: str
    prefix_bytes: int

    def topic(self, reason: Reason) -> str:
        return f"{self.topic_root}/deadletter/{reason.value}"

    def letter(self, rejection: Rejection, topic: str, payload: bytes, now_ns: int) -> DeadLetter:
        prefix = payload[: self.prefix_bytes]
        text: str | None
        try:
            text = prefix.decode("utf-8")
        except UnicodeDecodeError:
            # the cut may split a multi-byte character of a valid payload: drop that piece only
            text = prefix.decode("utf-8", "ignore") if _is_utf8(payload) else None
        return DeadLetter(
            reason=rejection.reason.value,
            message=rejection.message,
            topic=topic,
            reading=rejection.reading,
            payload_bytes=len(payload),
            truncated=len(payload) > self.prefix_bytes,
            received_ns=now_ns,
            payload=text,
            payload_base64=None if text is not None else base64.b64encode(prefix).decode(),
        )

    @staticmethod
    def encode(letter: DeadLetter) -> bytes:
        return msgspec.json.encode(letter)

    @staticmethod
    def line(letter: DeadLetter, ts_ns: int) -> str:
        """The InfluxDB point: ``reason`` is the only tag, everything else string fields."""
        return encode_point(
            DEADLETTER_MEASUREMENT,
            {"reason": letter.reason},
            {
                "topic": letter.topic,
                "message": letter.message,
                "payload_bytes": letter.payload_bytes,
                "reading": -1 if letter.reading is None else letter.reading,
            },
            ts_ns,
        )


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
