"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import API_KEY, Server, start_server

# The fuzzer's server: a GET /events that finds nothing answers at once (the fuzzer picks any
# `wait` up to 30 s), and a webhook URL's host that does not resolve is refused within 1 s
# (the fuzzer makes up host names).
FUZZ_ENV = {"TANDEM_EVENTS_WAIT_MAX": "0", "TANDEM_WEBHOOKS_TIMEOUT": "1"}

HOLD_OPERATIONS = (
    "POST /holds",
    "GET /holds/{holdId}",
    "POST /holds/{holdId}/capture",
    "POST /holds/{holdId}/release",
    "GET /balance/{userId}/holds",
)

CHECKS = ",".join(
    [
        "not_a_server_error",  # never a 5xx, whatever the input
        "status_code_conformance",  # every status answered is documented
        "content_type_conformance",
        "response_schema_conformance",  # every body matches its documented schema
        "negative_data_rejection",  # input that breaks the schema is refused with a 4xx
    ]
)


@pytest.fixture(scope="module")
def server(database_url: str, log_dir: Path) -> Iterator[Server]:
    srv = start_server(database_url, log_dir, extra_env=FUZZ_ENV)
    yield srv
    srv.stop()


def test_fuzzed_requests_find_no_5xx_and_no_schema_break(server: Server, tmp_path: Path) -> None:
    """schemathesis finds no 5xx, no undocumented status and no off-schema response."""
    binary = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    result = subprocess.run(
        [
            binary,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "60",
            "--seed",
            "20261128",
            "--no-color",
            "--request-timeout",
            "10",
            "--header",
            f"Authorization: Bearer {API_KEY}",
            "--report",
            "junit",
            "--report-junit-path",
            str(tmp_path / "junit.xml"),
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # Every operation was fuzzed, the holds' included (the report names each one tested).
    report = ET.parse(tmp_path / "junit.xml")  # noqa: S314  (its own report, just written)
    tested = {case.get("name") for case in report.iter("testcase")}
    for operation in HOLD_OPERATIONS:
        assert operation in tested, sorted(name for name in tested if name)
