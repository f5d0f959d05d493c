"""Time units: timestamps are int64 epoch nanoseconds throughout cityflux."""

from __future__ import annotations

from typing import Final

NS: Final = 1_000_000_000  # nanoseconds per second
