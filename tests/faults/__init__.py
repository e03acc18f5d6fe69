"""Fault-injection harnesses and tests: real processes killed, cut off or slowed on purpose."""
