"""The HTTP floor: a server on Tandem's own stack (uvicorn, uvloop, httptools, the same
backlog and keep-alive, no access log) whose app does no work at all: it reads the request
and answers a constant, as the wallet would answer it. What HTTP and the event loop cost
without Python doing anything; bench/wallet.py runs the same burst against it.

    python bench/http_floor.py --port 8123
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from tandem.core.settings import Settings

_HEADERS = [(b"content-type", b"application/json")]
_BODIES = {
    "/users": (201, b'{"userId":1,"balance":10000}'),
    "/balance/update": (200, b'{"userId":1,"balance":0,"entryId":1}'),
}
_READ = (200, b'{"userId":1,"balance":0}')


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def, type-arg]
    if scope["type"] != "http":
        return
    while True:  # the body, as the wallet reads it
        message = await receive()
        if not message.get("more_body", False):
            break
    status, body = _BODIES.get(scope["path"], _READ)
    headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        backlog=settings.backlog,
        access_log=False,
        log_level="warning",
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
