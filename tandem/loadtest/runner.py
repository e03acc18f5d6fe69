"""``tandem loadtest``: fire concurrent withdrawals at one user and check the outcome is exact.

The check is the point, not the speed: with ``initial_balance`` and ``requests`` withdrawals of
``amount``, exactly ``min(requests, initial_balance // amount)`` must succeed, every other one
must be refused with ``insufficient_funds``, and the final balance must be what the successes
add up to. A lost update, a double spend or a dropped request breaks one of those equalities.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tandem.loadtest.client import (
    DEFAULT_TIMEOUT,
    Endpoint,
    OnDone,
    Result,
    fetch,
    parse_base_url,
    run,
    send_burst,
)

REFUSAL_CODE = "insufficient_funds"


class LoadtestError(Exception):
    """The run could not start or finish (no server, no such user, unexpected answer)."""


@dataclass(frozen=True, slots=True)
class LoadtestOptions:
    base_url: str
    requests: int = 10_000
    amount: int = 2
    initial_balance: int = 10_000
    # Requests in flight at once; None sends them all at once.
    concurrency: int | None = None
    # Withdraw from this existing user (its current balance is the initial balance).
    user_id: int | None = None
    progress: bool = True
    request_timeout: float = DEFAULT_TIMEOUT
    # Needs wallet:read, wallet:write, users:write and wallet:mint (it funds a new user).
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class BurstReport:
    """What a withdrawal burst did, and what it should have done."""

    user_id: int
    fresh_user: bool
    requests: int
    amount: int
    initial_balance: int
    ok: int
    refused: int
    # Anything else: another status, another 409 code, or no response at all.
    other: int
    # "200", "409", ... or an error type ("ConnectionResetError"), with counts.
    outcomes: dict[str, int]
    error_samples: tuple[str, ...]
    # Successful answers that reported a balance another successful answer also reported:
    # two withdrawals that both saw the same row version (a lost update).
    duplicate_balances: int
    wall_time: float
    latencies: tuple[float, ...]  # sorted, seconds
    final_balance: int

    @property
    def expected_ok(self) -> int:
        return min(self.requests, self.initial_balance // self.amount)

    @property
    def expected_refused(self) -> int:
        return self.requests - self.expected_ok

    @property
    def expected_final_balance(self) -> int:
        return self.initial_balance - self.expected_ok * self.amount

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.wall_time if self.wall_time > 0 else 0.0

    def latency_quantile(self, q: float) -> float:
        """Nearest-rank quantile of all requests' latencies (failures included), in seconds."""
        if not self.latencies:
            return 0.0
        rank = min(len(self.latencies), max(1, math.ceil(q * len(self.latencies))))
        return self.latencies[rank - 1]

    def problems(self) -> list[str]:
        """Every way the outcome differs from the exact expected one; empty means correct."""
        found = []
        if self.ok != self.expected_ok:
            found.append(f"{self.ok} withdrawals succeeded, expected {self.expected_ok}")
        if self.refused != self.expected_refused:
            found.append(
                f"{self.refused} were refused ({REFUSAL_CODE}), expected {self.expected_refused}"
            )
        if self.other:
            found.append(f"{self.other} requests had another outcome")
        if self.final_balance != self.expected_final_balance:
            found.append(
                f"final balance {self.final_balance}, expected {self.expected_final_balance}"
            )
        if self.duplicate_balances:
            found.append(
                f"{self.duplicate_balances} successful answers repeated a balance (lost update)"
            )
        return found

    @property
    def passed(self) -> bool:
        return not self.problems()


async def _call(
    endpoint: Endpoint, method: str, path: str, body: object, request_timeout: float
) -> Result:
    request = endpoint.request(method, path, body)
    result = await fetch(endpoint.host, endpoint.port, request, request_timeout)
    if result.error is not None:
        raise LoadtestError(f"{method} {path}: {result.describe()}: {result.error}")
    return result


async def _create_user(endpoint: Endpoint, balance: int, request_timeout: float) -> tuple[int, int]:
    result = await _call(endpoint, "POST", "/users", {"balance": balance}, request_timeout)
    if result.status != 201:
        raise LoadtestError(f"POST /users answered {result.status}: {result.body[:200]!r}")
    data = result.json()
    return int(data["userId"]), int(data["balance"])


async def read_balance(
    endpoint: Endpoint, user_id: int, request_timeout: float = DEFAULT_TIMEOUT
) -> int:
    """Raises LoadtestError unless the server answers 200 with the balance."""
    result = await _call(endpoint, "GET", f"/balance/{user_id}", None, request_timeout)
    if result.status != 200:
        raise LoadtestError(f"GET /balance/{user_id} answered {result.status}: {result.body!r}")
    return int(result.json()["balance"])


def _is_refusal(result: Result) -> bool:
    try:
        code = result.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(code == REFUSAL_CODE)


async def withdraw_burst(
    base_url: str,
    *,
    requests: int = 10_000,
    amount: int = 2,
    initial_balance: int = 10_000,
    user_id: int | None = None,
    concurrency: int | None = None,
    request_timeout: float = DEFAULT_TIMEOUT,
    on_done: OnDone | None = None,
    api_key: str | None = None,
) -> BurstReport:
    """Create a user with ``initial_balance`` (or read ``user_id``'s balance), send ``requests``
    withdrawals of ``amount`` at once, then read the final balance.

    The wall time covers the burst only: from the first connect to the last response.
    Raises ValueError for impossible options and LoadtestError when the server cannot be used
    to set up or read back; a wrong outcome is reported, not raised (see ``problems``).
    """
    if requests < 0 or amount <= 0 or initial_balance < 0:
        raise ValueError("requests >= 0, amount > 0 and initial_balance >= 0, please")
    endpoint = parse_base_url(base_url, api_key)
    fresh_user = user_id is None
    if user_id is None:
        user_id, initial_balance = await _create_user(endpoint, initial_balance, request_timeout)
    else:
        initial_balance = await read_balance(endpoint, user_id, request_timeout)

    request = endpoint.request("POST", "/balance/update", {"userId": user_id, "amount": -amount})
    started = time.perf_counter()
    results = await send_burst(
        endpoint.host, endpoint.port, [request] * requests, concurrency, request_timeout, on_done
    )
    wall_time = time.perf_counter() - started
    final_balance = await read_balance(endpoint, user_id, request_timeout)

    ok = refused = 0
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    balances: Counter[int] = Counter()
    for result in results:
        outcomes[result.describe()] += 1
        if result.status == 200:
            ok += 1
            balances[int(result.json()["balance"])] += 1
        elif result.status == 409 and _is_refusal(result):
            refused += 1
        elif len(errors) < 5:
            errors.append(
                f"{result.describe()}: {result.error}"
                if result.error is not None
                else f"{result.status}: {result.body[:200]!r}"
            )
    return BurstReport(
        user_id=user_id,
        fresh_user=fresh_user,
        requests=requests,
        amount=amount,
        initial_balance=initial_balance,
        ok=ok,
        refused=refused,
        other=requests - ok - refused,
        outcomes=dict(sorted(outcomes.items())),
        error_samples=tuple(errors),
        # Another client may move a shared user's balance back and forth, so only a fresh
        # user's answers must all differ.
        duplicate_balances=sum(n - 1 for n in balances.values()) if fresh_user else 0,
        wall_time=wall_time,
        latencies=tuple(sorted(result.latency for result in results)),
        final_balance=final_balance,
    )


@contextmanager
def _progress(console: Console, enabled: bool, total: int) -> Iterator[OnDone | None]:
    if not enabled or total == 0:
        yield None
        return
    columns = (
        TextColumn("withdrawals"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("withdrawals", total=total)
        yield lambda _: progress.advance(task)


def print_report(console: Console, report: BurstReport) -> None:
    outcome = Table(title=f"Withdrawal burst: user {report.user_id}, {report.amount} each")
    outcome.add_column("")
    outcome.add_column("got", justify="right")
    outcome.add_column("expected", justify="right")
    outcome.add_row("initial balance", str(report.initial_balance), "")
    outcome.add_row("ok (200)", str(report.ok), str(report.expected_ok))
    outcome.add_row(
        f"refused (409 {REFUSAL_CODE})", str(report.refused), str(report.expected_refused)
    )
    outcome.add_row("other", str(report.other), "0")
    outcome.add_row("final balance", str(report.final_balance), str(report.expected_final_balance))
    console.print(outcome)

    statuses = Table(title="Outcomes")
    statuses.add_column("status")
    statuses.add_column("count", justify="right")
    for label, count in report.outcomes.items():
        statuses.add_row(label, str(count))
    console.print(statuses)

    timing = Table(title="Timing")
    timing.add_column("")
    timing.add_column("value", justify="right")
    timing.add_row("requests", str(report.requests))
    timing.add_row("wall time", f"{report.wall_time:.3f} s")
    timing.add_row("requests/s", f"{report.requests_per_second:,.0f}")
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        timing.add_row(f"latency {label}", f"{report.latency_quantile(q) * 1000:.1f} ms")
    console.print(timing)

    for sample in report.error_samples:
        console.print(f"  e.g. {sample}", style="yellow")
    problems = report.problems()
    if problems:
        for problem in problems:
            console.print(f"FAIL: {problem}", style="bold red")
    else:
        console.print("PASS: the outcome is exactly the expected one", style="bold green")


def run_loadtest(options: LoadtestOptions) -> int:
    """Run the burst, print the report; 0 when the outcome is exact, 1 otherwise."""
    console = Console()
    try:
        with _progress(console, options.progress, options.requests) as on_done:
            report = run(
                withdraw_burst(
                    options.base_url,
                    requests=options.requests,
                    amount=options.amount,
                    initial_balance=options.initial_balance,
                    user_id=options.user_id,
                    concurrency=options.concurrency,
                    request_timeout=options.request_timeout,
                    on_done=on_done,
                    api_key=options.api_key,
                )
            )
    except (ValueError, LoadtestError) as error:
        console.print(f"FAIL: {error}", style="bold red")
        return 1
    print_report(console, report)
    return 0 if report.passed else 1
