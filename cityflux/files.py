"""Files that must survive a crash and stay private: the spool, checkpoints, alerts.

They hold every reading of the city and name its places and devices, so directories are 0700
and files 0600 whatever the umask; and a new name is durable only once its directory is
fsynced (a rename or create can otherwise vanish in a power cut).
"""

from __future__ import annotations

import contextlib
import os
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
