"""Sending one webhook: the Standard Webhooks signature, the target's checks, one HTTP POST.

Why a sender of its own (asyncio streams and httptools' C parser, both already dependencies)
rather than a general client: a delivery must connect to the very address that was checked
(resolved once here, never again by a library that would resolve the name anew and could be
handed 127.0.0.1 by a DNS answer that changed in between), with the URL's host in ``Host``
and in TLS's SNI and certificate check; it must follow no redirect, read at most a small
part of the answer, and give up after one deadline for connecting and answering together.
Each of these is a line here and a set of options and caveats in a general client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import httptools

SECRET_PREFIX = "whsec_"  # noqa: S105  (the prefix of every secret, none itself)
# The longest URL an endpoint may have.
URL_MAX_LENGTH = 2048
# How much of an answer's body is read (and kept, for the delivery's record).
ANSWER_CAP = 4096
# How much of an error is kept in a delivery's record.
ERROR_CAP = 500


def new_secret() -> str:
    """A signing secret: ``whsec_`` and 32 random bytes in base64 (the HMAC key)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature (Standard Webhooks): HMAC-SHA256 of
    ``{id}.{timestamp}.{body}`` keyed with the secret's decoded bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: list[str], message_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: one signature per live secret, separated by spaces (during a
    rotation's overlap, the new secret's and the old one's)."""
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets_)


class TargetRefusedError(ValueError):
    """A URL or an address a webhook may not be sent to."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL points: scheme, host (as named), port, the request's path."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """An endpoint's URL, checked: http or https, a host, no credentials, no fragment."""
    if len(url) > URL_MAX_LENGTH:
        raise TargetRefusedError(f"the URL is longer than {URL_MAX_LENGTH} characters")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        raise TargetRefusedError("the URL must be ASCII, without spaces or control characters")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise TargetRefusedError(f"the URL is malformed: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefusedError("the URL's scheme must be http or https")
    if not parts.hostname:
        raise TargetRefusedError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefusedError("the URL may not carry credentials (user:password@)")
    if parts.fragment:
        raise TargetRefusedError("the URL may not have a fragment (#...)")
    if port == 0:
        raise TargetRefusedError("the URL's port may not be 0")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = 443 if parts.scheme == "https" else 80
    return Target(parts.scheme, parts.hostname, port or default, path)


def _refused_address(address: str) -> str | None:
    """Why ``address`` is not a public one (None: it is)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private or ip.is_reserved or ip.is_unspecified or ip.is_multicast:
        return "private or reserved"
    if not ip.is_global:
        return "not public"
    return None


async def resolve(target: Target, allow_private: bool) -> str:
    """The one address a delivery connects to: the host's first address, checked (unless
    ``allow_private``) to be public. Raises TargetRefusedError, or OSError when the name
    does not resolve."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    if not found:
        raise OSError(f"{target.host} does not resolve")
    address = str(found[0][4][0])
    if not allow_private:
        why = _refused_address(address)
        if why is not None:
            raise TargetRefusedError(
                f"{target.host} resolves to {address}, a {why} address (deliveries to those "
                "need TANDEM_WEBHOOKS_ALLOW_PRIVATE=true)"
            )
    return address


@dataclass(frozen=True, slots=True)
class Answer:
    """How one attempt ended: a status (0: none, see ``error``), its time, what was read."""

    status: int
    duration_ms: int
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300


class _Reading:
    """httptools' callbacks for one answer: its status, the body up to the cap, completion."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.begun = False
        self.complete = False

    def on_message_begin(self) -> None:
        self.begun = True

    def on_body(self, body: bytes) -> None:
        room = ANSWER_CAP - len(self.body)
        if room > 0:
            self.body += body[:room]

    def on_message_complete(self) -> None:
        self.complete = True


_CONTEXT = ssl.create_default_context()


class _StaleConnectionError(ConnectionError):
    """A kept connection the receiver had closed before this request reached it."""


class Sender:
    """One endpoint's deliveries, one at a time, over a connection kept open between them
    while the receiver keeps it (HTTP/1.1 keep-alive; a new connection per delivery halved
    what one endpoint could take). A new connection resolves the URL's host anew, checks the
    address (unless ``allow_private``) and connects to that address."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._target: Target | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._target = self._reader = self._writer = None

    async def post(
        self, target: Target, headers: dict[str, str], body: bytes, deadline: float
    ) -> Answer:
        """One POST of ``body`` for ``target``, within ``deadline`` seconds for connecting
        and answering together; never raises for a failed attempt (its ``error`` says why)."""
        started = time.perf_counter()
        lines = [f"POST {target.path} HTTP/1.1", f"Host: {target.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        try:
            async with asyncio.timeout(deadline):
                try:
                    status, reading = await self._exchange(target, request)
                except _StaleConnectionError:
                    self.close()
                    status, reading = await self._exchange(target, request)
        except TimeoutError:
            self.close()
            return Answer(0, _since(started), f"no answer within {deadline:g} s")
        except (
            TargetRefusedError,
            OSError,
            ValueError,  # a host name IDNA refuses (an empty or over-long label)
            ssl.SSLError,
            httptools.HttpParserError,
            httptools.HttpParserUpgrade,  # an answer switching protocols: no acknowledgement
        ) as error:
            self.close()
            return Answer(0, _since(started), _describe(error))
        if not 200 <= status < 300:
            text = bytes(reading.body).decode("utf-8", "replace")
            return Answer(status, _since(started), _printable(f"answered {status}: {text}"))
        return Answer(status, _since(started))

    async def _exchange(self, target: Target, request: bytes) -> tuple[int, _Reading]:
        kept = self._target == target and self._writer is not None
        if not kept or self._writer is None or self._writer.is_closing():
            self.close()
            address = await resolve(target, self._allow_private)
            tls = _CONTEXT if target.scheme == "https" else None
            self._reader, self._writer = await asyncio.open_connection(
                address, target.port, ssl=tls, server_hostname=target.host if tls else None
            )
            self._target = target
            kept = False
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(request)
        reading = _Reading()
        parser = httptools.HttpResponseParser(reading)
        # Read until the answer is complete, or its body passed the cap (the rest is not
        # wanted: the connection is not kept), or the peer closed.
        trailing = False
        while not reading.complete and len(reading.body) < ANSWER_CAP:
            try:
                chunk = await self._reader.read(65536)
            except (ConnectionError, ssl.SSLError) as error:
                if kept and not reading.begun:
                    raise _StaleConnectionError("the receiver reset the kept connection") from error
                raise
            if not chunk and not reading.begun and kept:
                raise _StaleConnectionError("the receiver closed the kept connection")
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError:
                # Bytes past a complete answer (a body after a 204, say): the answer stands,
                # the connection is not kept.
                if not reading.complete:
                    raise
                trailing = True
            if not chunk:
                break
        if trailing or not (reading.complete and parser.should_keep_alive()):
            self.close()
        return parser.get_status_code(), reading


def _since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _describe(error: BaseException) -> str:
    return _printable(f"{type(error).__name__}: {error}")


def _printable(text: str) -> str:
    """What a delivery's record keeps of a receiver's words: capped, without the NUL bytes a
    text column refuses (and the other control characters that would garble a listing)."""
    return "".join(c if c.isprintable() or c in " \t" else "?" for c in text[:ERROR_CAP])
