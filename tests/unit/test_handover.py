"""The hand-over between the ingest loop and the commit threads holds a few small batches (so a
slow database write does not hold up the loop that raises alerts) but never more than one full
batch of messages: what is unacknowledged stays within batch_size x (write_concurrency + 2),
the figure mqtt.receive_maximum and the broker's in-flight limit are sized by."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cityflux.config import Config
from cityflux.model.messages import MessageBatch
from cityflux.pipeline.pipeline import HANDOVER_BATCHES, Pipeline
from cityflux.pipeline.transform import BatchOutcome


def batch(size: int) -> tuple[MessageBatch, BatchOutcome]:
    return MessageBatch(receipts=list(range(1, size + 1))), BatchOutcome()


def test_small_batches_queue_up_and_a_full_one_waits_for_room(tmp_path: Path) -> None:
    config = Config().with_overrides({
        "ingest.batch_size": 100, "analytics.enabled": False, "metrics.enabled": False,
        "spool.dir": str(tmp_path / "spool"),
    })  # fmt: skip
    pipeline = Pipeline(config)
    try:
        for _ in range(HANDOVER_BATCHES):
            pipeline._hand_over(batch(10))  # no commit thread: they only queue
        assert pipeline._handover.qsize() == HANDOVER_BATCHES
        full = threading.Thread(target=pipeline._hand_over, args=(batch(100),))
        full.start()
        time.sleep(0.5)
        assert full.is_alive() and pipeline._handover.qsize() == HANDOVER_BATCHES  # 40 + 100
        for taken in range(HANDOVER_BATCHES):  # what a commit thread does as it takes work
            work = pipeline._handover.get()
            assert work is not None
            pipeline._taken(len(work[0]))
            if taken < HANDOVER_BATCHES - 1:  # a free slot is not room: 10+ messages left
                time.sleep(0.2)
                assert full.is_alive(), f"queued with {HANDOVER_BATCHES - taken - 1} batches"
        full.join(5)
        assert not full.is_alive() and pipeline._handover.qsize() == 1
        blocked = threading.Thread(target=pipeline._hand_over, args=(batch(1),))
        blocked.start()  # 100 + 1 > 100: waits, until stopping
        time.sleep(0.3)
        assert blocked.is_alive()
        pipeline.stopping.set()
        blocked.join(5)
        assert not blocked.is_alive() and pipeline._handover.qsize() == 1
    finally:
        pipeline.close()
