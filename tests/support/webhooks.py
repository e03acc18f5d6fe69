"""A webhook receiver of the tests' own: a real HTTP server (asyncio streams) that records
each delivery (headers and body) and answers as told: 2xx, a status, or nothing at all (it
hangs past the sender's deadline). Run in process (``Receiver``) or as a process of its own
(``python -m tests.support.webhooks``, for the fault tests), which appends each delivery to
a JSON-lines file."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How a receiver answers the next delivery: a status, or None (hang until the sender gives up).
Answer = Callable[[dict[str, Any]], int | None]


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    # What the receiver answered, and when the delivery had arrived (Unix time).
    status: int = 204
    at: float = field(default_factory=time.time)

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def verified(delivery: Delivery, secret: str, tolerance: float | None = None) -> bool:
    """Whether one of the delivery's signatures is the secret's, checked as a receiver would
    (plain hmac, per the Standard Webhooks specification), its id the body's event id."""
    message_id = delivery.headers["webhook-id"]
    timestamp = delivery.headers["webhook-timestamp"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(
            key, f"{message_id}.{timestamp}.".encode() + delivery.body, hashlib.sha256
        ).digest()
    ).decode()
    given = [s.partition(",")[2] for s in delivery.headers["webhook-signature"].split()]
    return message_id == delivery.event["id"] and any(
        hmac.compare_digest(expected, signature) for signature in given
    )


@dataclass
class Receiver:
    """Records deliveries; ``answer`` decides each answer (default: 204)."""

    answer: Answer = field(default=lambda event: 204)
    deliveries: list[Delivery] = field(default_factory=list)
    record: Path | None = None
    port: int = 0
    _server: asyncio.Server | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self, port: int = 0) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def acknowledged(self) -> list[dict[str, Any]]:
        """The events it answered 2xx, in arrival order."""
        return [d.event for d in self.deliveries if 200 <= d.status < 300]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests one after another on the connection (kept open, as HTTP/1.1's default)."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self.answer(json.loads(body))
                if status is None:
                    await asyncio.sleep(3600)
                    return
                delivery = Delivery(headers, body, status)
                self.deliveries.append(delivery)
                if self.record is not None:
                    line = {"headers": headers, "body": body.decode(), "status": status}
                    with self.record.open("a") as out:
                        out.write(json.dumps(line) + "\n")
                self.arrived.set()
                text = b"" if status == 204 else b"ok" if status < 300 else b"no"
                length = "" if status == 204 else f"Content-Length: {len(text)}\r\n"
                writer.write(f"HTTP/1.1 {status} X\r\n{length}\r\n".encode() + text)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def recorded(path: Path) -> list[Delivery]:
    """What a receiver process recorded (every delivery it answered), in arrival order."""
    if not path.exists():
        return []
    return [
        Delivery(r["headers"], r["body"].encode(), r["status"])
        for r in (json.loads(line) for line in path.read_text().splitlines() if line)
    ]


def main() -> None:
    """A receiver process: acknowledges each delivery, except that it answers 500 to a share
    of them (``--fail``) and hangs on another share (``--hang``), at random."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--fail", type=float, default=0.0)
    parser.add_argument("--hang", type=float, default=0.0)
    args = parser.parse_args()

    def answer(event: dict[str, Any]) -> int | None:
        draw = random.random()
        if draw < args.hang:
            return None
        return 500 if draw < args.hang + args.fail else 200

    async def serve() -> None:
        await Receiver(answer, record=args.record).start(args.port)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
