"""The README's shell examples run as written, in order, against a freshly started Tandem and
answer what their comments show.

Each ```sh block of README.md with a `curl` line is an example. Its commands run one by one
in bash, as written, from a folder laid out as the repository's root is after a fresh `make
run` (`.tandem/dev-key` holding the server's key, `.venv` the running interpreter's), after
the README's own `KEY=…` line; only the address changes (`localhost:8000` becomes the test
server's). A command's answer must be 2xx and have the shape of the JSON its comment lines
show (the same keys, recursively, with values of the same JSON type or null; a comment that
says "condensed" may show fewer keys, and `…` stands for elided items); a command whose comment is
plain text must print exactly those lines (a trailing "(note)" after two spaces is prose).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import API_KEY, REPO, require_tool, start_server

README = REPO / "README.md"
ADDRESS = "localhost:8000"
# curl as written, plus its status after the body (its own --write-out), so that a 4xx
# cannot pass for an answer of the right shape.
STATUS_MARK = "\n@@status "
CURL_WITH_STATUS = "curl() { command curl --write-out '\\n@@status %{http_code}' \"$@\"; }"


@dataclass
class Example:
    command: str
    line: int
    shown: list[str]

    @property
    def condensed(self) -> bool:
        return "condensed" in self.command.splitlines()[-1]


def sh_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the opening fence, the block's lines) for every ```sh block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            yield start, body
        i += 1


def examples(block: list[str], first_line: int) -> list[Example]:
    """The block's commands (continuation lines joined) with the comment lines after each."""
    found: list[Example] = []
    i = 0
    while i < len(block):
        line = block[i]
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        start, command = i, [line]
        while command[-1].rstrip().endswith("\\"):
            i += 1
            command.append(block[i])
        i += 1
        shown = []
        while i < len(block) and block[i].lstrip().startswith("#"):
            shown.append(block[i].lstrip()[1:].strip())
            i += 1
        found.append(Example("\n".join(command), first_line + start + 1, shown))
    return found


def parse_shown(shown: list[str]) -> Any:
    """The JSON a comment shows: its lines joined, `…` items dropped, prose after it ignored."""
    text = " ".join(shown)
    text = re.sub(r",\s*…", "", text)
    text = re.sub(r"\[\s*…\s*\]", "[]", text)
    value, _ = json.JSONDecoder().raw_decode(text[text.index("{") :])
    return value


def shape_mismatch(shown: Any, got: Any, condensed: bool, path: str = "$") -> str | None:
    """Where ``got`` differs in shape from ``shown``, or None."""
    if shown is None or got is None:
        # A null in the README is an example value (any will do); a null answer is a value
        # not there yet (a task not running at that moment): the key is what is checked.
        return None
    if isinstance(shown, dict):
        if not isinstance(got, dict):
            return f"{path}: expected an object, got {got!r}"
        missing = shown.keys() - got.keys()
        extra = got.keys() - shown.keys()
        if missing or (extra and not condensed):
            return f"{path}: keys missing {sorted(missing)}, not shown {sorted(extra)}"
        for key, value in shown.items():
            mismatch = shape_mismatch(value, got[key], condensed, f"{path}.{key}")
            if mismatch:
                return mismatch
        return None
    if isinstance(shown, list):
        if not isinstance(got, list):
            return f"{path}: expected an array, got {got!r}"
        if not shown:
            return None  # `[…]`: any items
        if not got:
            return f"{path}: expected items, got none"
        return shape_mismatch(shown[0], got[0], condensed, f"{path}[0]")
    if json_type(shown) != json_type(got):
        return f"{path}: expected a {json_type(shown)} like {shown!r}, got {got!r}"
    return None


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def readme_examples() -> tuple[str, list[Example]]:
    """The README's KEY/AUTH line, and every example of its sh blocks with a curl line."""
    prelude, found = None, []
    for start, block in sh_blocks(README.read_text()):
        if any(line.startswith("KEY=") for line in block):
            prelude = next(line for line in block if line.startswith("KEY="))
        elif any("curl " in line for line in block):
            found.extend(examples(block, start))
    assert prelude is not None, "the README says how to set KEY and AUTH"
    return prelude, found


def test_the_readme_is_parsed_into_examples() -> None:
    """Every curl example of the README shows its answer (so the test below checks it)."""
    _, found = readme_examples()
    curls = [e for e in found if "curl " in e.command]
    assert len(curls) >= 5
    for example in curls:
        assert example.shown, f"README.md:{example.line}: show the answer in a comment"
        parse_shown(example.shown)


def test_every_readme_example_runs_as_written(database_url: str, tmp_path: Path) -> None:
    """On a fresh start (migrated database, scheduler and housekeeping on, as `make run`),
    each example answers 2xx with the shape its comment shows, in the README's order."""
    require_tool("curl")
    prelude, found = readme_examples()
    root = tmp_path / "checkout"
    (root / ".tandem").mkdir(parents=True)
    (root / ".tandem" / "dev-key").write_text(API_KEY + "\n")
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    server = start_server(
        database_url,
        tmp_path,
        extra_env={
            "TANDEM_SCHEDULER_ENABLED": "true",
            "TANDEM_MAINTENANCE_ENABLED": "true",
            "TANDEM_API_KEY_NAME": "dev",
        },
    )
    address = f"127.0.0.1:{server.port}"
    try:
        for example in found:
            command = example.command.replace(ADDRESS, address)
            run = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", f"{CURL_WITH_STATUS}\n{prelude}\n{command}"],
                cwd=root,
                env={k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            where = f"README.md:{example.line}: {example.command}"
            assert run.returncode == 0, f"{where}\n{run.stderr}"
            if STATUS_MARK in run.stdout:
                body, status = run.stdout.rsplit(STATUS_MARK, 1)
                assert status.startswith("2"), f"{where}\nanswered {status}: {body}"
                mismatch = shape_mismatch(
                    parse_shown(example.shown), json.loads(body), example.condensed
                )
                assert mismatch is None, f"{where}\n{mismatch}\ngot {body}"
            else:
                shown = [re.sub(r"\s{2,}\(.*\)$", "", line) for line in example.shown]
                assert run.stdout.splitlines() == shown, f"{where}\ngot {run.stdout}"
    finally:
        server.stop()
