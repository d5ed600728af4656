"""The API's bearer tokens: how they are made, checked, rate-limited and audited.

- A token is ``vmr_`` and 43 URL-safe characters (256 random bits), shown once by ``vmrecover token
  new``; the configuration keeps only its SHA-256 (hex) with a name and a role (``[[api.tokens]]``).
  Any string works as a token (``openssl rand -hex 32``, as the example configuration says).
- A request's token is hashed and compared with every configured digest in constant time
  (``hmac.compare_digest``, all of them, no early exit), so neither timing nor the order of the tokens
  tells anything.  The tokens are read from ``service.config`` at each request: a reload (SIGHUP)
  adds and revokes tokens at once.
- **Roles**: ``admin`` may do everything, ``read-only`` only GET/HEAD (anything else is 403).
- **Wrong tokens are rate-limited per client address**: after :data:`MAX_FAILURES` failures within
  :data:`WINDOW` seconds, every request from that address is answered 429 with ``Retry-After`` until the
  oldest failure leaves the window, whatever token it carries (a guesser learns nothing meanwhile).  A
  request without any token is a 401 but not a failure.  Behind a reverse proxy all clients share its
  address.
- **Audit**: every request with a valid token that may change something (not GET/HEAD/OPTIONS) is
  logged on the ``vmrecover.api.audit`` logger as it is answered (INFO; WARNING for a 4xx/5xx, a
  read-only token's 403 included), with the token's name and role, the client, the method, the path
  and the HTTP status.  Wrong tokens and rate-limited requests are logged as warnings on
  ``vmrecover.api``.

- **The local control socket** (``REPO/run/api.sock``, served by api.serve_api): a request that came
  through it carries :data:`LOCAL_SCOPE_KEY` in its ASGI scope, set by the socket's wrapper
  (``api._Local``) and by nothing else: no header or path can put a key in the scope.  It is the
  built-in admin :data:`LOCAL` (named "local" in the audit log, client "local"), without a token and
  outside the rate limit: the socket's mode (0600, in the 0700 ``run/`` folder) is the
  authentication, as with docker.sock.

Errors have the CLI's JSON shape (``{"error", "message", "hint", "exit_code"}``, see errors.py), so a
client can turn them back into the same exceptions (``VmrecoverError.from_json``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from ..errors import ExitCode
from .config import Token

log = logging.getLogger("vmrecover.api")
audit = logging.getLogger("vmrecover.api.audit")

TOKEN_PREFIX = "vmr_"
MAX_FAILURES = 5
WINDOW = 60.0  # seconds
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_SCOPE_KEY = "vmrecover.token"  # the ASGI scope key handlers find the caller's Token under
LOCAL_SCOPE_KEY = "vmrecover.local"  # True in the scope of a request that came through the local socket

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# Whom a request through the local socket acts as (never matched by a presented token: it is not in
# the configuration, and its digest is no SHA-256 of anything found).
LOCAL = Token.model_construct(name="local", role="admin", sha256="")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What the configuration stores of a token: the SHA-256 of its UTF-8 bytes, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def config_block(name: str, role: str, sha256: str) -> str:
    """The ``[[api.tokens]]`` table to paste into the configuration file."""
    return f'[[api.tokens]]\nname = {json.dumps(name)}\nrole = "{role}"\nsha256 = "{sha256}"\n'


def authenticate(header: str | None, tokens: Sequence[Token]) -> Token | None:
    """The configured token an ``Authorization: Bearer ...`` header carries, or None."""
    if header is None:
        return None
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    d = digest(presented.strip()).encode()
    found = None
    for t in tokens:
        if hmac.compare_digest(d, t.sha256.encode()) and found is None:
            found = t
    return found


class FailureLimiter:
    """Failed authentications per client address within a sliding window."""

    def __init__(
        self, *, max_failures: int = MAX_FAILURES, window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000,
    ) -> None:  # fmt: skip
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self.max_clients = max_clients  # addresses remembered at most (the oldest forgotten first)
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float] | None:
        q = self._failures.get(client)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._failures[client]
            return None
        return q

    def retry_after(self, client: str) -> float | None:
        """Seconds until *client* may try again, or None if it may now."""
        now = self.clock()
        q = self._recent(client, now)
        if q is None or len(q) < self.max_failures:
            return None
        return max(0.0, q[-self.max_failures] + self.window - now)

    def failed(self, client: str) -> None:
        now = self.clock()
        q = self._recent(client, now)
        if q is None:
            if len(self._failures) >= self.max_clients:
                del self._failures[next(iter(self._failures))]
            q = self._failures[client] = deque(maxlen=self.max_failures)
        q.append(now)


def error_doc(error: str, message: str, *, hint: str | None = None, exit_code: int = ExitCode.INTERNAL
              ) -> dict[str, Any]:  # fmt: skip
    return {"error": error, "message": message, "hint": hint, "exit_code": exit_code}


async def send_json(send: Send, status: int, doc: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(doc).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


class AuthMiddleware:
    """ASGI middleware: every request but those to *public* paths needs a configured token, or to have
    come through the local socket (see the module's docstring for the rules)."""

    def __init__(
        self, app: ASGIApp, *, tokens: Callable[[], Sequence[Token]], limiter: FailureLimiter,
        public: frozenset[str],
    ) -> None:  # fmt: skip
        self.app = app
        self.tokens = tokens
        self.limiter = limiter
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        local = scope.get(LOCAL_SCOPE_KEY) is True  # only api._Local sets it
        client = "local" if local else str((scope.get("client") or ("unknown", 0))[0])
        token = LOCAL if local else await self._authenticate(scope, send, client)
        if token is None:
            return
        scope[TOKEN_SCOPE_KEY] = token
        if method in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        logged = False

        def log_outcome(status: int) -> None:
            nonlocal logged
            logged = True
            audit.log(
                logging.INFO if status < 400 else logging.WARNING,
                "token=%s role=%s client=%s method=%s path=%s status=%d seconds=%.3f",
                json.dumps(token.name), token.role, client, method, json.dumps(path), status,
                time.monotonic() - started,
            )  # fmt: skip

        if token.role != "admin":
            doc = error_doc(
                "AuthError", f"token {token.name!r} is read-only: {method} {path} needs an admin token",
                hint="use a token with role = \"admin\"", exit_code=ExitCode.AUTH,
            )  # fmt: skip
            log_outcome(403)
            await send_json(send, 403, doc)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                log_outcome(int(message["status"]))  # before the client can see the answer
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not logged:
                log_outcome(500)  # the application failed before it answered

    async def _authenticate(self, scope: Scope, send: Send, client: str) -> Token | None:
        """The token of a request over the network, or None once it is refused (429, 401)."""
        method, path = scope["method"], scope["path"]
        wait = self.limiter.retry_after(client)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            log.warning("refused %s %s from %s: too many failed authentications", method, path, client)
            doc = error_doc(
                "AuthError", f"too many failed authentications from {client}",
                hint=f"try again in {seconds} s with a valid token", exit_code=ExitCode.AUTH,
            )  # fmt: skip
            await send_json(send, 429, doc, [(b"retry-after", str(seconds).encode())])
            return None
        header = _header(scope, b"authorization")
        token = authenticate(header, self.tokens())
        if token is None:
            if header is not None:
                self.limiter.failed(client)
                log.warning("refused %s %s from %s: wrong token", method, path, client)
                message, challenge = "the token is not valid", b'Bearer error="invalid_token"'
            else:
                message, challenge = "this request needs a token", b"Bearer"
            doc = error_doc(
                "AuthError", message, exit_code=ExitCode.AUTH,
                hint="send 'Authorization: Bearer TOKEN'; make a token with 'vmrecover token new NAME'",
            )  # fmt: skip
            await send_json(send, 401, doc, [(b"www-authenticate", challenge)])
        return token
