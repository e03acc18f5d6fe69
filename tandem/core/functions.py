"""Server-side functions as files: what each one is, declared once.

A function's definition lives in a ``.sql`` file beside the code that calls it, one file per
version (``claim_run_v1.sql`` defines ``tandem_claim_run_v1``). A released version is never
edited: a change is a new file with the next version in its name, created by a new
migration, so that during a rolling deploy instances of the previous release keep calling
the version they know until a later release drops it. The migration that creates a version
executes its file and then applies what is declared here (security, settings, grants); a
test checks that the database's catalog matches both (tests/core/test_schema.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The body of a CREATE FUNCTION ... AS $$<body>$$ statement: what pg_proc.prosrc holds.
_BODY = re.compile(r"\bAS \$\$(.*)\$\$;?\s*\Z", re.DOTALL)


@dataclass(frozen=True)
class ServerFunction:
    """One released version of a server-side function.

    ``arguments`` is its identity argument list as PostgreSQL prints it
    (``pg_get_function_identity_arguments``); ``config`` its ``SET`` options as
    ``name=value`` (``pg_proc.proconfig``); ``execute`` the roles granted EXECUTE besides its
    owner (``PUBLIC`` is PostgreSQL's default for a new function: right for a function that
    runs as its caller, who can do nothing through it that its table rights do not allow).

    A ``SECURITY DEFINER`` function runs as its owner, so who may call it is the whole of its
    protection: it declares ``execute=()`` (no EXECUTE for PUBLIC) and ``app_role=True``, and
    ``grant_app_role`` (tandem/core/migrations.py) grants EXECUTE on it, by name, to the
    application's role, from these declarations: a new function cannot be forgotten, and no
    function is granted that is not declared. Its ``search_path`` is pinned with ``pg_temp``
    last, so no object a caller creates can stand in for one the body names.
    """

    name: str
    file: Path
    arguments: str
    security_definer: bool = False
    config: tuple[str, ...] = ()
    execute: tuple[str, ...] = ("PUBLIC",)
    # EXECUTE granted by name to the application's role (TANDEM_DATABASE_APP_ROLE).
    app_role: bool = False

    @property
    def signature(self) -> str:
        return f"{self.name}({self.arguments})"

    def definition(self) -> str:
        """The file: a comment saying what race the function closes, then its CREATE."""
        return self.file.read_text(encoding="utf-8")

    def body(self) -> str:
        match = _BODY.search(self.definition())
        if match is None:
            raise ValueError(f"{self.file}: no 'AS $$...$$' body at its end")
        return match.group(1)

    def create_statements(self) -> list[str]:
        """What a migration runs to create this version, in order."""
        statements = [self.definition()]
        if self.security_definer:
            statements.append(f"ALTER FUNCTION {self.signature} SECURITY DEFINER")
        for option in self.config:
            name, value = option.split("=", 1)
            # Each element quoted alone: 'public, pg_temp' in one pair of quotes would be a
            # search_path of one schema by that name.
            quoted = ", ".join(f"'{element.strip()}'" for element in value.split(","))
            statements.append(f"ALTER FUNCTION {self.signature} SET {name} = {quoted}")
        if self.execute != ("PUBLIC",):
            statements.append(f"REVOKE ALL ON FUNCTION {self.signature} FROM PUBLIC")
            statements.extend(
                f"GRANT EXECUTE ON FUNCTION {self.signature} TO {role}" for role in self.execute
            )
        return statements

    @classmethod
    def as_owner(cls, folder: Path, name: str, arguments: str) -> ServerFunction:
        """A function that writes what the application's role may not: run as its owner
        (SECURITY DEFINER), its search_path pinned (pg_temp last: a temporary object of the
        caller's can never stand in for a table), callable by the application's role alone
        (granted by name), never by PUBLIC. Its file is ``folder/<name without tandem_>.sql``."""
        return cls(
            name,
            folder / f"{name.removeprefix('tandem_')}.sql",
            arguments,
            security_definer=True,
            config=("search_path=public, pg_temp",),
            execute=(),
            app_role=True,
        )

    def grant_statement(self, role: str) -> str:
        """What ``grant_app_role`` runs for a function declared ``app_role``."""
        return f"GRANT EXECUTE ON FUNCTION {self.signature} TO {role}"

    def drop_statement(self) -> str:
        return f"DROP FUNCTION {self.signature}"
