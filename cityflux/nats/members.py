"""Which worker owns which partitions: the live workers, from a KV bucket of heartbeats.

Each worker puts its name into the members bucket every ``nats.heartbeat_s``; the bucket's
``max_age`` (3 heartbeats, set by `cityflux nats init`) lets a dead worker's key expire. The
heartbeat also says which partitions the worker owns, and every worker computes the same
:func:`share_out` from the live workers and those claims: each keeps what it owns (up to its
quota, P // n or one more), and only the rest is dealt out, to those below their quota. So a
worker that dies moves only its own partitions, and one that joins takes only its share
(with ``live[p % len(live)]`` 11 of 16 moved when one of three workers was killed, each a
hand-over: a checkpoint, an engine restarted, its windows re-read). Views may differ for a
heartbeat; the pinned consumers (ADR-42) keep a partition with one worker all the same.
"""

from __future__ import annotations

import hashlib
import json
import time

from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from cityflux.config import NatsConfig
from cityflux.errors import NatsError
from cityflux.nats.connect import js_request


async def live_values(nc: Client, kv: KeyValue, bucket: str) -> dict[str, bytes]:
    """Each key of ``bucket`` that holds a value now, with it. Not nats-py's ``kv.keys()``: it
    makes an ordered consumer per call, which outlives the call on the server (measured: 122
    of them after 300 calls; then ``keys()`` raised NoKeysError, which read as "I am alone",
    and later "maximum consumers limit reached"). Here: the bucket stream's subjects (one API
    request), then a direct get of each (a deleted key, a worker that left, is skipped)."""
    prefix = f"$KV.{bucket}."
    info = await js_request(nc, f"$JS.API.STREAM.INFO.KV_{bucket}", {"subjects_filter": ">"})
    found: dict[str, bytes] = {}
    for subject in (info.get("state") or {}).get("subjects") or {}:
        key = subject.removeprefix(prefix)
        try:
            entry = await kv.get(key)
        except NotFoundError:  # deleted (a worker that left), or expired since the listing
            continue
        found[key] = entry.value or b""
    return found


def _rank(worker: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{worker}/{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def share_out(live: list[str], claims: dict[str, list[int]], partitions: int) -> dict[int, str]:
    """partition -> live worker. Each worker has a quota, P // n or one more (the extra ones
    to the workers claiming most, so that nobody gives back what it holds when a worker dies);
    it keeps the partitions it claims up to its quota (its best-ranked ones); a partition
    claimed twice (views that differed) goes to the first in name order; the rest go one by
    one to the worker furthest below its quota. A joining worker so takes only what the others
    hold above their new quotas."""
    if not live:
        return {}
    mine = {w: {p for p in claims.get(w, []) if 0 <= p < partitions} for w in live}
    base, extra = divmod(partitions, len(live))
    by_claims = sorted(live, key=lambda w: (-len(mine[w]), w))
    quota = {w: base + (1 if i < extra else 0) for i, w in enumerate(by_claims)}
    owner: dict[int, str] = {}
    load = dict.fromkeys(live, 0)
    for worker in sorted(live):
        # a set: a claim listing a partition twice must not count it twice (found by a test)
        kept = sorted(mine[worker] - owner.keys(), key=lambda p: _rank(worker, p), reverse=True)
        for p in kept[: quota[worker]]:
            owner[p] = worker
            load[worker] += 1
    for p in range(partitions):
        if p not in owner:
            worker = min(live, key=lambda w: (load[w] - quota[w], -_rank(w, p)))
            owner[p] = worker
            load[worker] += 1
    return owner


class Members:
    def __init__(self, kv: KeyValue, config: NatsConfig, name: str, nc: Client) -> None:
        self.kv = kv
        self.config = config
        self.name = name
        self.nc = nc
        self.claims: dict[str, list[int]] = {}  # the partitions each live worker owns

    @classmethod
    async def open(cls, nc: Client, config: NatsConfig, name: str) -> Members:
        try:
            kv = await nc.jetstream().key_value(config.members_bucket)
        except BucketNotFoundError as exc:
            raise NatsError(
                f"no KV bucket {config.members_bucket!r} on {', '.join(config.urls)}: "
                "run `cityflux nats init` first"
            ) from exc
        return cls(kv, config, name, nc)

    async def heartbeat(self, owned: frozenset[int]) -> list[str]:
        """Say we are alive (and what we own, for `cityflux nats status`); the live workers."""
        beat = {"at": time.time(), "partitions": sorted(owned)}
        await self.kv.put(self.name, json.dumps(beat).encode())
        found = await live_values(self.nc, self.kv, self.config.members_bucket)
        self.claims = {key: _claimed(value) for key, value in found.items()}
        self.claims[self.name] = sorted(owned)
        return sorted(set(found) | {self.name})  # our key was just written

    def assignment(self, live: list[str]) -> frozenset[int]:
        if self.name not in live:
            return frozenset()
        owner = share_out(live, self.claims, self.config.partitions)
        return frozenset(p for p, worker in owner.items() if worker == self.name)

    async def leave(self) -> None:
        """Gone at once (a clean stop), rather than after three missed heartbeats."""
        await self.kv.delete(self.name)


def _claimed(value: bytes) -> list[int]:
    try:
        partitions = json.loads(value).get("partitions", [])
    except (ValueError, AttributeError):  # not a heartbeat of ours: claims nothing
        return []
    if not isinstance(partitions, list):
        return []
    return [p for p in partitions if type(p) is int]  # not bool, not float
