"""Settings from the environment (prefix ``TANDEM_``) and an optional ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", env_file=".env", extra="ignore")

    # No URL means "start an embedded PostgreSQL under data_dir" (CLI only; the app needs a URL).
    # Multi-host URLs work (postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write).
    database_url: str | None = None
    # What needs a real session rather than a pooler's transaction (`tandem migrate`): a
    # direct URL to PostgreSQL when database_url points at PgBouncer. Default: database_url.
    database_direct_url: str | None = None
    data_dir: Path = Path(".tandem")
    # The application's own database role, when it is not the owner (the compose file's):
    # `tandem migrate`, connected as the owner, grants it the app's rights after upgrading
    # (core/migrations.grant_app_role: no DDL, the journal append-only).
    database_app_role: str | None = None

    # The wallet's hot path has its own asyncpg pool. 5 instances x (pool + engine pool) must fit
    # PostgreSQL's default max_connections=100; the measurement: docs/decisions.md, Pool sizes.
    db_pool_size: int = Field(default=10, ge=1, le=200)
    db_engine_pool_size: int = Field(default=3, ge=1, le=50)
    # Seconds a request may wait for a pooled connection. A 10000-request burst queues on the
    # pool (the row lock serialises it anyway), so this is generous on purpose.
    db_pool_timeout: float = Field(default=60.0, gt=0)
    # Client-side deadlines (seconds): making a connection, and every statement (asyncpg
    # cancels it and the connection is replaced). The statement deadline is longer than the
    # server's statement_timeout (10 s, migration 0006), so a slow statement is normally
    # cancelled by the server first, which means "not applied" rather than "unknown".
    db_connect_timeout: float = Field(default=5.0, gt=0)
    db_command_timeout: float = Field(default=15.0, gt=0)
    # How long sent data may go unacknowledged before the kernel drops the connection
    # (TCP_USER_TIMEOUT), seconds.
    db_tcp_user_timeout: float = Field(default=10.0, gt=0)
    # Closing all connections at shutdown takes at most this long (seconds); the rest are
    # terminated without waiting on the peer.
    db_close_timeout: float = Field(default=2.0, gt=0)
    # asyncpg's prepared-statement cache. Off (false) behind a pooler in transaction mode
    # that cannot keep prepared statements (PgBouncer before 1.21): docs/pooling.md.
    db_statement_cache: bool = True

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # The kernel caps the listen backlog at net.core.somaxconn; asking for more costs nothing.
    backlog: int = Field(default=16384, ge=64)
    # Seconds an idle client connection stays open. Longer than nginx's upstream keepalive
    # (60 s): the proxy, not the app, must close idle connections (deploy/nginx/nginx.conf).
    keep_alive_timeout: int = Field(default=75, ge=1)
    # The HTTP server's limits (tandem/core/http.py): bytes of a request line and headers,
    # of a declared body on any route, seconds for the headers and for the body to arrive,
    # and open connections per instance (past it: 503 at once).
    http_max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    http_max_body_bytes: int = Field(default=64 * 1024, ge=4096)
    http_header_timeout: float = Field(default=10.0, gt=0)
    http_body_timeout: float = Field(default=30.0, gt=0)
    http_max_connections: int = Field(default=20_000, ge=1)
    log_level: str = "info"
    # Apply migrations when `tandem serve` starts (fine for one local instance; a deployment
    # runs `tandem migrate` once instead).
    migrate_on_start: bool = True

    # --- access (tandem/access/) --------------------------------------------------------
    # A key registered at start with every scope (if not there yet) under api_key_name: how
    # a deployment gets its first key. The token itself, or a file holding it (a secret).
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    api_key_name: str = "bootstrap"
    # Anonymous clients get every right: for clients from before API keys only. Every
    # start warns, and so does the status page.
    auth_disabled: bool = False
    # Seconds a verified (or unknown) key is remembered per process: a revocation reaches
    # every instance within this plus one lookup.
    auth_cache_ttl: float = Field(default=2.0, gt=0, le=5.0)
    # Tokens the cache does not know (a key made since the last reload, or a guess) are
    # looked up in the database by their hash at most this often per process (as many at
    # once): a flood of random tokens costs the database almost nothing.
    auth_lookups_per_second: float = Field(default=5.0, gt=0, le=1000.0)
    # New idempotency keys one API key may store per UTC day (429 past it).
    idempotency_keys_per_day: int = Field(default=1_000_000, ge=1)
    # Group commit (tandem/wallet/batching.py): changes of one user arriving while a statement
    # for it is in flight go together, up to wallet_batch_max per statement; one that waited
    # wallet_batch_wait seconds unsent is answered 503 database_unavailable (as long as a
    # request may wait for a pool connection, by default).
    wallet_group_commit: bool = True
    wallet_batch_max: int = Field(default=100, ge=1, le=10_000)
    wallet_batch_wait: float = Field(default=60.0, gt=0)

    # --- cluster cron (all durations in seconds of real time) ---------------------------
    scheduler_enabled: bool = True
    # "module:attribute" of the Registry whose tasks this instance runs.
    scheduler_tasks: str = "tandem.scheduler.demo_tasks:registry"
    # Multiplies task intervals and the demo tasks' run time: 0.01 turns 5 minutes into 3 s.
    # Scheduler timings (poll, lease, ...) are not scaled: they are set directly.
    scheduler_time_scale: float = Field(default=1.0, gt=0, le=1.0)
    scheduler_poll_interval: float = Field(default=1.0, gt=0)
    scheduler_heartbeat_interval: float = Field(default=2.0, gt=0)
    scheduler_lease: float = Field(default=10.0, gt=0)
    # Each run is cancelled by a timer of its own this long after the sending of its last
    # successful renewal (or of its claim): lease - self_fence_after is the margin in which
    # the task body stops before its lease can expire and another instance may take over.
    scheduler_self_fence_after: float = Field(default=7.0, gt=0)
    # A renewal reaching the database later than this after it was sent is refused (measured
    # on the database clock from an anchor of the previous answer): a renewal delayed in the
    # network never extends a lease its instance has given up. See check_scheduler_timings.
    scheduler_renewal_validity: float = Field(default=1.0, gt=0)
    # The claim waits at most this long for the cluster-wide claim lock, then gives up until
    # the next poll (that lock is held for one statement; this bounds the unforeseen).
    scheduler_claim_lock_timeout: float = Field(default=1.0, gt=0)
    # A due task its fair claimer left unclaimed this long goes to the least-served instance
    # whose heartbeat is fresh (the fair one is stopped, starved or cut off).
    scheduler_steal_after: float = Field(default=2.0, ge=0)
    # Runs one poll may claim, up to scheduler_claim_batch per statement. Fair share is
    # computed for each batch (the due runs' share per live instance), so instances that
    # started together share what is due at start instead of the first poller taking it all.
    scheduler_claims_per_poll: int = Field(default=1000, ge=1, le=100_000)
    scheduler_claim_batch: int = Field(default=50, ge=1, le=1000)
    scheduler_drain_timeout: float = Field(default=5.0, ge=0)
    scheduler_pool_size: int = Field(default=2, ge=1, le=20)
    # Name of a demo task that fails on purpose (to show failures in history), or "".
    scheduler_failing_task: str = ""

    # --- housekeeping: tasks of the cluster cron itself (tandem/maintenance.py) ----------
    maintenance_enabled: bool = True
    # How often each housekeeping task runs (seconds, times scheduler_time_scale).
    maintenance_interval: float = Field(default=3600.0, gt=0)
    # Finished task runs older than this are deleted (seconds; 30 days).
    history_retention: float = Field(default=30 * 86400.0, gt=0)
    # Idempotency keys older than this are deleted (seconds; 24 hours): a retry after that
    # is a new request.
    idempotency_retention: float = Field(default=86400.0, gt=0)
    # Rows deleted per statement: short transactions, however much has piled up.
    maintenance_batch: int = Field(default=5000, ge=1, le=1_000_000)
    # The ledger verification's statement deadline (seconds; the cron's run and `tandem
    # ledger verify`): a full scan of the journal, so far above the requests' 10 s, yet bounded.
    ledger_verify_timeout: float = Field(default=600.0, gt=0)

    # --- the change stream: events and webhooks (tandem/events/) ----------------------------
    # The delivery worker stamps new events this often when it found none last time (seconds):
    # the floor of the stream's lag, and the idle cost (one short transaction per poll).
    events_poll_interval: float = Field(default=0.1, gt=0, le=10.0)
    # The longest a GET /events waits for an event (seconds): its `wait`, up to 30, is cut to
    # this (a proxy in front with a shorter read timeout, say).
    events_wait_max: float = Field(default=30.0, ge=0, le=30.0)
    # Events are deleted this long after they were made (seconds); unset: the webhooks' retry
    # window plus 7 days. Never shorter than the retry window (checked at start): an event is
    # kept while a delivery of it may still be retried.
    events_retention: float | None = Field(default=None, gt=0)
    # A failed delivery is retried after this (seconds), doubled per attempt with equal
    # jitter (the cron's retry arithmetic), for up to the retry window; past it the endpoint
    # is marked failing and disabled.
    webhooks_retry_base: float = Field(default=5.0, gt=0)
    webhooks_retry_window: float = Field(default=259_200.0, gt=0)
    # An attempt is abandoned after this, connecting and answering together (seconds).
    webhooks_timeout: float = Field(default=10.0, gt=0, le=300.0)
    # Deliveries to loopback, link-local and private addresses (internal deployments, tests).
    webhooks_allow_private: bool = False

    @property
    def events_keep(self) -> float:
        """How long events are kept (seconds): TANDEM_EVENTS_RETENTION, or the retry window
        plus 7 days."""
        if self.events_retention is not None:
            return self.events_retention
        return self.webhooks_retry_window + 7 * 86400.0

    @property
    def scheduler_live_window(self) -> float:
        """How recent a heartbeat keeps an instance live, in seconds, for fair share, the live
        count and the status page: one lease. (A shorter window frees the others sooner when
        one dies, but a heartbeat late under load then drops a live instance from the count.
        A dead one leaves the count at once anyway: its session is gone.)"""
        return self.scheduler_lease

    @model_validator(mode="after")
    def check_scheduler_timings(self) -> Settings:
        """The arithmetic that makes self-fencing safe, checked at start. With h the heartbeat
        interval, v the renewal validity, f self_fence_after and L the lease, a run's local
        deadline is (sending of its last renewal) + f, while the database holds the lease
        until at least (arrival of that renewal) + L, which is later: the run stops L - f
        before anyone can take it over. A renewal is sent only while it can land (sent + v)
        before that deadline, and the database refuses one that arrives later than sent + v,
        so nothing extends a lease its instance has given up. A renewal every h then keeps
        a run alive through one lost heartbeat only if 2h + v <= f."""
        h, v = self.scheduler_heartbeat_interval, self.scheduler_renewal_validity
        f, lease = self.scheduler_self_fence_after, self.scheduler_lease
        if not f < lease:
            raise ValueError(
                f"scheduler_self_fence_after ({f} s) must be shorter than scheduler_lease "
                f"({lease} s): the difference is the time a cancelled run has to stop"
            )
        if not 2 * h + v <= f:
            raise ValueError(
                f"2 x scheduler_heartbeat_interval + scheduler_renewal_validity ({2 * h + v} s) "
                f"must not exceed scheduler_self_fence_after ({f} s): a run would self-fence "
                "after a single late heartbeat"
            )
        return self

    @model_validator(mode="after")
    def check_events_retention(self) -> Settings:
        """An event is kept at least as long as a delivery of it may be retried."""
        if self.events_keep < self.webhooks_retry_window:
            raise ValueError(
                f"events_retention ({self.events_keep} s) must not be shorter than "
                f"webhooks_retry_window ({self.webhooks_retry_window} s): an event being "
                "retried would be deleted"
            )
        return self

    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError(
                "TANDEM_DATABASE_URL is not set: start through `tandem serve`, which starts an "
                "embedded PostgreSQL when no URL is given, or set the URL."
            )
        return self.database_url

    def configured_api_key(self) -> str | None:
        """TANDEM_API_KEY, else the first line of TANDEM_API_KEY_FILE, else None."""
        if self.api_key is not None:
            return self.api_key.get_secret_value().strip()
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip()
        return None

    def require_direct_url(self) -> str:
        return self.database_direct_url or self.require_database_url()


@lru_cache
def get_settings() -> Settings:
    return Settings()
