"""Everything between the source and the sink for one batch, with no I/O:

    raw messages -> decode -> validate -> line protocol      (ingest, under the error boundary)
                 -> analytics (indices, alerts, too-late readings)
                 -> dead letters for every rejection, in arrival order

The result (:class:`BatchOutcome`) is what the commit stage makes durable before the batch is
acknowledged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from cityflux.config import Config
from cityflux.ingest.boundary import stage
from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.ingest.decode import BatchDecoder
from cityflux.model.columns import Columns, Rejection
from cityflux.model.messages import MessageBatch
from cityflux.observability import Metrics
from cityflux.store.lineprotocol import BatchEncoder

log = logging.getLogger(__name__)


class Analytics(Protocol):
    """What the transform needs of the analytics (one link, or one per partition)."""

    def process(self, columns: dict[str, Columns]) -> tuple[list[str], list[Rejection]]: ...

    def acknowledgements(self, topics: list[str], payloads: list[bytes]) -> list[str]: ...


@dataclass(slots=True)
class BatchOutcome:
    lines: list[str] = field(default_factory=list)
    letters: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, payload)
    accepted: dict[str, int] = field(default_factory=dict)
    # the lines include analytics results (alert points, acks): written in the order the
    # batches were analysed (Committer), the pipeline numbers them (-1: not numbered yet)
    derived: bool = False
    turn: int = -1


class Transform:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        letters: DeadLetterFactory,
        analytics: Analytics | None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.letters = letters
        self.analytics = analytics
        self.decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
        self.encoder = BatchEncoder()

    def __call__(self, batch: MessageBatch, now_ns: int) -> BatchOutcome:
        """Decode, validate and encode run under the error boundary per message
        (cityflux/ingest/boundary.py): a payload that makes them raise is dead-lettered as
        internal_error, the rest stored."""
        staged = stage(
            self.decoder, self.encoder, self.config.ingest, batch.topics, batch.payloads, now_ns
        )
        self.metrics.ignored.inc(staged.ignored)
        outcome = BatchOutcome(lines=staged.lines)
        rejections = staged.rejections
        newest = 0
        for kind, good in staged.columns.items():
            outcome.accepted[kind] = good.readings()
            if len(good):
                newest = max(newest, int(good.ts_ns.max()))
        if self.analytics is not None:
            analysed = self._analyse(batch, staged.columns, rejections, staged.ignored)
            outcome.lines += analysed
            outcome.derived = bool(analysed)
        if newest:
            self.metrics.event_lag_seconds.set((now_ns - newest) / 1e9)
        # dead letters in the order their messages arrived
        rejections.sort(key=lambda r: (r.index, -1 if r.reading is None else r.reading))
        for offset, rejection in enumerate(rejections):
            self._reject(batch, rejection, now_ns, offset, outcome)
        return outcome

    def _analyse(
        self,
        batch: MessageBatch,
        accepted: dict[str, Columns],
        rejections: list[Rejection],
        ignored: int,
    ) -> list[str]:
        """Analytics on the validated batch. A failure there is logged and counted, never
        allowed to stop ingest: the readings are stored whatever the analytics make of them."""
        assert self.analytics is not None
        try:
            lines = self.analytics.acknowledgements(batch.topics, batch.payloads) if ignored else []
            derived, late = self.analytics.process(accepted)
        except Exception:
            log.exception("analytics failed on a batch of %d messages", len(batch))
            self.metrics.analytics_errors.inc()
            return []
        rejections += late
        return lines + derived

    def _reject(
        self,
        batch: MessageBatch,
        rejection: Rejection,
        now_ns: int,
        offset: int,
        outcome: BatchOutcome,
    ) -> None:
        self.metrics.rejected.labels(rejection.reason.value).inc()
        letter = self.letters.letter(
            rejection, batch.topics[rejection.index], batch.payloads[rejection.index], now_ns
        )
        outcome.letters.append((self.letters.topic(rejection.reason), self.letters.encode(letter)))
        # distinct timestamps: points with equal series and time would overwrite each other
        outcome.lines.append(self.letters.line(letter, now_ns + offset))
