"""A whole cluster of real `tandem serve` processes stopped at once (SIGTERM to every one),
round after round, while runs are going and others are due: each time, no run is left
running, and no instance starts a run once its drain has begun."""

from __future__ import annotations

from pathlib import Path

from tandem.scheduler.runs import RELEASED_UNSTARTED
from tests.scheduler.cluster import (
    assert_history_consistent,
    instances_of,
    start_cluster,
    stop_all,
)
from tests.scheduler.registries import BODY_STARTED
from tests.support import LEASE, Server, query, wait_for

ROUNDS = 4
INSTANCES = 4


def running_per_instance(url: str) -> dict[str, int]:
    rows = query(
        url,
        "SELECT running_instance, count(*) AS n FROM tasks WHERE is_running "
        "GROUP BY running_instance",
    )
    return {r["running_instance"]: r["n"] for r in rows}


def started_after_drain(server: Server, instance: str) -> list[str]:
    """The bodies the server's log shows beginning after the line that says its drain began
    (one process's log is in the order things happened in it: no clocks compared)."""
    lines = server.log().splitlines()
    drains = [n for n, line in enumerate(lines) if f"instance {instance} draining" in line]
    assert len(drains) == 1, lines[-40:]
    return [line for line in lines[drains[0] :] if BODY_STARTED in line]


def stop_round(url: str, log_dir: Path) -> tuple[list[Server], list[str]]:
    """Start the cluster, wait until every instance has runs going, SIGTERM all at once and
    wait for every process to exit (0: each drained within its time)."""
    servers = start_cluster(url, log_dir, "stopping", INSTANCES, TANDEM_LOG_LEVEL="info")
    exit_codes: list[int] = []
    try:
        ids = instances_of(url, servers, LEASE)
        wait_for(lambda: set(running_per_instance(url)) >= set(ids), 30)
    finally:
        exit_codes = stop_all(servers)
    assert exit_codes == [0] * INSTANCES, [s.log()[-2000:] for s in servers]
    return servers, ids


def test_a_whole_cluster_stopped_at_once_leaves_nothing_running(
    cron_db: str, tmp_path: Path
) -> None:
    """Four instances, thirty tasks due every second and busy half of it; SIGTERM to all at
    once as soon as every instance has runs going, four rounds on one database (each round
    starts with what the last one released). After each: no run is recorded running, in the
    history or in the tasks; no body began after its instance's drain did; a claim that came
    back during a drain was released unstarted (no probe row: its body never ran), so none
    was left to a sweep (recorded lost); no
    instance claimed after it left the membership list; every body that began has ended (its
    probe row has an end); the history is consistent."""
    for round_number in range(ROUNDS):
        log_dir = tmp_path / f"round-{round_number}"
        log_dir.mkdir()
        servers, ids = stop_round(cron_db, log_dir)
        left = query(
            cron_db,
            "SELECT (SELECT count(*) FROM task_history WHERE status = 'running') AS history, "
            "(SELECT count(*) FROM tasks WHERE is_running) AS tasks",
        )[0]
        assert (left["history"], left["tasks"]) == (0, 0), round_number
        # Every run was drained or released by its own instance: none was left to a sweep.
        lost = query(
            cron_db,
            "SELECT instance_id, fence, error FROM task_history "
            "WHERE status = 'lost' AND instance_id = ANY($1::text[])",
            ids,
        )
        assert lost == [], round_number
        for server, instance in zip(servers, ids, strict=True):
            assert started_after_drain(server, instance) == [], (round_number, instance)
        late = query(
            cron_db,
            "SELECT h.instance_id, h.started_at, i.status, i.heartbeat_at "
            "FROM task_history h JOIN instances i ON i.id = h.instance_id "
            "WHERE i.id = ANY($1::text[]) "
            "AND (i.status <> 'stopped' OR h.started_at > i.heartbeat_at)",
            ids,
        )
        assert late == [], round_number
        ran_anyway = query(
            cron_db,
            "SELECT count(*) AS n FROM task_history h JOIN tasks t ON t.id = h.task_id "
            "JOIN probe p ON p.task = t.name AND p.fence = h.fence WHERE h.error = $1",
            RELEASED_UNSTARTED,
        )
        assert ran_anyway[0]["n"] == 0
        unfinished = query(cron_db, "SELECT count(*) AS n FROM probe WHERE finished IS NULL")
        assert unfinished[0]["n"] == 0
        assert_history_consistent(cron_db)
    released = query(
        cron_db, "SELECT count(*) AS n FROM task_history WHERE error = $1", RELEASED_UNSTARTED
    )
    print(f"claims back during a drain, released unstarted: {released[0]['n']} in {ROUNDS} rounds")
