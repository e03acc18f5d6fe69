"""The owner's daily mint ceiling, enforced inside the money functions: deposits and opening
balances stop at it (409 mint_ceiling_reached, nothing changes); withdrawals and transfers,
which create no money, never do."""

from __future__ import annotations

from tests.support import app_settings, fetch, in_process_client


async def test_minting_stops_at_the_daily_ceiling(own_database_url: str) -> None:
    """With a ceiling of 100 a day: 60 and then 40 are created, one more unit is refused, the
    refusal replays as such, and moving money still works."""
    await fetch(own_database_url, "UPDATE wallet_settings SET daily_mint_ceiling = 100")
    async with in_process_client(app_settings(own_database_url)) as client:
        made = await client.post("/users", json={"balance": 60})
        assert made.status_code == 201, made.text
        user = made.json()["userId"]
        assert (await client.post("/users", json={"balance": 41})).status_code == 409
        deposit = await client.post("/balance/update", json={"userId": user, "amount": 40})
        assert deposit.status_code == 200, deposit.text
        keyed = {"Idempotency-Key": "past-the-ceiling"}
        for _ in range(2):  # the second is the replay of the stored refusal
            refused = await client.post(
                "/balance/update", json={"userId": user, "amount": 1}, headers=keyed
            )
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "mint_ceiling_reached"
        created = await client.post("/users", json={"balance": 1})
        assert created.json()["error"]["code"] == "mint_ceiling_reached"
        assert (await client.post("/users", json={"balance": 0})).status_code == 201
        withdrawal = await client.post("/balance/update", json={"userId": user, "amount": -30})
        assert withdrawal.status_code == 200, withdrawal.text
        moved = await client.post(
            "/transfers", json={"fromUserId": user, "toUserId": 1, "amount": 10}
        )
        assert moved.status_code == 201, moved.text
        assert (await client.get(f"/balance/{user}")).json()["balance"] == 60
    rows = await fetch(
        own_database_url,
        "SELECT sum(minted) AS minted FROM mint_usage",
    )
    assert rows[0]["minted"] == 100


async def test_a_bare_user_insert_creates_no_money(own_database_url: str) -> None:
    """Even the owner's INSERT without a balance makes a user holding 0 (the column's
    default), never money without its journal entry."""
    rows = await fetch(own_database_url, "INSERT INTO users DEFAULT VALUES RETURNING balance")
    assert rows[0]["balance"] == 0
