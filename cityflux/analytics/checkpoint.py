"""Analytics checkpoints on disk: written so a crash leaves the old or the new one whole, read
so a bad one costs a recovery from InfluxDB, never the start.

* :func:`write`: a temporary file in the same directory, fsynced, renamed over the old one,
  then the directory fsynced (the rename itself is durable only then). Owner-only (0600).
* :func:`read`: whatever ``np.load`` raises on a damaged file (``BadZipFile``, ``EOFError``,
  a bad CRC, ``ValueError`` from a bad array header, ``MemoryError`` from a huge claimed shape)
  and arrays whose names, shapes or dtypes do not fit this engine (:class:`Layout`) become one
  :class:`CheckpointError`; the engine then :func:`set_aside` the file and starts as after a
  kill before its first checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.errors import CityfluxError
from cityflux.files import fsync_directory, private_directory
from cityflux.files import set_aside as set_file_aside

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]
NUMERIC = "biuf"  # bool, signed, unsigned, float: np.load(allow_pickle=False) gives no objects
_PANE = re.compile(r"(?P<prefix>[a-z]+)\|(?P<start>-?\d+)\|[01]{1,2}\|(?P<column>\w+)")
_PARTIAL = re.compile(r"(?P<prefix>[a-z]+)#(?P<start>-?\d+)#(?P<key>\w+)")
_SERIES = re.compile(r"(?P<prefix>[a-z]+)#(?P<index>\d+)")


class CheckpointError(CityfluxError):
    """A checkpoint cannot be read, or is not one this engine can restore."""


@dataclass(frozen=True, slots=True)
class Layout:
    """What a checkpoint of one engine (one city map) may hold."""

    arrays: dict[str, Array]  # fixed arrays by name: the engine's own, for shape and dtype
    optional: frozenset[str]  # fixed arrays older versions did not write
    panes: dict[str, tuple[frozenset[str], int]]  # "traffic|start|flags|column": columns, entities
    partials: dict[str, tuple[frozenset[str], int]]  # "station#start#key": keys, length
    series: dict[str, tuple[int, int]]  # "california#i": how many, length
    # pane columns and partial keys added by later versions: an older checkpoint lacks them
    # (the caller fills them in) and still loads
    added: frozenset[str] = frozenset()


def write(path: Path, arrays: dict[str, Array]) -> None:
    private_directory(path.parent)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk must not leave a half file behind
        raise
    fsync_directory(path.parent)


def read(path: Path) -> dict[str, Array]:
    try:  # our own handle: np.load leaks its file when the zip is bad
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # a damaged file raises anything from zipfile, zlib or numpy
        raise CheckpointError(f"{type(exc).__name__}: {exc}") from exc


def check(arrays: dict[str, Array], layout: Layout) -> None:
    """Raise :class:`CheckpointError` unless every array fits ``layout``: restoring then
    cannot fail half-way, and no window computed later trips over a wrong shape."""
    missing = set(layout.arrays) - set(arrays) - layout.optional
    if missing:
        raise CheckpointError(f"missing arrays {sorted(missing)}")
    panes: dict[tuple[str, str], dict[str, Array]] = defaultdict(dict)
    partials: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name, array in arrays.items():
        if array.dtype.kind not in NUMERIC:
            raise CheckpointError(f"{name}: dtype {array.dtype} is not numeric")
        if name in layout.arrays:
            _check_fixed(name, array, layout.arrays[name])
        elif (pane := _PANE.fullmatch(name)) and pane["prefix"] in layout.panes:
            panes[pane["prefix"], pane["start"]][pane["column"]] = array
        elif (part := _PARTIAL.fullmatch(name)) and part["prefix"] in layout.partials:
            keys, length = layout.partials[part["prefix"]]
            _expect(part["key"] in keys and array.shape == (length,), name, array)
            partials[part["prefix"], part["start"]].add(part["key"])
        elif (item := _SERIES.fullmatch(name)) and item["prefix"] in layout.series:
            count, length = layout.series[item["prefix"]]
            _expect(int(item["index"]) < count and array.shape == (length,), name, array)
        else:
            raise CheckpointError(f"unknown array {name!r}")
    for (prefix, start), columns in panes.items():
        _check_pane(f"{prefix} pane {start}", columns, *layout.panes[prefix], layout.added)
    for (prefix, start), found in partials.items():
        keys = layout.partials[prefix][0]
        if not keys - layout.added <= found <= keys:
            raise CheckpointError(f"{prefix} partials {start}: keys {sorted(found)}")


def _expect(fits: bool, name: str, array: Array) -> None:
    if not fits:
        raise CheckpointError(f"{name}: unexpected name or shape {list(array.shape)}")


def _check_fixed(name: str, array: Array, like: Array) -> None:
    shape_ok = array.shape == like.shape or (name == "watermark" and array.shape == (2,))
    if not shape_ok or array.dtype.kind != like.dtype.kind:
        raise CheckpointError(
            f"{name}: {array.dtype}{list(array.shape)}, expected {like.dtype}{list(like.shape)}"
        )


def _check_pane(
    what: str, columns: dict[str, Array], names: frozenset[str], bound: int, added: frozenset[str]
) -> None:
    if not names - added <= set(columns) <= names:
        raise CheckpointError(f"{what}: columns {sorted(columns)}, expected {sorted(names)}")
    lengths = {c.shape for c in columns.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise CheckpointError(f"{what}: columns of shapes {sorted(lengths)}")
    entity = columns["entity"]
    inside = not len(entity) or 0 <= entity.min() <= entity.max() < bound
    if entity.dtype.kind not in "iu" or not inside:
        raise CheckpointError(f"{what}: entities outside [0, {bound})")


def set_aside(path: Path) -> Path | None:
    """Rename a bad checkpoint to ``<name>.corrupt`` (``<name>.<UTC time>-<n>.corrupt`` when one
    is there already: an earlier one is never overwritten); None if it cannot be moved."""
    try:
        return set_file_aside(path, companions=())
    except OSError as exc:
        log.error("cannot set the checkpoint %s aside: %s", path, exc)
        return None
