"""The error boundary per message: one payload can fail only itself, never its batch.

Decode, validate and encode run vectorised over a whole batch, with no ``try`` per message (that
would cost the hot path). If the batch step raises anyway, whatever the cause, the batch is
bisected: a half that passes is kept whole, a half that fails is split again, and a single
message that still raises becomes a dead letter with reason ``internal_error``. One poison
message in a batch of n costs about 2 log2(n) extra runs on ever smaller slices (about the
work of two batches), and a failure that only two messages cause together disappears when they
land in different halves. The traceback is logged once per distinct cause (exception type and
the line that raised), however many messages hit it; the dead letters are counted by reason.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cityflux.config import IngestConfig
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.model.columns import Columns, Rejection
from cityflux.model.contract import Reason
from cityflux.store.lineprotocol import BatchEncoder

log = logging.getLogger(__name__)
MAX_CAUSES = 1_000  # distinct causes remembered; beyond that, each is logged again
MESSAGE_CHARS = 300  # of the exception text in the dead letter


@dataclass(slots=True)
class Staged:
    """A batch (or a slice of it) decoded, validated and encoded."""

    columns: dict[str, Columns] = field(default_factory=dict)  # accepted rows per kind
    lines: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    ignored: int = 0


def stage(
    decoder: BatchDecoder,
    encoder: BatchEncoder,
    config: IngestConfig,
    topics: Sequence[str],
    payloads: Sequence[bytes],
    now_ns: int,
) -> Staged:
    """Decode, validate, encode; a message that makes this raise is dead-lettered alone."""

    def run(start: int, stop: int) -> Staged:
        return _shift(
            _stage(decoder, encoder, config, topics[start:stop], payloads[start:stop], now_ns),
            start,
        )

    try:
        return run(0, len(topics))
    except Exception:  # any exception: find the message, keep the rest
        return _merge(_isolate(run, topics, 0, len(topics)))


def _stage(
    decoder: BatchDecoder,
    encoder: BatchEncoder,
    config: IngestConfig,
    topics: Sequence[str],
    payloads: Sequence[bytes],
    now_ns: int,
) -> Staged:
    decoded = decoder.decode(topics, payloads, now_ns)
    staged = Staged(rejections=decoded.rejections, ignored=decoded.ignored)
    for kind, columns in decoded.columns.items():
        good, bad = validate(columns, config, now_ns)
        staged.rejections += bad
        staged.lines += encoder.encode(good)
        staged.columns[kind] = good
    return staged


def _isolate(
    run: Callable[[int, int], Staged], topics: Sequence[str], start: int, stop: int
) -> list[Staged]:
    """The slices of [start, stop) that pass, and a rejection for each message that fails."""
    if stop - start == 1:
        try:
            return [run(start, stop)]
        except Exception as exc:  # this message alone raises: dead-letter it
            return [Staged(rejections=[_internal_error(exc, topics[start], start)])]
    if stop <= start:
        return []
    middle = (start + stop) // 2
    parts: list[Staged] = []
    for low, high in ((start, middle), (middle, stop)):
        try:
            parts.append(run(low, high))
        except Exception:  # still failing: split again
            parts += _isolate(run, topics, low, high)
    return parts


_logged: set[tuple[str, str, int]] = set()


def _internal_error(exc: Exception, topic: str, index: int) -> Rejection:
    frames = traceback.extract_tb(exc.__traceback__)
    where = frames[-1] if frames else None
    cause = (type(exc).__name__, *((where.filename, where.lineno or 0) if where else ("?", 0)))
    if cause not in _logged:
        if len(_logged) >= MAX_CAUSES:
            _logged.clear()
        _logged.add(cause)
        log.error(
            "internal error on a message of %s, dead-lettered as internal_error (logged once "
            'per cause; cityflux_rejections_total{reason="internal_error"} counts them all)',
            topic,
            exc_info=exc,
        )
    text = f"{type(exc).__name__}: {exc}"
    location = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return Rejection(Reason.INTERNAL_ERROR, text[:MESSAGE_CHARS] + location, index)


def _shift(staged: Staged, start: int) -> Staged:
    """Indices of a slice starting at ``start`` made indices of the whole batch."""
    if start == 0:
        return staged
    for columns in staged.columns.values():
        columns.message_index = columns.message_index + start
    staged.rejections = [
        Rejection(r.reason, r.message, r.index + start, r.reading) for r in staged.rejections
    ]
    return staged


def _merge(parts: list[Staged]) -> Staged:
    merged = Staged()
    by_kind: dict[str, list[Columns]] = {}
    for part in parts:
        merged.lines += part.lines
        merged.rejections += part.rejections
        merged.ignored += part.ignored
        for kind, columns in part.columns.items():
            by_kind.setdefault(kind, []).append(columns)
    merged.columns = {kind: _concat(pieces) for kind, pieces in by_kind.items()}
    return merged


def _concat(pieces: list[Columns]) -> Columns:
    """One Columns of several slices; group ids stay distinct (a group is one reading)."""
    first = pieces[0]
    offsets, offset = [], 0
    for piece in pieces:
        offsets.append(offset)
        offset += int(piece.group.max()) + 1 if len(piece) else 0
    return Columns(
        kind=first.kind,
        tags={name: np.concatenate([p.tags[name] for p in pieces]) for name in first.tags},
        fields={name: np.concatenate([p.fields[name] for p in pieces]) for name in first.fields},
        ts_ns=np.concatenate([p.ts_ns for p in pieces]),
        message_index=np.concatenate([p.message_index for p in pieces]),
        reading_index=np.concatenate([p.reading_index for p in pieces]),
        group=np.concatenate(
            [p.group + off for p, off in zip(pieces, offsets, strict=True)]
        ).astype(np.int32),
    )
