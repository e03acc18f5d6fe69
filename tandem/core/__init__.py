"""Settings, database access and the error type. Imports no domain package."""
