"""Load generation against a running instance: ``tandem loadtest`` and the benchmarks."""

from tandem.loadtest.runner import (
    BurstReport,
    LoadtestError,
    LoadtestOptions,
    run_loadtest,
    withdraw_burst,
)

__all__ = ["BurstReport", "LoadtestError", "LoadtestOptions", "run_loadtest", "withdraw_burst"]
