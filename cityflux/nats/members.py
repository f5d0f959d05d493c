"""Which worker owns which partitions: the live workers, from a KV bucket of heartbeats.

Each worker puts its name into the members bucket every ``nats.heartbeat_s``; the bucket's
``max_age`` (3 heartbeats, set by `cityflux nats init`) lets a dead worker's key expire. Every
worker reads the same sorted list and takes partitions ``p`` with ``live[p % len(live)] ==
itself``: a worker joining or leaving moves only its share. Views may differ for a heartbeat;
the pinned consumers (ADR-42) keep a partition with one worker all the same.
"""

from __future__ import annotations

import json
import time

from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from cityflux.config import NatsConfig
from cityflux.errors import NatsError


class Members:
    def __init__(self, kv: KeyValue, config: NatsConfig, name: str) -> None:
        self.kv = kv
        self.config = config
        self.name = name

    @classmethod
    async def open(cls, nc: Client, config: NatsConfig, name: str) -> Members:
        try:
            kv = await nc.jetstream().key_value(config.members_bucket)
        except BucketNotFoundError as exc:
            raise NatsError(
                f"no KV bucket {config.members_bucket!r} on {', '.join(config.urls)}: "
                "run `cityflux nats init` first"
            ) from exc
        return cls(kv, config, name)

    async def heartbeat(self, owned: frozenset[int]) -> list[str]:
        """Say we are alive (and what we own, for `cityflux nats status`); the live workers."""
        beat = {"at": time.time(), "partitions": sorted(owned)}
        await self.kv.put(self.name, json.dumps(beat).encode())
        try:
            return sorted(await self.kv.keys())
        except NoKeysError:
            return [self.name]

    def assignment(self, live: list[str]) -> frozenset[int]:
        if self.name not in live:
            return frozenset()
        return frozenset(
            p for p in range(self.config.partitions) if live[p % len(live)] == self.name
        )

    async def leave(self) -> None:
        """Gone at once (a clean stop), rather than after three missed heartbeats."""
        await self.kv.delete(self.name)
