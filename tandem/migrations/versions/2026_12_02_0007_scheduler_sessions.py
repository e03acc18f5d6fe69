"""The cron's liveness from the database's own sessions, and its claim and heartbeat as one
statement each.

- ``instances.session_key``: each instance holds a session-level advisory lock
  (``tandem_open_session``) on its direct heartbeat connection. The lock lives exactly as long
  as that database session: a killed process's session ends in milliseconds (its socket is
  closed by the kernel), so ``instance_sessions`` drops it at once and the sweep records its
  runs lost without waiting for their lease. A new session (after a reconnect) takes a new
  key, so a lingering old session can never vouch for the new one.
- ``tandem_claim_task``: the claim was a transaction of three statements holding a
  cluster-wide advisory lock while it waited on the client between them: a session cut off
  in between kept the lock and stalled every claim in the cluster. Now the lock, the fair-share
  count, the claim and its history row are one call of a server-side function: the lock is
  released at the end of the statement's own transaction, before the answer is even sent, and
  ``lock_timeout`` bounds any wait for it. A function rather than one SQL statement because
  its reads must see the claims committed before the lock was granted (each statement of a
  volatile function takes a new snapshot; the CTEs of one statement share the first one).
- ``tandem_heartbeat``: membership, lease renewal and the live count in one round trip,
  refused as a whole when it arrives later than its sender allowed (see the runner) or on a
  connection that does not hold the instance's session lock (a transaction pooler).

Revision ID: 0007_scheduler_sessions
Revises: 0006_session_deadlines
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_scheduler_sessions"
down_revision: str | None = "0006_session_deadlines"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The advisory-lock namespaces (first key of the two-key form): tandem/scheduler/repository.py
# names the same numbers.
CLAIM_LOCK = 0x7A6D_0002
SESSION_LOCKS = 0x7A6D_0003

# The claim as 0007 made it (0010 replaces it, and restores it on downgrade).
CLAIM_FUNCTION = f"""
        CREATE FUNCTION tandem_claim_task(
            p_instance text, p_key integer, p_lease interval, p_live_window interval,
            p_steal_after interval, p_fresh_window interval, p_slack integer,
            p_known text[], p_lock_timeout text)
        RETURNS TABLE (task_id bigint, name text, function_name text, fence bigint,
                       scheduled_for timestamptz, started_at timestamptz, recovers boolean)
        LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            mine bigint;
            floor_live bigint;
            floor_fresh bigint;
        BEGIN
            PERFORM set_config('lock_timeout', p_lock_timeout, true);
            PERFORM pg_advisory_xact_lock({CLAIM_LOCK});
            -- A claimer without its live session would see its run swept as lost at once.
            SELECT i.claims INTO mine FROM instances i
            JOIN instance_sessions s ON s.session_key = i.session_key
            WHERE i.id = p_instance AND i.session_key = p_key AND i.status = 'active';
            IF mine IS NULL THEN
                RETURN;
            END IF;
            SELECT min(i.claims),
                   min(i.claims) FILTER (WHERE i.heartbeat_at > clock_timestamp() - p_fresh_window)
            INTO floor_live, floor_fresh
            FROM instances i JOIN instance_sessions s ON s.session_key = i.session_key
            WHERE i.status = 'active' AND i.heartbeat_at > clock_timestamp() - p_live_window;
            RETURN QUERY
            WITH candidate AS (
                SELECT t.id, t.next_run_at FROM tasks t
                WHERE t.enabled AND NOT t.is_running AND t.next_run_at <= clock_timestamp()
                  AND (p_known IS NULL OR t.name = ANY(p_known))
                  AND (mine <= coalesce(floor_live, mine) + p_slack
                       OR (t.next_run_at <= clock_timestamp() - p_steal_after
                           AND mine <= coalesce(floor_fresh, mine) + p_slack)
                       -- the least-served fresh one does not claim it either (its claims
                       -- fail, or it has no code for the task): anyone
                       OR t.next_run_at <= clock_timestamp() - 2 * p_steal_after)
                ORDER BY t.next_run_at, t.id
                LIMIT 1
                FOR UPDATE OF t SKIP LOCKED
            ), claimed AS (
                UPDATE tasks t
                SET is_running = true,
                    running_instance = p_instance,
                    started_at = clock_timestamp(),
                    lease_until = clock_timestamp() + p_lease,
                    fence = t.fence + 1,
                    next_run_at = c.next_run_at + t."interval" * (
                        floor(extract(epoch FROM clock_timestamp() - c.next_run_at)
                              / extract(epoch FROM t."interval")) + 1)
                FROM candidate c
                WHERE t.id = c.id AND NOT t.is_running
                RETURNING t.id, t.name, t.function_name, t.fence, c.next_run_at AS scheduled_for,
                          t.started_at, coalesce(t.last_status = 'lost', false) AS recovers
            ), counted AS (
                UPDATE instances SET claims = claims + 1
                WHERE id = p_instance AND EXISTS (SELECT FROM claimed)
            ), history AS (
                INSERT INTO task_history
                    (task_id, instance_id, fence, scheduled_for, started_at, status)
                SELECT id, p_instance, fence, scheduled_for, started_at, 'running' FROM claimed
            )
            SELECT * FROM claimed;
        END $$
        """


def upgrade() -> None:
    op.execute("CREATE SEQUENCE instance_session_keys AS integer CYCLE")
    op.execute("ALTER TABLE instances ADD COLUMN session_key integer")
    op.execute(
        f"""
        CREATE VIEW instance_sessions AS
        SELECT l.objid::int8 AS session_key, l.pid
        FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.classid = {SESSION_LOCKS}::oid
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        """
    )
    # The server drops a silent client's session no sooner than a lease after its last
    # packet (TCP user timeout and keepalives of this session only): until then the session
    # vouches for a partitioned instance, whose runs its lease and self-fencing protect.
    op.execute(
        f"""
        CREATE FUNCTION tandem_open_session(p_instance text, p_lease interval)
        RETURNS TABLE (session_key integer, db_now timestamptz)
        LANGUAGE plpgsql AS $$
        DECLARE
            key integer;
            lease_s integer := ceil(extract(epoch FROM p_lease));
        BEGIN
            UPDATE instances i SET session_key = nextval('instance_session_keys')
            WHERE i.id = p_instance RETURNING i.session_key INTO key;
            IF key IS NULL THEN
                RETURN;  -- not registered (forgotten): the caller registers first
            END IF;
            PERFORM pg_advisory_lock({SESSION_LOCKS}, key);  -- a new key: never waits
            PERFORM set_config('tcp_user_timeout', (lease_s * 1000)::text, false);
            PERFORM set_config('tcp_keepalives_idle', lease_s::text, false);
            PERFORM set_config('tcp_keepalives_interval',
                               greatest(1, ceil(lease_s / 3.0))::text, false);
            PERFORM set_config('tcp_keepalives_count', '3', false);
            RETURN QUERY SELECT key, clock_timestamp();
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION tandem_heartbeat(
            p_instance text, p_key integer, p_lease interval, p_ids bigint[],
            p_fences bigint[], p_anchor timestamptz, p_valid_for interval,
            p_live_window interval)
        RETURNS TABLE (outcome text, renewed bigint[], live integer, db_now timestamptz)
        LANGUAGE plpgsql AS $$
        DECLARE
            ids bigint[];
            remaining interval := p_anchor + p_valid_for - clock_timestamp();
        BEGIN
            IF remaining <= interval '0' THEN
                RETURN QUERY SELECT 'stale', NULL::bigint[], NULL::integer, clock_timestamp();
                RETURN;
            END IF;
            -- No lock wait may carry a renewal past its validity.
            PERFORM set_config('lock_timeout',
                               greatest(1, ceil(extract(epoch FROM remaining) * 1000))::text,
                               true);
            IF NOT EXISTS (SELECT FROM instance_sessions s
                           WHERE s.session_key = p_key AND s.pid = pg_backend_pid()) THEN
                RETURN QUERY SELECT 'no_session', NULL::bigint[], NULL::integer,
                                    clock_timestamp();
                RETURN;
            END IF;
            -- Only (task, fence) pairs still held, only leases not yet expired (an expired
            -- lease may be swept any moment and must not come back to life), and only while
            -- the renewal is still valid (checked again under each row lock).
            BEGIN
                WITH renewed AS (
                    UPDATE tasks t SET lease_until = clock_timestamp() + p_lease
                    FROM unnest(p_ids, p_fences) AS held(id, fence)
                    WHERE t.id = held.id AND t.fence = held.fence AND t.is_running
                      AND t.running_instance = p_instance
                      AND t.lease_until > clock_timestamp()
                      AND clock_timestamp() <= p_anchor + p_valid_for
                    RETURNING t.id
                )
                SELECT coalesce(array_agg(renewed.id), '{}') INTO ids FROM renewed;
                -- Last: the instance's row is what its own claims update too.
                UPDATE instances i SET heartbeat_at = clock_timestamp(), status = 'active'
                WHERE i.id = p_instance AND i.session_key = p_key;
                IF NOT FOUND THEN
                    RETURN QUERY SELECT 'unknown_instance', NULL::bigint[], NULL::integer,
                                        clock_timestamp();
                    RETURN;
                END IF;
            EXCEPTION WHEN lock_not_available THEN
                -- Held up past its validity: nothing renewed (the block is rolled back).
                RETURN QUERY SELECT 'stale', NULL::bigint[], NULL::integer, clock_timestamp();
                RETURN;
            END;
            RETURN QUERY SELECT 'renewed', ids, (
                SELECT count(*)::integer FROM instances i
                JOIN instance_sessions s ON s.session_key = i.session_key
                WHERE i.status = 'active' AND i.heartbeat_at > clock_timestamp() - p_live_window
            ), clock_timestamp();
        END $$
        """
    )
    op.execute(CLAIM_FUNCTION)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION tandem_claim_task(text, integer, interval, interval, interval, interval, "
        "integer, text[], text)"
    )
    op.execute(
        "DROP FUNCTION tandem_heartbeat(text, integer, interval, bigint[], bigint[], "
        "timestamptz, interval, interval)"
    )
    op.execute("DROP FUNCTION tandem_open_session(text, interval)")
    op.execute("DROP VIEW instance_sessions")
    op.execute("ALTER TABLE instances DROP COLUMN session_key")
    op.execute("DROP SEQUENCE instance_session_keys")
