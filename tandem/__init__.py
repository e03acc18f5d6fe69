"""Tandem: atomic wallet balances and a cluster cron over one PostgreSQL."""

__version__ = "0.1.0"
