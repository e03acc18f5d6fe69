"""The docs point only inside the repository, and every relative link of theirs resolves.

No processes, no database: files are read as they are checked out (the tracked ones, from
`git ls-files`).
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.support import REPO

# A link or image: [text](target) or ![alt](target "title").
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")

# Places outside the repository that its files once cited; a file must say the requirement
# itself instead.
OUTSIDE = re.compile(r"\.\./shared\b|/work/shared\b|\bshared/(STYLE|design)\b", re.IGNORECASE)
# A relative path climbing out of the folder it is written in.
CLIMBING = re.compile(r"(?:\.\./)+[\w.-]+(?:/[\w.-]+)*")
# Words that cite a document outside the repository instead of stating the requirement.
CITATION = re.compile(
    r"\bthe brief\b|\bbrief's\b|\bthe review\b|\breview's\b|\bdesign note\b|\bissue \d+"
    r"|\bthe plan's\b|\bplan clients\b",
    re.IGNORECASE,
)


@cache
def tracked_files() -> tuple[Path, ...]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return tuple(REPO / name for name in listed.decode().split("\0") if name)


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary (or missing: deleted but not yet staged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def documents() -> list[Path]:
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked out."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered (no code ticks, emphasis or link
    targets), lower-cased, every character but letters, digits, spaces, hyphens and
    underscores dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N", "M"))
    return kept.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file, repeats numbered as GitHub does (-1, -2)."""
    seen: Counter[str] = Counter()
    found = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return frozenset(found)


def links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in prose_lines(path.read_text()):
        for match in LINK.finditer(line):
            yield number, match.group(1)


def test_slugs_follow_github() -> None:
    """The anchor rules agree with GitHub's on the kinds of heading the docs use."""
    assert slug("The image, built and run under podman") == "the-image-built-and-run-under-podman"
    assert slug("Deployment: Docker Compose, nginx, Prometheus, Grafana") == (
        "deployment-docker-compose-nginx-prometheus-grafana"
    )
    assert slug("Schedules, missed slots, timeouts and retries") == (
        "schedules-missed-slots-timeouts-and-retries"
    )
    assert slug("`tandem_claim_run` and `PLAN_RUN`") == "tandem_claim_run-and-plan_run"
    assert slug("Fair share (5 instances)") == "fair-share-5-instances"


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(document: Path) -> None:
    """Each relative link names a file or folder of the repository, and its #anchor, if any,
    a heading of that Markdown file."""
    broken = []
    for number, target in links(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: …: not the repository's
        file_part, _, anchor = unquote(target).partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        where = f"{document.relative_to(REPO)}:{number}: {target}"
        if not resolved.is_relative_to(REPO):
            broken.append(f"{where} points outside the repository")
        elif not resolved.exists():
            broken.append(f"{where} names no file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: no heading with the anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_no_file_points_outside_the_repository() -> None:
    """No tracked file cites a place outside the repository (`../shared/…` and the like), and
    no relative path in one climbs out of it."""
    found = []
    for path in tracked_files():
        text = text_of(path)
        if text is None or path == Path(__file__):  # its patterns name what they look for
            continue
        name = path.relative_to(REPO)
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
            for match in CLIMBING.finditer(line):
                if not (path.parent / match.group(0)).resolve().is_relative_to(REPO):
                    found.append(f"{name}:{number}: {match.group(0)} leaves the repository")
    assert not found, "\n".join(found)


def test_no_document_cites_what_is_not_in_the_repository() -> None:
    """Docs, code and tests state requirements themselves instead of citing a document a
    reader of the repository cannot open (CITATION lists the phrasings)."""
    found = []
    for path in tracked_files():
        name = str(path.relative_to(REPO))
        if path == Path(__file__):
            continue
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if CITATION.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
