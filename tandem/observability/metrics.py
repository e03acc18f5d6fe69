"""Prometheus metrics: every name the dashboards and alerts use is defined here.

Names follow ``tandem_<area>_<name>_<unit>``; counters end in ``_total``. Route labels are
route templates (``/balance/{userId}``), never raw paths, so cardinality stays bounded.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from tandem.core.asgi import ERROR_SCOPE_KEY, ASGIApp, Message, Receive, Scope, Send
from tandem.core.errors import DatabaseUnavailableError, OutcomeUnknownError

# Set by an ASGI path that bypasses the router (the wallet's lean path) to name its route.
ROUTE_SCOPE_KEY = "tandem.route"
UNMATCHED_ROUTE = "<unmatched>"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "tandem_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "tandem_http_request_duration_seconds",
    "Time from the request's arrival at the app to its last response byte, by route.",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WALLET_BALANCE_UPDATES = Counter(
    "tandem_wallet_balance_updates_total",
    "Balance update requests by outcome: ok, replayed, or the refusal's error code.",
    ["outcome"],
)
# Group commit (tandem/wallet/batching.py): how many items each batch statement carried (one
# sent alone, with nothing in flight for its row, is not a batch).
WALLET_BATCH_SIZE = Histogram(
    "tandem_wallet_batch_size",
    "Items sent together as one statement (group commit), by kind: change (balance changes of "
    "one user), keyed_change (the same with idempotency keys, one transaction) or transfer "
    "(transfers into one payee).",
    ["kind"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
for _kind in (
    "change",
    "keyed_change",
    "transfer",
):  # exported at 0 from the start, as every series here
    WALLET_BATCH_SIZE.labels(_kind)
# Both kinds of 503 a database failure gives (tandem/core/failures.py): "not_applied"
# (database_unavailable: nothing changed) and "outcome_unknown" (a write may have committed).
# Counted by HttpMetricsMiddleware as they are answered: once per response, whatever was
# retried before.
DATABASE_FAILURES = Counter(
    "tandem_database_failures_total",
    "Database failures answered as 503, by kind: not_applied or outcome_unknown.",
    ["kind"],
)
_NOT_APPLIED = DATABASE_FAILURES.labels("not_applied")
_OUTCOME_UNKNOWN = DATABASE_FAILURES.labels("outcome_unknown")

# --- access ---------------------------------------------------------------------------
# A well-formed token the process's key cache does not hold is looked up in the database by
# its hash (tandem/access/cache.py), unless it is known to be unknown, a lookup of it is
# already on its way, or the per-process limit of lookups is reached.
ACCESS_KEY_LOOKUPS = Counter(
    "tandem_access_key_lookups_total",
    "Database lookups of a token this process's key cache did not hold, by result: found (a "
    "key made since the last reload), unknown (no live key has it), failed (no answer).",
    ["result"],
)
# Requests refused by a limit set on their API key (off unless set): rate (its request rate,
# in the access layer of one process) or debit (its money leaving users per window).
ACCESS_KEY_LIMITED = Counter(
    "tandem_access_key_limited_total",
    "Requests refused 429 by a limit set on their API key, by reason: rate (the key's "
    "request rate in this process), debit (the key's debit limit of a window).",
    ["reason"],
)
ACCESS_KEY_LOOKUPS_AVOIDED = Counter(
    "tandem_access_key_lookups_avoided_total",
    "Requests with a token the key cache did not hold that made no lookup of their own, by "
    "reason: remembered (looked up lately: unknown), shared (waited for the same token's "
    "lookup in flight), limited (the per-process limit of lookups was reached: refused).",
    ["reason"],
)

INSTANCE_INFO = Gauge(
    "tandem_instance_info",
    "Always 1; its labels name this process: the instance id shown by /instances and sent in "
    "every response's X-Instance-Id header.",
    ["instance_id", "hostname", "version"],
)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
INSTANCE_HEADER = b"x-instance-id"


def render_metrics() -> bytes:
    return generate_latest()


def _count_database_failure(scope: Scope) -> None:
    error = scope.get(ERROR_SCOPE_KEY)
    if isinstance(error, OutcomeUnknownError):
        _OUTCOME_UNKNOWN.inc()
    elif isinstance(error, DatabaseUnavailableError):
        _NOT_APPLIED.inc()


def _route_of(scope: Scope) -> str:
    route = scope.get(ROUTE_SCOPE_KEY)
    if route is not None:
        return str(route)
    matched = scope.get("route")
    path = getattr(matched, "path", None)
    return str(path) if path is not None else UNMATCHED_ROUTE


class HttpMetricsMiddleware:
    """Counts and times every HTTP request, whichever path (router or lean) answers it, counts
    the database failures answered (the error the renderer noted in the scope), and names the
    instance that answered in an ``X-Instance-Id`` header (behind a load balancer,
    the access log and the client can tell which replica served a request)."""

    def __init__(self, app: ASGIApp, instance_id: str) -> None:
        self.app = app
        self._instance_header = (INSTANCE_HEADER, instance_id.encode("ascii"))
        # (method, route, status) -> (counter child, histogram child): label lookups take a
        # lock and hash the labels; caching the children keeps the hot path at two calls.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 503:
                    _count_database_failure(scope)
                message["headers"] = [*message.get("headers", ()), self._instance_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            method = scope["method"] if scope["method"] in _KNOWN_METHODS else "OTHER"
            key = (method, _route_of(scope), status)
            children = self._children.get(key)
            if children is None:
                children = (
                    HTTP_REQUESTS.labels(key[0], key[1], str(status)),
                    HTTP_REQUEST_DURATION.labels(key[0], key[1]),
                )
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - started)


# --- cluster cron -------------------------------------------------------------------------
SCHEDULER_RUNS = Counter(
    "tandem_scheduler_runs_total",
    "Task runs finished on this instance, by task and status (succeeded, failed, cancelled).",
    ["task", "status"],
)
SCHEDULER_RUN_DURATION = Histogram(
    "tandem_scheduler_run_duration_seconds",
    "Wall time of task runs on this instance, by task.",
    ["task"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 180, 300, 600, 1800),
)
SCHEDULER_START_LAG = Histogram(
    "tandem_scheduler_start_lag_seconds",
    "Database time from a run's scheduled slot to its start, by task.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
SCHEDULER_CLAIMS = Counter(
    "tandem_scheduler_claims_total", "Runs claimed by this instance, by task.", ["task"]
)
SCHEDULER_LOST_LEASES = Counter(
    "tandem_scheduler_lost_leases_total",
    "Expired leases this instance's sweeper recorded as lost runs (a dead or paused owner).",
)
SCHEDULER_RECOVERIES = Counter(
    "tandem_scheduler_recoveries_total",
    "Runs this instance started for a task whose previous run was lost (failover).",
    ["task"],
)
SCHEDULER_FENCED_OUT = Counter(
    "tandem_scheduler_fenced_out_total",
    "Local runs stopped or refused: taken_over (another instance holds it), self_fenced (no "
    "renewal in time), session_lost (the database session ended), complete_refused.",
    ["reason"],
)
SCHEDULER_RUNNING = Gauge(
    "tandem_scheduler_running_tasks", "Task runs in progress on this instance."
)
SCHEDULER_LIVE_INSTANCES = Gauge(
    "tandem_scheduler_live_instances", "Instances with a fresh heartbeat, as this one sees it."
)
SCHEDULER_TASK_INTERVAL = Gauge(
    "tandem_scheduler_task_interval_seconds",
    "Each enabled task's interval (cluster-wide, from the database).",
    ["task"],
)
SCHEDULER_TASK_LAST_SUCCESS = Gauge(
    "tandem_scheduler_task_last_success_timestamp_seconds",
    "Unix time of each enabled task's last successful run anywhere in the cluster (of its "
    "registration if it never succeeded). Every instance reports the same values.",
    ["task"],
)
SCHEDULER_TASK_PAUSED_SINCE = Gauge(
    "tandem_scheduler_task_paused_timestamp_seconds",
    "Unix time since which each paused housekeeping task is paused (cluster-wide, from the "
    "database); absent while it runs.",
    ["task"],
)

# Set by the housekeeping task tandem.verify_ledger (the same on whichever instance ran it
# last; alert on the max).
LEDGER_MISMATCHES = Gauge(
    "tandem_ledger_mismatches",
    "Ledger invariants broken at the last verification: balances that are not the sum of "
    "their entries, plus entries whose balance is not the previous one's plus their amount.",
)
LEDGER_VERIFIED = Gauge(
    "tandem_ledger_verified_timestamp_seconds",
    "When this instance last verified the ledger (Unix time).",
)

# --- holds ----------------------------------------------------------------------------
# Read from the database by the housekeeping task tandem.expire_holds at the start of each
# run (every 5 s, on whichever instance claims it): cluster-wide values. An instance keeps its
# last reading until it runs the task again, so dashboards and alerts read only the instances
# whose tandem_wallet_holds_observed_timestamp_seconds is recent.
HOLD_STATES = ("active", "overdue", "captured", "released", "expired")
WALLET_HOLDS = Gauge(
    "tandem_wallet_holds",
    "Holds by state, cluster-wide: active (before their expiry), overdue (past their expiry, "
    "not yet released: still held), captured, released, expired.",
    ["state"],
)
for _state in HOLD_STATES:
    # Every state exported from the start (0 until read): a series that appears only after
    # the first hold would leave dashboards blank and alerts unevaluated.
    WALLET_HOLDS.labels(_state)
WALLET_HOLDS_OVERDUE_AGE = Gauge(
    "tandem_wallet_holds_overdue_age_seconds",
    "How long ago the oldest overdue hold (past its expiry, not yet released) expired, by the "
    "database's clock; 0 when there is none (alert TandemHoldsNotExpiring).",
)
WALLET_HOLDS_OBSERVED = Gauge(
    "tandem_wallet_holds_observed_timestamp_seconds",
    "When this instance last read the hold gauges from the database (Unix time).",
)
WALLET_HOLDS_EXPIRED = Counter(
    "tandem_wallet_holds_expired_total",
    "Holds released at their expiry by this instance's runs of tandem.expire_holds (a "
    "user's own spending releases its overdue holds too: those are not counted here).",
)

# --- the change stream (tandem/events/relay.py: the instance running the delivery worker) ------
EVENTS_STAMPED = Counter(
    "tandem_events_stamped_total",
    "Events given their place in the stream by this instance's delivery worker.",
)
EVENTS_LAG = Gauge(
    "tandem_events_lag_seconds",
    "Per webhook endpoint, the age of the oldest event it has not acknowledged yet (0 when "
    "it is up to date); exported by the instance running the delivery worker (alert "
    "TandemEventsLagging).",
    ["endpoint"],
)
WEBHOOK_DELIVERIES = Counter(
    "tandem_webhook_deliveries_total",
    "Attempts to deliver an event to a webhook endpoint, by outcome (delivered: a 2xx; failed: "
    "anything else, retried with backoff).",
    ["outcome"],
)
for _outcome in ("delivered", "failed"):
    WEBHOOK_DELIVERIES.labels(_outcome)
WEBHOOK_ENDPOINTS = Gauge(
    "tandem_webhook_endpoints",
    "Webhook endpoints by state: active, disabled (by the API) and failing (past the retry "
    "window: disabled, alert TandemWebhookEndpointFailing); exported by the instance running "
    "the delivery worker.",
    ["state"],
)
