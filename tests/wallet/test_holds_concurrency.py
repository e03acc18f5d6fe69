"""Holds through real server processes, three instances on one PostgreSQL of the module's
own, their expiry task on (compressed time): 10000 concurrent holds on one balance, a capture
and a release of the same hold at once, captures racing the expiry, and a random mix of
holds, captures, releases, withdrawals and transfers (keys bound to single users among the
callers) whose every acknowledged change survives a SIGKILL of an instance and a crash of
PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tandem.cli import raise_fd_limit
from tandem.core.database import asyncpg_dsn
from tandem.loadtest.client import Result, auth_headers, fetch, parse_base_url, send_burst
from tests.access.keys import make_key
from tests.faults.postgres import ThrowawayPostgres, throwaway_postgres
from tests.support import (
    API_KEY,
    Server,
    batched,
    fresh_database,
    run_tandem,
    start_servers,
    until,
)
from tests.support.registries import scheduler_env

INSTANCES = 3
# The cron at the tests' timings, running only the housekeeping tasks, in time compressed
# tenfold: tandem.expire_holds every 0.5 s.
CLUSTER_ENV = scheduler_env(
    "housekeeping", TANDEM_MAINTENANCE_ENABLED="true", TANDEM_SCHEDULER_TIME_SCALE="0.1"
)


@pytest.fixture(scope="module")
def crashable() -> Iterator[tuple[ThrowawayPostgres, str]]:
    """A migrated database on a PostgreSQL of the module's own, which the last test crashes
    (fsync off, synchronous_commit on: a crash of PostgreSQL alone loses no acknowledged
    commit)."""
    with throwaway_postgres() as postgres, fresh_database(postgres.url) as url:
        yield postgres, url


@pytest.fixture(scope="module")
def cluster(crashable: tuple[ThrowawayPostgres, str], log_dir: Path) -> Iterator[list[Server]]:
    """INSTANCES `tandem serve` processes on that database, the module's tests sharing them."""
    servers = start_servers(crashable[1], log_dir, INSTANCES, extra_env=CLUSTER_ENV)
    yield servers
    for server in servers:
        server.stop()


# --- talking to the instances ----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request: to which instance (an index, wrapped around), with which key."""

    instance: int
    method: str
    path: str
    body: Any = None
    key: str = API_KEY
    idempotency_key: str | None = None


async def send_all(
    servers: Sequence[Server], calls: Sequence[Call], concurrency: int | None = None
) -> list[Result]:
    """Every call on a connection of its own to its instance, all in flight at once (or
    ``concurrency`` per instance); the results in the calls' order."""
    results: list[Result | None] = [None] * len(calls)
    groups: dict[int, list[int]] = {}
    for index, call in enumerate(calls):
        groups.setdefault(call.instance % len(servers), []).append(index)

    async def send(instance: int, indexes: list[int]) -> None:
        endpoint = parse_base_url(servers[instance].url)
        requests = [
            endpoint.request(
                calls[i].method,
                calls[i].path,
                calls[i].body,
                headers={
                    **auth_headers(calls[i].key),
                    **(
                        {"Idempotency-Key": calls[i].idempotency_key}
                        if calls[i].idempotency_key
                        else {}
                    ),
                },
            )
            for i in indexes
        ]
        answers = await send_burst(endpoint.host, endpoint.port, requests, concurrency)
        for index, answer in zip(indexes, answers, strict=True):
            results[index] = answer

    await asyncio.gather(*(send(instance, indexes) for instance, indexes in groups.items()))
    done = [result for result in results if result is not None]
    assert len(done) == len(calls)
    return done


async def call(server: Server, method: str, path: str, body: Any = None) -> Result:
    endpoint = parse_base_url(server.url, API_KEY)
    result = await fetch(endpoint.host, endpoint.port, endpoint.request(method, path, body))
    assert result.error is None, result.error
    return result


async def new_users(server: Server, balances: Sequence[int]) -> list[int]:
    users = []
    for balance in balances:
        made = await call(server, "POST", "/users", {"balance": balance})
        assert made.status == 201, made.body
        users.append(int(made.json()["userId"]))
    return users


def code_of(result: Result) -> str:
    return str(result.json()["error"]["code"])


def refused_as(result: Result, status: int, code: str) -> bool:
    return result.status == status and code_of(result) == code


def not_active_because(result: Result, state: str) -> bool:
    """409 hold_not_active naming the state the hold is in."""
    return refused_as(result, 409, "hold_not_active") and state in result.body.decode()


def instant(text: str) -> float:
    """An ISO 8601 instant as Unix time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def rows(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def accounts(url: str, users: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Each user's (balance, held)."""
    found = await rows(url, "SELECT id, balance, held FROM users WHERE id = ANY($1)", users)
    return {r["id"]: (r["balance"], r["held"]) for r in found}


async def hold_events(url: str, holds: Sequence[int]) -> dict[int, list[str]]:
    """Each hold's event kinds, in order."""
    found = await rows(
        url,
        "SELECT hold_id, kind FROM hold_events WHERE hold_id = ANY($1) ORDER BY id",
        holds,
    )
    kinds: dict[int, list[str]] = {hold: [] for hold in holds}
    for row in found:
        kinds[row["hold_id"]].append(row["kind"])
    return kinds


def verify_ledger(url: str) -> None:
    verified = run_tandem("ledger", "verify", database_url=url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "mismatches: 0" in verified.stdout


# --- the tests --------------------------------------------------------------------------------


async def test_ten_thousand_concurrent_holds(
    cluster: list[Server], crashable: tuple[ThrowawayPostgres, str]
) -> None:
    """10000 holds of 2 on a balance of 10000, all in flight at once over three instances:
    exactly 5000 are created and 5000 refused for insufficient funds; held ends at 10000,
    available at 0, and no two reservations saw the same available amount."""
    raise_fd_limit()
    (user,) = await new_users(cluster[0], [10_000])
    hold = {"userId": user, "amount": 2}
    results = await send_all(cluster, [Call(i, "POST", "/holds", hold) for i in range(10_000)])
    assert Counter(result.describe() for result in results) == {"201": 5000, "409": 5000}
    assert all(code_of(r) == "insufficient_funds" for r in results if r.status == 409)
    created = [result.json() for result in results if result.status == 201]
    assert len({hold["holdId"] for hold in created}) == 5000
    # Each reservation followed the one before under the row lock: 9998, 9996, ... 0.
    assert sorted(hold["available"] for hold in created) == list(range(0, 10_000, 2))
    balance = (await call(cluster[1], "GET", f"/balance/{user}")).json()
    assert balance == {"userId": user, "balance": 10_000, "held": 10_000, "available": 0}
    active = await rows(
        crashable[1],
        "SELECT count(*) AS n, sum(amount) AS total FROM holds "
        "WHERE user_id = $1 AND status = 'active'",
        user,
    )
    assert (active[0]["n"], active[0]["total"]) == (5000, 10_000)


async def test_capture_and_release_of_a_hold_race(
    cluster: list[Server], crashable: tuple[ThrowawayPostgres, str]
) -> None:
    """A capture and a release of the same hold sent at once to two instances, for 150 holds
    (half with a payee, some captures partial): exactly one of the two wins each hold, the
    other is told hold_not_active naming the winner's state, and the money moved is exactly
    the winning captures'."""
    url = crashable[1]
    rng = random.Random(22)
    *payers, payee = await new_users(cluster[0], [10_000, 10_000, 10_000, 0])
    plan = []  # (payer, payee or None, amount, captured amount asked or None: all)
    for i in range(150):
        amount = rng.randrange(2, 100)
        plan.append(
            (
                payers[i % 3],
                payee if i % 2 == 0 else None,
                amount,
                rng.randrange(1, amount) if rng.random() < 0.3 else None,
            )
        )
    made = await send_all(
        cluster,
        [
            Call(
                i, "POST", "/holds", {"userId": u, "amount": a, **({"toUserId": to} if to else {})}
            )
            for i, (u, to, a, _) in enumerate(plan)
        ],
    )
    assert all(result.status == 201 for result in made), [r.body for r in made]
    holds = [int(result.json()["holdId"]) for result in made]

    race = []
    for i, (hold, (_, _, _, part)) in enumerate(zip(holds, plan, strict=True)):
        capture = {} if part is None else {"amount": part}
        race.append((i, "capture", Call(i, "POST", f"/holds/{hold}/capture", capture)))
        race.append((i, "release", Call(i + 1, "POST", f"/holds/{hold}/release")))
    rng.shuffle(race)
    answers = await send_all(cluster, [c for _, _, c in race])

    outcome: dict[int, dict[str, Result]] = {}
    for (i, kind, _), answer in zip(race, answers, strict=True):
        assert answer.error is None, answer.error
        outcome.setdefault(i, {})[kind] = answer
    captured: dict[int, int] = {}  # hold index -> amount captured
    for i, both in outcome.items():
        capture, release = both["capture"], both["release"]
        if capture.status == 200:
            assert not_active_because(release, "captured"), release.body
            captured[i] = plan[i][2] if plan[i][3] is None else plan[i][3]
        else:
            assert not_active_because(capture, "released"), capture.body
            assert release.status == 200, release.body
            assert release.json()["status"] == "released"
    assert 0 < len(captured) < len(holds), "the race went one way every time"

    states = await rows(
        url, "SELECT id, status, captured_amount FROM holds WHERE id = ANY($1)", holds
    )
    assert {r["id"]: (r["status"], r["captured_amount"]) for r in states} == {
        hold: ("captured", captured[i]) if i in captured else ("released", None)
        for i, hold in enumerate(holds)
    }
    expected = {u: (10_000, 0) for u in payers} | {payee: (0, 0)}
    for i, amount in captured.items():
        payer, to = plan[i][0], plan[i][1]
        expected[payer] = (expected[payer][0] - amount, 0)
        if to is not None:
            expected[to] = (expected[to][0] + amount, 0)
    assert await accounts(url, [*payers, payee]) == expected
    # The journal: a capture is one withdrawal, or a transfer's two legs, carrying the hold.
    legs = Counter(
        r["hold_id"]
        for r in await rows(
            url, "SELECT hold_id FROM ledger_entries WHERE hold_id = ANY($1)", holds
        )
    )
    assert legs == {holds[i]: 2 if plan[i][1] else 1 for i in captured}


async def test_capture_racing_expiry_is_one_or_the_other(
    cluster: list[Server], crashable: tuple[ThrowawayPostgres, str]
) -> None:
    """Holds of 4 s, each captured once at an instant from 3 s before to 0.5 s after its
    expiry (most well before it, so that late captures on a loaded machine still leave some
    on each side), on every instance, while the expiry task runs: each hold ends either
    captured, its capture dated before its expiresAt by the database, or expired (its
    capture told hold_not_active, expired), never both; the held amounts all come back, and
    the ledger verifies."""
    url = crashable[1]
    count = 120
    payers = await new_users(cluster[0], [10_000, 10_000, 10_000])
    made = await send_all(
        cluster,
        [
            Call(i, "POST", "/holds", {"userId": payers[i % 3], "amount": 10, "expiresIn": 4})
            for i in range(count)
        ],
    )
    assert all(result.status == 201 for result in made), [r.body for r in made]
    holds = [(int(r.json()["holdId"]), instant(r.json()["expiresAt"])) for r in made]

    async def capture_at(i: int, hold: int, expires_at: float) -> Result:
        # The database runs on this machine: its clock and time.time() are the same clock.
        offset = -3.0 + 3.5 * i / (count - 1)
        await asyncio.sleep(max(0.0, expires_at + offset - time.time()))
        endpoint = parse_base_url(cluster[i % len(cluster)].url, API_KEY)
        request = endpoint.request("POST", f"/holds/{hold}/capture", {})
        return await fetch(endpoint.host, endpoint.port, request)

    answers = await asyncio.gather(*(capture_at(i, hold, at) for i, (hold, at) in enumerate(holds)))
    won = set()
    for (hold, _), answer in zip(holds, answers, strict=True):
        assert answer.error is None, answer.error
        if answer.status == 200:
            won.add(hold)
        else:
            assert not_active_because(answer, "expired"), answer.body
    assert 0 < len(won) < count, "every capture landed on the same side of the expiry"

    ids = [hold for hold, _ in holds]

    async def all_finished() -> bool:
        left = await rows(
            url, "SELECT count(*) AS n FROM holds WHERE id = ANY($1) AND status = 'active'", ids
        )
        return left[0]["n"] == 0

    await until(all_finished, 20)  # the expiry task releases what no capture took
    finished = await rows(
        url,
        "SELECT h.id, h.status, h.expires_at, e.created_at AS captured_at FROM holds h "
        "LEFT JOIN hold_events e ON e.hold_id = h.id AND e.kind = 'captured' "
        "WHERE h.id = ANY($1)",
        ids,
    )
    assert len(finished) == count  # at most one capture event per hold
    for row in finished:
        if row["id"] in won:
            assert row["status"] == "captured"
            assert row["captured_at"] < row["expires_at"]
        else:
            assert (row["status"], row["captured_at"]) == ("expired", None)
    kinds = await hold_events(url, ids)
    assert all(
        events in (["created", "captured"], ["created", "expired"]) for events in kinds.values()
    ), kinds
    spent = Counter(payers[i % 3] for i, (hold, _) in enumerate(holds) if hold in won)
    assert await accounts(url, payers) == {u: (10_000 - 10 * spent[u], 0) for u in payers}
    verify_ledger(url)


# --- the mix and the crash ----------------------------------------------------------------------


@dataclass
class Ledger:
    """What the acknowledged answers say the world is: balances, held amounts, each hold's
    state and captured amount, and the journal entries and transfers they name."""

    balance: dict[int, int]
    held: dict[int, int]
    holds: dict[int, tuple[int, int | None, int]] = field(default_factory=dict)
    state: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    entries: set[int] = field(default_factory=set)
    transfers: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Op:
    kind: str  # hold, capture, release, withdraw, deposit, transfer, read
    user: int  # the payer, or the user read
    call: Call
    to: int | None = None
    amount: int = 0
    hold: int = 0


def non_negative(body: dict[str, Any]) -> None:
    """No answer ever shows a negative balance or available amount, or more held than there
    is (a figure a bound key may not see is null)."""
    for name in ("balance", "available", "held", "fromBalance", "toBalance"):
        if body.get(name) is not None:
            assert body[name] >= 0, body
    if "balance" in body and "held" in body:
        assert body["held"] <= body["balance"], body


def apply(ledger: Ledger, op: Op, result: Result) -> None:
    """Checks one answer and adds what it acknowledged to ``ledger``."""
    assert result.error is None, (op, result.error)
    body = result.json()
    if result.status >= 400:
        if op.kind in ("capture", "release"):
            # Only a capture and a release of one hold race each other here.
            assert refused_as(result, 409, "hold_not_active"), (op, result.body)
        else:
            assert refused_as(result, 409, "insufficient_funds"), (op, result.body)
            assert op.kind != "deposit", "a deposit is never refused for funds"
        return
    non_negative(body)
    if op.kind == "hold":
        assert result.status == 201, result.body
        hold = int(body["holdId"])
        ledger.holds[hold] = (op.user, op.to, op.amount)
        ledger.state[hold] = ("active", None)
        ledger.held[op.user] += op.amount
    elif op.kind == "capture":
        assert result.status == 200, result.body
        payer, to, amount = ledger.holds[op.hold]
        taken = op.amount or amount
        ledger.state[op.hold] = ("captured", taken)
        ledger.held[payer] -= amount
        ledger.balance[payer] -= taken
        if to is not None:
            ledger.balance[to] += taken
    elif op.kind == "release":
        assert result.status == 200, result.body
        assert body["status"] == "released", result.body
        payer, _, amount = ledger.holds[op.hold]
        ledger.state[op.hold] = ("released", None)
        ledger.held[payer] -= amount
    elif op.kind in ("withdraw", "deposit"):
        assert result.status == 200, result.body
        ledger.balance[op.user] += op.amount
        ledger.entries.add(int(body["entryId"]))
    elif op.kind == "transfer":
        assert result.status == 201, result.body
        assert op.to is not None
        ledger.balance[op.user] -= op.amount
        ledger.balance[op.to] += op.amount
        ledger.transfers.add(int(body["transferId"]))


async def check(url: str, ledger: Ledger) -> None:
    """The database holds exactly what was acknowledged: every balance and held amount, every
    hold in its state (and no other hold of these users), every entry and transfer named."""
    users = sorted(ledger.balance)
    assert await accounts(url, users) == {u: (ledger.balance[u], ledger.held[u]) for u in users}
    holds = await rows(
        url, "SELECT id, status, captured_amount FROM holds WHERE user_id = ANY($1)", users
    )
    assert {r["id"]: (r["status"], r["captured_amount"]) for r in holds} == ledger.state
    found = await rows(
        url,
        "SELECT id, kind, transfer_id, hold_id FROM ledger_entries WHERE user_id = ANY($1)",
        users,
    )
    changes = {
        r["id"] for r in found if r["kind"] in ("deposit", "withdrawal") and not r["hold_id"]
    }
    assert changes == ledger.entries
    moved = {r["transfer_id"] for r in found if r["kind"] == "transfer" and not r["hold_id"]}
    assert moved == ledger.transfers
    captures = Counter(r["hold_id"] for r in found if r["hold_id"])
    assert captures == {
        hold: 2 if ledger.holds[hold][1] is not None else 1
        for hold, (status, _) in ledger.state.items()
        if status == "captured"
    }


def twice_if_keyed(ops: list[Op]) -> list[Op]:
    """Each op with an idempotency key sent a second time at once, to the next instance (a
    client's retry racing its first try): both must answer one outcome, applied once."""
    doubled = []
    for op in ops:
        doubled.append(op)
        if op.call.idempotency_key is not None:
            again = Call(
                op.call.instance + 1,
                op.call.method,
                op.call.path,
                op.call.body,
                op.call.key,
                op.call.idempotency_key,
            )
            doubled.append(Op(op.kind, op.user, again, op.to, op.amount))
    return doubled


def spending(rng: random.Random, users: list[int], keys: dict[int, str], instance: int) -> Op:
    """A random withdrawal, deposit, transfer, new hold or read, by the user's bound key now
    and then."""

    def key(user: int) -> str:
        return keys[user] if user in keys and rng.random() < 0.7 else API_KEY

    user = rng.choice(users)
    roll = rng.random()
    if roll < 0.35:
        amount = rng.randrange(1, 80)
        to = rng.choice([u for u in users if u != user]) if rng.random() < 0.5 else None
        body = {"userId": user, "amount": amount, **({"toUserId": to} if to else {})}
        return Op("hold", user, Call(instance, "POST", "/holds", body, key(user)), to, amount)
    if roll < 0.55:
        amount = -rng.randrange(1, 60)
        body = {"userId": user, "amount": amount}
        idempotency_key = f"mix-{user}-{instance}-{rng.random()}" if rng.random() < 0.4 else None
        return Op(
            "withdraw",
            user,
            Call(instance, "POST", "/balance/update", body, key(user), idempotency_key),
            None,
            amount,
        )
    if roll < 0.65:
        # Creating money needs wallet:mint, which the bound keys lack.
        amount = rng.randrange(1, 40)
        body = {"userId": user, "amount": amount}
        return Op("deposit", user, Call(instance, "POST", "/balance/update", body), None, amount)
    if roll < 0.85:
        to = rng.choice([u for u in users if u != user])
        amount = rng.randrange(1, 80)
        body = {"fromUserId": user, "toUserId": to, "amount": amount}
        return Op(
            "transfer", user, Call(instance, "POST", "/transfers", body, key(user)), to, amount
        )
    return Op("read", user, Call(instance, "GET", f"/balance/{user}", None, key(user)))


async def test_mix_over_instances_survives_a_crash(
    cluster: list[Server], crashable: tuple[ThrowawayPostgres, str]
) -> None:
    """A seeded random mix over three instances, keys bound to single users among the
    callers: holds, withdrawals (some with an idempotency key, sent twice at once to two
    instances: one outcome, applied once), deposits, transfers and reads, then captures (all
    or part), releases and both at once of those holds among more of the same, group commit
    batching what meets on one row. No answer shows a
    negative balance or available amount; the database holds exactly what was acknowledged,
    and still does after an instance is SIGKILLed and PostgreSQL crashed (immediate stop, no
    checkpoint); `tandem ledger verify` finds nothing."""
    postgres, url = crashable
    rng = random.Random(2212)
    starts = [rng.randrange(200, 1000) for _ in range(6)]
    users = await new_users(cluster[0], starts)
    keys = {
        user: await make_key(url, f"holds-mix-{user}", "wallet:read", "wallet:write", users=[user])
        for user in users[:2]
    }
    ledger = Ledger(dict(zip(users, starts, strict=True)), dict.fromkeys(users, 0))

    def sent_in_batches() -> float:
        return sum(batched(s.url) + batched(s.url, "keyed_change") for s in cluster)

    batched_before = sent_in_batches()

    async def run(ops: list[Op]) -> None:
        results = await send_all(cluster, [op.call for op in ops], concurrency=100)
        first: dict[str, Result] = {}  # by idempotency key: what the key's first answer said
        for op, result in zip(ops, results, strict=True):
            key = op.call.idempotency_key
            if key is None or key not in first:
                apply(ledger, op, result)
                if key is not None:
                    first[key] = result
            else:  # the same keyed request, sent twice at once: one outcome, applied once
                assert (result.status, result.json()) == (first[key].status, first[key].json())

    await run(twice_if_keyed([spending(rng, users, keys, i) for i in range(600)]))
    ops = twice_if_keyed([spending(rng, users, keys, i) for i in range(300)])
    for n, (hold, (payer, _, amount)) in enumerate(sorted(ledger.holds.items())):
        key = keys[payer] if payer in keys and rng.random() < 0.7 else API_KEY
        part = rng.randrange(1, amount) if amount > 1 and rng.random() < 0.4 else 0
        capture = Op(
            "capture",
            payer,
            Call(n, "POST", f"/holds/{hold}/capture", {"amount": part} if part else {}, key),
            amount=part,
            hold=hold,
        )
        release = Op(
            "release", payer, Call(n + 1, "POST", f"/holds/{hold}/release", None, key), hold=hold
        )
        roll = rng.random()
        ops += (
            [capture]
            if roll < 0.4
            else [release]
            if roll < 0.65
            else [capture, release]
            if roll < 0.85
            else []
        )
    rng.shuffle(ops)
    await run(ops)
    states = Counter(state for state, _ in ledger.state.values())
    assert min(states["active"], states["captured"], states["released"]) > 0, states
    assert sent_in_batches() > batched_before, "no batch formed"
    await check(url, ledger)

    # An instance without a goodbye, then PostgreSQL without a checkpoint.
    cluster[1].stop(signal.SIGKILL)
    postgres.restart("immediate")
    await check(url, ledger)
    verify_ledger(url)
