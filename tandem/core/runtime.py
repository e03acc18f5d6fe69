"""Process-wide tuning for serving many connections at once."""

from __future__ import annotations

import gc

# Objects the cyclic collector tracks that may be allocated (net of those freed) before it
# collects the young generation. A burst of 10000 connections keeps ~740000 of them alive at
# its peak (~74 per request in flight: the connection's protocol, transport, scope, headers,
# task, futures...), all live: a collection mid-burst frees nothing and walks them all
# (50000 collected 14 times per burst, ~0.3 s of the server's CPU in a 2.3 s burst; 300000
# twice, 0.27 s). Above that peak, the collector runs for garbage alone, and the requests'
# objects are freed by reference counting as they end (an answered error's traceback is
# dropped for that: tandem/core/asgi.py note_error). The price: up to this many objects of
# cyclic garbage may wait for a collection.
YOUNG_THRESHOLD = 1_000_000


def tune_gc() -> None:
    """A burst keeps ~10000 connections' objects alive, and every full collection walks them
    all: ~30% of the server's CPU with the default thresholds. Freeze what startup allocated
    (never garbage) and collect the young generation only past a burst's peak of live
    objects (YOUNG_THRESHOLD). Called once startup is done."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 100)
