"""Duplicate JSON keys: ``{"pm25_ugm3": 1, "pm25_ugm3": 900}`` is rejected, not last-wins.

msgspec (like most JSON parsers) silently keeps the last of two equal keys and has no option to
refuse them, so a device, or anyone on its path, could hide a value behind another. A parse
that reports every key (``json`` with ``object_pairs_hook``) costs several microseconds per
payload, more than the whole typed decode; so the decoder proves most payloads free of
duplicates by counting instead, and parses only the few it cannot clear.

The count: a payload that passed a typed decode holds only known keys, none containing a colon,
and JSON has no other colon outside strings. So, when it holds no backslash (no ``\\u003a`` in
a string), its colons are exactly one per key written plus the colons inside string values.
The decoded readings tell how many keys were present (not null) and the colons of their string
values. Over a payload or a whole batch::

    colons(bytes) = present keys + colons in kept strings
                    + duplicate keys + null keys + colons in strings a duplicate overwrote

Every extra term is >= 0, so equality proves there is no duplicate. Inequality (a duplicate,
an explicit null, a backslash) sends the payload to :func:`duplicate_key`. The expected count
must never be too high (that could hide a duplicate); too low only costs a parse.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from cityflux.model.columns import Columns, Rejection
from cityflux.model.contract import Reason

# per reading kind: the message of each row, and the keys each row's reading holds
KeyCounts = tuple[list[int], npt.NDArray[np.int64]]
Address = tuple[int, int | None]  # (message, reading of an array or None for the message)


def duplicate_key(payload: bytes | str) -> str | None:
    """The first key written twice in one object of this JSON, or None (also for bad JSON)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> None:
        if not found and len({key for key, _ in items}) != len(items):
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    found.append(key)
                    break
                seen.add(key)

    try:  # numbers are not converted: 10**400 digits must not cost (or raise) anything here
        json.loads(
            payload,
            object_pairs_hook=pairs,
            parse_int=_ignore,
            parse_float=_ignore,
            parse_constant=_ignore,
        )
    except (ValueError, RecursionError):
        return None
    return found[0] if found else None


def _ignore(text: str) -> None:
    return None


def cleared(payload: bytes, expected: int) -> bool:
    """True when counting proves ``payload`` free of duplicate keys (see the module doc)."""
    return b"\\" not in payload and colons(payload) == expected


def colons(payload: bytes) -> int:
    """Colons in ``payload``. A batch's payloads joined are about 2 MB: numpy compares them in
    cache-sized chunks into one reused buffer, four times faster than ``bytes.count``."""
    if len(payload) < _CHUNK:
        return payload.count(b":")
    view = np.frombuffer(payload, dtype=np.uint8)
    found = np.empty(_CHUNK, dtype=np.bool_)
    total = 0
    for start in range(0, len(view), _CHUNK):
        part = view[start : start + _CHUNK]
        np.equal(part, _COLON, out=found[: len(part)])
        total += int(np.count_nonzero(found[: len(part)]))
    return total


_CHUNK = 1 << 16
_COLON = ord(":")


def present(values: list[Any]) -> npt.NDArray[np.int64] | int:
    """Per value, 1 if not None (the key was in the payload, not null); a scalar when all agree.

    ``list.count`` runs in C: the usual column (all present, or all absent) costs a few
    nanoseconds per value."""
    nones = values.count(None)
    if nones == 0:
        return 1
    if nones == len(values):
        return 0
    return np.fromiter((value is not None for value in values), dtype=np.int64, count=len(values))


def string_colons(values: Sequence[Any]) -> npt.NDArray[np.int64] | int:
    """Colons inside the string values of a column (RFC 3339 timestamps have two or three)."""
    if str not in set(map(type, values)):
        return 0
    return np.fromiter(
        (value.count(":") if type(value) is str else 0 for value in values),
        dtype=np.int64,
        count=len(values),
    )


# -- a batch ------------------------------------------------------------------------------------
def total(counts: list[KeyCounts], slow: set[int]) -> int:
    """Keys the readings of the fast-path payloads hold, all together (``slow``: messages the
    decoder's slow path checked one by one, excluded)."""
    result = 0
    for message_index, per_row in counts:
        fast = per_row[~np.isin(message_index, list(slow))] if slow else per_row
        result += int(fast.sum())
    return result


def find_duplicates(
    payloads: Sequence[bytes], counts: list[KeyCounts], slow: set[int]
) -> dict[Address, str]:
    """The batch did not add up: the payloads (array elements) that hold a key twice."""
    expected = np.zeros(len(payloads), dtype=np.int64)
    fast: set[int] = set()
    for message_index, per_row in counts:
        np.add.at(expected, message_index, per_row)
        fast.update(message_index)
    found: dict[Address, str] = {}
    for index in sorted(fast - slow):
        payload = payloads[index]
        if cleared(payload, int(expected[index])):
            continue
        key = duplicate_key(payload)
        if key is None:
            continue
        if not payload.lstrip().startswith(b"["):
            found[(index, None)] = key
            continue
        for position, element in enumerate(msgspec.json.decode(payload, type=list[msgspec.Raw])):
            key = duplicate_key(bytes(element))
            if key is not None:
                found[(index, position)] = key
    return found


def drop_duplicates(
    columns: dict[str, Columns], rejections: list[Rejection], found: dict[Address, str]
) -> tuple[dict[str, Columns], list[Rejection]]:
    """Rows and other rejections of what held a duplicate key go; one schema rejection each."""
    if not found:
        return columns, rejections

    def hit(index: int, reading: int | None) -> bool:
        return (index, None) in found or (index, reading) in found

    kept = {}
    for kind, column in columns.items():
        drop = [
            hit(index, reading)
            for index, reading in zip(
                column.message_index.tolist(), column.reading_index.tolist(), strict=True
            )
        ]
        kept[kind] = column.select(~np.array(drop, dtype=np.bool_))
    others = [r for r in rejections if not hit(r.index, r.reading)]
    duplicates = [
        Rejection(Reason.SCHEMA, f"duplicate key {key}", index, reading)
        for (index, reading), key in found.items()
    ]
    return kept, others + duplicates
