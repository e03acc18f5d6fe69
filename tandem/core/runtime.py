"""Process-wide tuning for serving many connections at once."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """A burst keeps ~10000 connections' objects alive, and every full collection walks them
    all: ~30% of the server's CPU with the default thresholds. Freeze what startup allocated
    (never garbage) and collect the young generation less often. Called once startup is
    done."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
