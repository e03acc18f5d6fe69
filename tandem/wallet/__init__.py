"""The wallet: atomic balance updates that never go negative."""
