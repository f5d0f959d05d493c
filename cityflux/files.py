"""Files that must survive a crash and stay private: the spool, checkpoints, alerts.

They hold every reading of the city and name its places and devices, so directories are 0700
and files 0600 whatever the umask; and a new name is durable only once its directory is
fsynced (a rename or create can otherwise vanish in a power cut). A damaged one is set aside
for a post-mortem under one naming scheme (:func:`set_aside`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make the names in ``directory`` (a create, a rename) survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_directory(directory: Path) -> None:
    """Create ``directory`` 0700, or narrow it to 0700 if it is ours and wider."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _narrow(directory, 0o700)


def private_sqlite_file(path: Path) -> None:
    """Create a SQLite database file 0600 before SQLite does (its -wal and -shm files copy
    its mode), and narrow files an older version left readable."""
    private_directory(path.parent)
    created = False
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        created = True
    for name in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        _narrow(name, 0o600)
    if created:
        fsync_directory(path.parent)


def _narrow(path: Path, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        info = path.stat()
        if info.st_mode & 0o777 & ~mode and info.st_uid == os.geteuid():
            path.chmod(mode)


def set_aside(path: Path, companions: Sequence[str] = ("-wal", "-shm")) -> Path:
    """Rename a damaged file, kept for a post-mortem, out of the way of a fresh one: to
    ``<name>.corrupt``, or ``<name>.<UTC time>-<n>.corrupt`` (n = 0, 1, ...) when an earlier one
    is there, which is never overwritten. Returns the new name; raises OSError.

    ``companions`` (SQLite's ``-wal`` and ``-shm``) move with it as ``<new name><suffix>``, and
    first: a WAL left next to a new database of the same name would be replayed into it. Then
    the directory is fsynced, so that a power cut cannot bring the damaged file back."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    names = itertools.chain(
        [f"{path.name}.corrupt"], (f"{path.name}.{stamp}-{n}.corrupt" for n in itertools.count())
    )
    for name in names:
        aside = path.with_name(name)
        taken = [aside, *(aside.with_name(name + suffix) for suffix in companions)]
        if not any(os.path.lexists(p) for p in taken):
            break
    for suffix in companions:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path.with_name(path.name + suffix), aside.with_name(aside.name + suffix))
    with contextlib.suppress(FileNotFoundError):  # a missing file is damage too (the spool)
        os.rename(path, aside)
    fsync_directory(path.parent)
    return aside
