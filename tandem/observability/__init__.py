"""Metrics, health checks and logging. Imports no domain package."""
