"""The tests' helpers, each kept once (tests/ and bench/ import them from here):

- ``database``: fresh databases on the suite's PostgreSQL, one-statement queries;
- ``processes``: `tandem serve` processes, the `tandem` command, tools on PATH, a faked clock,
  and the guard that keeps the fast tier free of processes;
- ``metrics``: reading a ``/metrics`` exposition;
- ``timings``: waiting for a condition, the cron's compressed timings;
- ``registries``: task registries loaded by servers through TANDEM_SCHEDULER_TASKS;
- ``claims``: the scheduler's statements driven by hand (sessions, due tasks, claims);
- ``api``: the suite's API key, HTTP calls with it, the app in process, the API's checks;
- ``tiers``: which tier (fast, ``slow``, ``container``) a test is in, read from its code.

The suite uses TANDEM_TEST_DATABASE_URL when set; otherwise it starts an embedded PostgreSQL in
a temporary folder once per session (per xdist worker) and deletes it at the end. Each test
module that needs isolation gets a fresh database, migrated to head, and dropped afterwards.
"""

from tests.support.api import (
    API_KEY,
    AUTH,
    app_settings,
    assert_error,
    balance_of,
    batch_statements,
    batched,
    http_get,
    http_post,
    http_request,
    in_process,
    in_process_client,
    new_user,
    signed_in,
    task_owner,
)
from tests.support.database import (
    empty_database,
    fetch,
    fresh_database,
    holding,
    query,
    value,
    with_database,
)
from tests.support.metrics import sample_sum, sample_value, samples
from tests.support.processes import (
    INSTALL_HINTS,
    NO_PROCESSES_ENV,
    REPO,
    FakeClock,
    ProcessForbiddenError,
    Server,
    allow_processes,
    cannot_run,
    faketime_library,
    forbid_processes,
    free_port,
    free_port_block,
    install_process_guard,
    require_tool,
    run_tandem,
    start_server,
    start_servers,
    wait_live,
)
from tests.support.timings import (
    CRON_TIMINGS,
    LEASE,
    POLL,
    cron_settings,
    eventually,
    until,
    wait_for,
)

__all__ = [
    "API_KEY",
    "AUTH",
    "CRON_TIMINGS",
    "INSTALL_HINTS",
    "LEASE",
    "NO_PROCESSES_ENV",
    "POLL",
    "REPO",
    "FakeClock",
    "ProcessForbiddenError",
    "Server",
    "allow_processes",
    "app_settings",
    "assert_error",
    "balance_of",
    "batch_statements",
    "batched",
    "cannot_run",
    "cron_settings",
    "empty_database",
    "eventually",
    "faketime_library",
    "fetch",
    "forbid_processes",
    "free_port",
    "free_port_block",
    "fresh_database",
    "holding",
    "http_get",
    "http_post",
    "http_request",
    "in_process",
    "in_process_client",
    "install_process_guard",
    "new_user",
    "query",
    "require_tool",
    "run_tandem",
    "sample_sum",
    "sample_value",
    "samples",
    "signed_in",
    "start_server",
    "start_servers",
    "task_owner",
    "until",
    "value",
    "wait_for",
    "wait_live",
    "with_database",
]
