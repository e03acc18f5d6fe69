"""A real partition across container networks: a replica disconnected from the database's
network (`podman network disconnect`) stops its run before another replica starts it, and
the wallet behind nginx keeps answering: through the other replica, and from the cut-off one
promptly, in the envelope, never a hang."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tandem.core.migrations import upgrade_to_head
from tests.deploy.containers import address_on, app_image, containers, network, podman
from tests.deploy.edge import Nginx
from tests.faults.common import ANSWER_BOUND
from tests.faults.cron import COMPRESSED_ENV, claimed_again, measure, owner_of
from tests.faults.postgres import throwaway_postgres
from tests.support import API_KEY, AUTH, REPO, free_port, query, wait_for

pytestmark = pytest.mark.timeout(900)


def test_a_replica_cut_off_by_its_network_stops_first_and_nginx_answers(
    nginx: Callable[..., Nginx], tmp_path: Path
) -> None:
    """Two replicas on two container networks: the database's (PostgreSQL on the host,
    reached through that network's gateway) and the front one nginx reaches them by. The
    owner of a never-ending task that makes an outside effect every 0.2 s is disconnected
    from the database's network: none of its effects comes at or after its successor's first
    (the cron fault tests' check); reads through nginx meanwhile are all answered: 200 by the
    other replica, and by the cut-off one 503 database_unavailable (or outcome_unknown)
    within its statement deadlines."""
    image = app_image()
    effects = tmp_path / "effects"
    effects.mkdir()
    effects.chmod(0o777)  # the replicas run as uid 10001
    with (
        network() as (front, _, _),
        network() as (back, subnet, gateway),
        throwaway_postgres(trusted=[subnet]) as postgres,
    ):
        upgrade_to_head(postgres.url)
        url_inside = f"postgresql://postgres@{gateway}:{postgres.port}/postgres"
        settings = {
            **COMPRESSED_ENV,
            "TANDEM_DATABASE_URL": url_inside,
            "TANDEM_PORT": "8000",
            "TANDEM_API_KEY": API_KEY,
            "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:effects",
            "TANDEM_TEST_EFFECTS": "/effects",
            "PYTHONPATH": "/repo",
        }
        env = [option for k, v in settings.items() for option in ("--env", f"{k}={v}")]
        with containers() as started:
            replicas: dict[str, str] = {}
            for replica in range(2):
                hostname, port = f"replica-{replica}", free_port()
                replicas[hostname] = started.serve(
                    image,
                    port,
                    network=front,
                    options=[
                        "--network",
                        back,
                        "--read-only",
                        "--hostname",
                        hostname,
                        "--volume",
                        f"{REPO / 'tests'}:/repo/tests:ro",
                        "--volume",
                        f"{effects}:/effects",
                        *env,
                    ],
                )
            # nginx reaches the replicas by their addresses on the network, as it would in
            # compose (a published port would outlive the disconnect as a dead end).
            edge = nginx([f"{address_on(front, name)}:8000" for name in replicas.values()])
            wait_for(lambda: owner_of(postgres.url, "Effect") is not None, 30)
            owner, fence = owner_of(postgres.url, "Effect") or ("", 0)
            (hostname,) = (
                r["hostname"]
                for r in query(postgres.url, "SELECT hostname FROM instances WHERE id = $1", owner)
            )
            answers: list[tuple[float, int, str | None]] = []
            reading = threading.Event()
            reader = threading.Thread(target=_read, args=(edge, reading, answers))
            reading.set()
            reader.start()
            try:
                cut_at = time.time()
                podman("network", "disconnect", back, replicas[hostname])
                wait_for(functools.partial(claimed_again, postgres.url, "Effect", fence), 60)
                # Reads until both replicas have answered, however long each 503 took (a
                # count of reads in a fixed window depends on the machine's load).
                wait_for(lambda: _both_answered(answers), 60)
                time.sleep(3)  # room for a late effect of the cut-off run
            finally:
                reading.clear()
                reader.join()
    cut = measure(effects, fence, cut_at)
    assert cut.overlap == 0, cut
    assert cut.stopped < cut.takeover, cut
    # Round robin: every other read goes to the cut-off replica and waits for its statement
    # deadline; the reads in between are answered by the other one.
    assert sum(1 for _, status, _ in answers if status == 200) >= 4, answers
    # The cut-off replica was asked too, and said it cannot reach the database.
    assert any(status == 503 for _, status, _ in answers), answers
    for took, status, code in answers:
        assert (status, code) in (
            (200, None),
            (503, "database_unavailable"),
            (503, "outcome_unknown"),
        )
        assert took < ANSWER_BOUND, (took, status, code)


def _both_answered(answers: list[tuple[float, int, str | None]]) -> bool:
    """The other replica served at least 4 reads and the cut-off one refused one."""
    statuses = [status for _, status, _ in answers]
    return statuses.count(200) >= 4 and 503 in statuses


def _read(
    edge: Nginx, reading: threading.Event, answers: list[tuple[float, int, str | None]]
) -> None:
    """GET /balance/1 through nginx (HTTPS) in a loop: (seconds taken, status, error code)."""
    with edge.client(headers=AUTH, timeout=60) as client:
        while reading.is_set():
            sent = time.monotonic()
            response = client.get("/balance/1")
            code = None if response.is_success else response.json()["error"]["code"]
            answers.append((time.monotonic() - sent, response.status_code, code))
            time.sleep(0.05)
