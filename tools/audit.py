"""`make audit`: each lock file of requirements/ against known vulnerabilities, by pip-audit.

The exit status is 1 when pip-audit finds a known vulnerability in a pin (or fails for a reason
of its own, e.g. a lock it cannot read), 0 otherwise, including when the vulnerability service
cannot be reached or has no record of some pins: each such lock gets a line beginning
``audit: NOT AUDITED``, so that silence is never taken for a clean result. The suite never
runs this (it needs the network); .ci/run runs it after the tests.

pip-audit reads the lock alone (``--disable-pip``: the pins and hashes are all it needs, nothing
is downloaded or installed) and asks its default service, PyPI's JSON API, about each pin.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# A vulnerability known to pip-audit that does not fail the audit: its id (as pip-audit prints
# it) and why (not reachable from Tandem's use, no fixed version yet, ...). Keep each reason
# true and short; remove the entry when the pin moves past it.
IGNORED: dict[str, str] = {}

# What pip-audit's traceback says when no answer came back: no route or name, a proxy, a
# timeout, or the service failing (pip-audit's ServiceError: an HTTP error other than 404).
UNREACHABLE = (
    "ConnectionError",
    "ProxyError",
    "NameResolutionError",
    "Max retries exceeded",
    "ConnectTimeout",
    "ReadTimeout",
    "ServiceError",
)
PREFIX = "audit:"


def judge(
    lock: str, report: dict[str, Any] | None, returncode: int, stderr: str
) -> tuple[int, list[str]]:
    """The exit status and the lines to print for one lock, from pip-audit's JSON report (None
    when it wrote none), its exit status and its standard error."""
    if report is None:
        if any(marker in stderr for marker in UNREACHABLE):
            last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            return 0, [
                f"{PREFIX} NOT AUDITED: {lock}: the vulnerability service could not be reached "
                f"(not a failure; run `make audit` again where it can be): {last[:300]}"
            ]
        return returncode or 1, [
            f"{PREFIX} pip-audit failed on {lock} (exit {returncode}):",
            stderr,
        ]
    dependencies = report.get("dependencies", [])
    lines, status = [], 0
    for dependency in dependencies:
        for vuln in dependency.get("vulns", []):
            status = 1
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fixed version yet"
            lines.append(
                f"{PREFIX} VULNERABLE: {dependency['name']} {dependency.get('version', '?')} "
                f"({lock}): {vuln['id']} (fixed in: {fixed})"
            )
    skipped = [d for d in dependencies if "skip_reason" in d]
    audited = len(dependencies) - len(skipped)
    if skipped and not audited:
        lines.append(
            f"{PREFIX} NOT AUDITED: {lock}: the vulnerability service answered for none of its "
            f"{len(dependencies)} pins (not a failure): {skipped[0]['skip_reason']}, ..."
        )
    elif skipped:
        names = ", ".join(sorted(d["name"] for d in skipped))
        lines.append(
            f"{PREFIX} NOT AUDITED: {len(skipped)} of {len(dependencies)} pins of {lock}: the "
            f"vulnerability service had no record of them (not a failure): {names}"
        )
    if audited and status == 0:
        lines.append(f"{PREFIX} {lock}: {audited} pins audited, no known vulnerability")
    if returncode != 0 and status == 0:  # a report without vulnerabilities, yet a failure
        return returncode, [
            *lines,
            f"{PREFIX} pip-audit failed on {lock} (exit {returncode}):",
            stderr,
        ]
    return status, lines


def audit(lock: str) -> tuple[int, list[str]]:
    """pip-audit on one lock file; its verdict (``judge``)."""
    pip_audit = Path(sys.executable).with_name("pip-audit")
    with tempfile.TemporaryDirectory(prefix="tandem-audit-") as folder:
        output = Path(folder) / "report.json"
        command = [
            str(pip_audit),
            "--requirement",
            lock,
            "--require-hashes",
            "--disable-pip",
            "--progress-spinner",
            "off",
            "--timeout",
            "30",
            "--format",
            "json",
            "--output",
            str(output),
        ]
        for vuln_id in IGNORED:
            command += ["--ignore-vuln", vuln_id]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            return 0, [
                f"{PREFIX} NOT AUDITED: {lock}: the vulnerability service did not answer in 600 s"
            ]
        report = (
            json.loads(output.read_text()) if output.exists() and output.stat().st_size else None
        )
    return judge(lock, report, done.returncode, done.stderr)


def main(locks: list[str]) -> int:
    worst = 0
    for vuln_id, reason in IGNORED.items():
        print(f"{PREFIX} ignored {vuln_id}: {reason}")
    for lock in locks:
        status, lines = audit(lock)
        for line in lines:
            print(line)
        worst = max(worst, status)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
