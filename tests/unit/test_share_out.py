"""How the live workers share the partitions (cityflux/nats/members.py share_out): every
partition to exactly one live worker, no worker above an equal share, and a worker that dies
moves only its own partitions."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cityflux.nats.members import share_out
from tests.support import examples

WORKERS = st.lists(st.sampled_from([f"w{i}" for i in range(8)]), min_size=1, unique=True)


@settings(max_examples=examples(300), deadline=None)
@given(WORKERS, st.integers(1, 64), st.data())
def test_every_partition_goes_to_one_live_worker_within_an_equal_share(
    live: list[str], partitions: int, data: st.DataObject
) -> None:
    # whatever the workers claimed (stale, overlapping, out of range): views that differed
    claims = {
        w: data.draw(st.lists(st.integers(-2, partitions + 2), max_size=partitions))
        for w in data.draw(st.lists(st.sampled_from([*live, "gone"]), unique=True))
    }
    owner = share_out(live, claims, partitions)
    assert sorted(owner) == list(range(partitions))
    assert set(owner.values()) <= set(live)
    loads = [list(owner.values()).count(w) for w in live]
    assert max(loads) - min(loads) <= 1 and max(loads) <= math.ceil(partitions / len(live))
    assert owner == share_out(list(reversed(live)), claims, partitions)  # the same everywhere


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(2, 8), st.integers(1, 64), st.data())
def test_a_dead_worker_moves_only_its_own_partitions(
    workers: int, partitions: int, data: st.DataObject
) -> None:
    live = [f"w{i}" for i in range(workers)]
    before = share_out(live, {}, partitions)
    claims = {w: [p for p, o in before.items() if o == w] for w in live}
    dead = data.draw(st.sampled_from(live))
    survivors = [w for w in live if w != dead]
    after = share_out(survivors, {w: claims[w] for w in survivors}, partitions)
    moved = {p for p in range(partitions) if after[p] != before[p]}
    assert moved == set(claims[dead])


def test_a_heartbeat_that_is_not_ours_claims_nothing() -> None:
    from cityflux.nats.members import _claimed

    for junk in (b"", b"\xff", b"[]", b"5", b'{"partitions": 3}', b'{"partitions": "1,2"}'):
        assert _claimed(junk) == [], junk
    assert _claimed(b'{"partitions": [1, true, 2.0, "3", 4]}') == [1, 4]


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(1, 8), st.integers(1, 64))
def test_a_joining_worker_gets_an_equal_share_and_only_that_moves(
    workers: int, partitions: int
) -> None:
    live = [f"w{i}" for i in range(workers)]
    before = share_out(live, {}, partitions)
    claims = {w: [p for p, o in before.items() if o == w] for w in live}
    after = share_out([*live, "new"], claims, partitions)
    moved = {p for p in range(partitions) if after[p] != before[p]}
    assert all(after[p] == "new" for p in moved)
    assert len(moved) == partitions // (workers + 1)  # its share, no more, no less
