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

- **The web console's sign-ins** (service/console.py): a token, or a local user's password
  (``[[api.users]]``, hashed with scrypt: :func:`hash_password`), buys a session cookie
  (:data:`COOKIE`: ``__Host-`` prefixed, Secure, HttpOnly, SameSite=Strict, 256 random bits; the
  service keeps only its SHA-256, in memory: a restart signs everyone out).  A request with the cookie
  and no ``Authorization`` header acts as the configured token or user it was bought with, looked up
  again at each request, so a reload that revokes the token or changes the password ends the session.
  A session ends after ``api.console_idle`` unused or ``api.console_lifetime`` in all.  **CSRF**: a
  cookie request that may change something must carry the session's CSRF token in
  :data:`CSRF_HEADER` (which no cross-site form can set, and which a cross-site script cannot read),
  and, when the browser says where it comes from (``Origin``, ``Sec-Fetch-Site``), come from this
  origin; else 403.  A bearer request needs none of it: nothing ambient authenticates it.
  Wrong passwords count as wrong tokens in the rate limit.

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

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any, Literal

from ..errors import ExitCode
from .config import Api, Token, User

log = logging.getLogger("vmrecover.api")
audit = logging.getLogger("vmrecover.api.audit")

TOKEN_PREFIX = "vmr_"
MAX_FAILURES = 5
WINDOW = 60.0  # seconds
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_SCOPE_KEY = "vmrecover.token"  # the ASGI scope key handlers find the caller's Token under
WEB_SCOPE_KEY = "vmrecover.web"  # ... and the console session (WebSession) a cookie request came with
COOKIE = "__Host-vmrecover"  # the console's session cookie (__Host-: Secure, Path=/, no Domain)
CSRF_HEADER = b"x-csrf-token"
ANY_ROLE = frozenset({"/api/v1/console/logout"})  # mutations a read-only caller may make (its own sign-out)
# scrypt's cost: 64 MiB and about 0.4 s a hash here (one of OWASP's minimum settings, as strong as 2^17, 8, 1)
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 16, 8, 2
_SCRYPT = re.compile(r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")
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


def user_block(name: str, role: str, password_hash: str) -> str:
    """The ``[[api.users]]`` table to paste into the configuration file."""
    return f'[[api.users]]\nname = {json.dumps(name)}\nrole = "{role}"\npassword_hash = "{password_hash}"\n'


# ------------------------------------------------------------------------------------- passwords
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    memory = 128 * r * n * p + 128 * r * n + (1 << 20)
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=memory)


def hash_password(password: str) -> str:
    """``$scrypt$ln=15,r=8,p=1$SALT$HASH`` (base64 without padding): scrypt is memory-hard, so a
    guesser's hardware pays 32 MiB per try.  CPU-bound for about 0.1 s: call it in a worker thread."""
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
    return f"$scrypt$ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(key)}"


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


# A hash no password matches, checked for unknown user names so that they cost as much as known ones.
_DECOY = f"$scrypt$ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(bytes(16))}${_b64(bytes(32))}"


def check_password(password: str, password_hash: str) -> bool:
    m = _SCRYPT.match(password_hash)
    if m is None:
        return False
    log_n, r, p = (int(x) for x in m.group(1, 2, 3))
    if not (10 <= log_n <= 20 and 1 <= r <= 16 and 1 <= p <= 4):  # (a configured hash can't cost a GiB)
        return False
    return hmac.compare_digest(_scrypt(password, _unb64(m.group(4)), log_n, r, p), _unb64(m.group(5)))


def sign_in_user(name: str, password: str, users: Sequence[User]) -> User | None:
    """The configured user *name* if *password* is theirs (blocking: scrypt, also for unknown names)."""
    user = next((u for u in users if hmac.compare_digest(u.name.encode(), name.encode())), None)
    ok = check_password(password, user.password_hash if user is not None else _DECOY)
    return user if ok and user is not None else None


# ------------------------------------------------------------------------------------- console sessions
@dataclass
class WebSession:
    """A console sign-in: whom it acts as (a token by its digest, or a user by name and password
    hash, both as configured when it began) and its CSRF token."""

    kind: Literal["token", "user"]
    name: str
    credential: str  # the token's sha256, or the user's password_hash, at sign-in
    csrf: str
    created: float
    seen: float


class WebSessions:
    """The console's sessions, in memory, by the SHA-256 of their cookie (at most *max_sessions*: the
    least recently used goes first)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_sessions: int = 10_000) -> None:
        self.clock = clock
        self.max_sessions = max_sessions
        self._by_digest: OrderedDict[str, WebSession] = OrderedDict()

    def new(self, kind: Literal["token", "user"], name: str, credential: str) -> tuple[str, WebSession]:
        """A new session: (the cookie's value, the session)."""
        cookie = secrets.token_urlsafe(32)
        now = self.clock()
        web = WebSession(kind, name, credential, secrets.token_urlsafe(32), now, now)
        while len(self._by_digest) >= self.max_sessions:
            self._by_digest.popitem(last=False)
        self._by_digest[digest(cookie)] = web
        return cookie, web

    def get(self, cookie: str, *, idle: float, lifetime: float) -> WebSession | None:
        key = digest(cookie)
        web = self._by_digest.get(key)
        if web is None:
            return None
        now = self.clock()
        if now - web.seen > idle or now - web.created > lifetime:
            del self._by_digest[key]
            return None
        web.seen = now
        self._by_digest.move_to_end(key)
        return web

    def end(self, cookie: str) -> None:
        self._by_digest.pop(digest(cookie), None)

    def __len__(self) -> int:
        return len(self._by_digest)


def principal(web: WebSession, tokens: Sequence[Token], users: Sequence[User]) -> Token | None:
    """Whom *web* acts as under the configuration now: its token or user, or None if revoked."""
    if web.kind == "token":
        return authenticate_digest(web.credential, tokens)
    for u in users:
        if u.name == web.name and hmac.compare_digest(u.password_hash.encode(), web.credential.encode()):
            return Token.model_construct(name=f"user:{u.name}", role=u.role, sha256="")
    return None


def cookie_value(scope: Scope) -> str | None:
    raw = _header(scope, b"cookie")
    if raw is None:
        return None
    try:
        jar: SimpleCookie = SimpleCookie(raw)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def same_origin(scope: Scope) -> bool:
    """Whether the browser's own word (``Origin``, ``Sec-Fetch-Site``), where given, is this origin."""
    site = _header(scope, b"sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    host = _header(scope, b"host")
    plain = f"http://{host}" if scope.get("scheme") == "http" else None  # (the local socket's plain HTTP)
    return host is not None and origin in (f"https://{host}", plain)


def authenticate(header: str | None, tokens: Sequence[Token]) -> Token | None:
    """The configured token an ``Authorization: Bearer ...`` header carries, or None."""
    if header is None:
        return None
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    return authenticate_digest(digest(presented.strip()), tokens)


def authenticate_digest(sha256: str, tokens: Sequence[Token]) -> Token | None:
    """The configured token whose digest is *sha256* (compared with all, in constant time), or None."""
    d = sha256.encode()
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


class OnResponseStart:
    """ASGI middleware that calls :meth:`started` with each HTTP answer's start message as it goes out
    (to count it, or to add headers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def started(self, scope: Scope, message: Message) -> None:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.started(scope, message)
            await send(message)

        await self.app(scope, receive, watch)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


class AuthMiddleware:
    """ASGI middleware: every request but those to *public* paths needs a configured token, or to have
    come through the local socket (see the module's docstring for the rules)."""

    def __init__(
        self, app: ASGIApp, *, api: Callable[[], Api], limiter: FailureLimiter, public: frozenset[str],
        sessions: WebSessions,
    ) -> None:  # fmt: skip
        self.app = app
        self.api = api  # the configuration's [api] now (a reload replaces it)
        self.limiter = limiter
        self.public = public
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        local = scope.get(LOCAL_SCOPE_KEY) is True  # only api._Local sets it
        client = "local" if local else str((scope.get("client") or ("unknown", 0))[0])
        if local:
            token: Token | None = LOCAL
        elif _header(scope, b"authorization") is None and (cookie := cookie_value(scope)) is not None:
            token = await self._session(scope, send, cookie)
        else:
            token = await self._authenticate(scope, send, client)
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

        if token.role != "admin" and path not in ANY_ROLE:
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

    async def _session(self, scope: Scope, send: Send, cookie: str) -> Token | None:
        """Whom a console request acts as (its session's token or user), or None once refused: 401
        for a session that ended or was revoked, 403 for a mutation without its CSRF token or from
        another origin."""
        api = self.api()
        web = self.sessions.get(cookie, idle=api.console_idle, lifetime=api.console_lifetime)
        token = None if web is None else principal(web, api.tokens, api.users)
        if web is None or token is None:
            doc = error_doc("AuthError", "you are not signed in (or your sign-in has ended)",
                            hint="sign in again", exit_code=ExitCode.AUTH)  # fmt: skip
            await send_json(send, 401, doc)
            return None
        scope[WEB_SCOPE_KEY] = web
        if scope["method"] in SAFE_METHODS:
            return token
        presented = _header(scope, CSRF_HEADER) or ""
        if not hmac.compare_digest(presented.encode(), web.csrf.encode()) or not same_origin(scope):
            log.warning("refused %s %s of %s: no CSRF token, a wrong one, or another origin",
                        scope["method"], scope["path"], token.name)  # fmt: skip
            doc = error_doc(
                "AuthError", "this request does not prove it comes from the console (CSRF)",
                hint=f"send the session's CSRF token in {CSRF_HEADER.decode()}, from the console's origin",
                exit_code=ExitCode.AUTH,
            )  # fmt: skip
            await send_json(send, 403, doc)
            return None
        return token

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
        token = authenticate(header, self.api().tokens)
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
