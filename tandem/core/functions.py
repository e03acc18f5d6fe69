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
    owner (``PUBLIC`` is PostgreSQL's default for a new function, and what every version so
    far keeps: the application's own role gets EXECUTE on every function after each upgrade,
    and may call nothing it could not do with its table rights).
    """

    name: str
    file: Path
    arguments: str
    security_definer: bool = False
    config: tuple[str, ...] = ()
    execute: tuple[str, ...] = ("PUBLIC",)

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

    def drop_statement(self) -> str:
        return f"DROP FUNCTION {self.signature}"
