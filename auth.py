"""JWT authentication: settings from the environment, token minting and checking,
an ASGI middleware that guards HTTP and WebSocket routes, and a CLI that mints tokens."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import jwt
from dotenv import load_dotenv
from starlette import status
from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

JWT_SECRET_SETTING = "jwt_secret"  # where the generated secret is kept in the database
# One shared secret both signs and verifies, so only the HMAC family makes sense.
ALLOWED_ALGORITHMS = ("HS256", "HS384", "HS512")


def _positive_hours(value: str | float, name: str) -> float:
    try:
        hours = float(value)
    except (TypeError, ValueError):
        hours = float("nan")
    if not 0 < hours < float("inf"):
        raise ValueError(f"{name} must be a positive number of hours, got {value!r}")
    return hours


class TokenError(Exception):
    """A token was missing or refused; `detail` is meant for a person and never holds the token."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class User:
    sub: str
    expires_at: float  # unix seconds, from the token's `exp`


@dataclass(frozen=True)
class JWTSettings:
    secret: str
    algorithm: str = "HS256"
    expires_in_hours: float = 12
    audience: str | None = None
    issuer: str | None = None
    secret_is_generated: bool = False
    leeway_seconds: float = 10

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("JWT secret must not be empty")
        if self.algorithm.lower() == "none":
            raise ValueError("JWT_ALGORITHM=none would accept unsigned tokens; use HS256")
        if self.algorithm not in ALLOWED_ALGORITHMS:
            allowed = ", ".join(ALLOWED_ALGORITHMS)
            raise ValueError(f"JWT_ALGORITHM={self.algorithm!r} is not supported; use one of {allowed}")
        _positive_hours(self.expires_in_hours, "JWT_EXPIRES_IN_HOURS")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, generated_secret: str | None = None) -> JWTSettings:
        """The settings the environment gives; `generated_secret` stands in for an unset JWT_SECRET_KEY."""
        secret = environ.get("JWT_SECRET_KEY") or ""
        return cls(
            secret=secret or generated_secret or "",
            secret_is_generated=not secret,
            algorithm=environ.get("JWT_ALGORITHM") or "HS256",
            expires_in_hours=_positive_hours(environ.get("JWT_EXPIRES_IN_HOURS") or "12", "JWT_EXPIRES_IN_HOURS"),
            audience=environ.get("JWT_AUDIENCE") or None,
            issuer=environ.get("JWT_ISSUER") or None,
        )

    def mint(self, sub: str, hours: float | None = None) -> str:
        if not isinstance(sub, str) or not sub:
            raise ValueError("sub must be a non-empty string")
        lifetime = _positive_hours(self.expires_in_hours if hours is None else hours, "hours")
        now = int(time.time())
        claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + round(lifetime * 3600)}
        if self.audience is not None:
            claims["aud"] = self.audience
        if self.issuer is not None:
            claims["iss"] = self.issuer
        return jwt.encode(claims, self.secret, algorithm=self.algorithm)

    def verify(self, token: str) -> User:
        try:
            # With no audience configured, aud is "not checked" (contract), not "must be absent".
            options: jwt.types.Options = {"require": ["sub", "exp"], "verify_aud": self.audience is not None}
            claims = jwt.decode(token, self.secret, algorithms=[self.algorithm], options=options,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway_seconds)
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token not yet valid") from None
        except jwt.PyJWTError:
            raise TokenError("invalid token") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or not sub.isprintable() or not _encodable(sub):
            raise TokenError("invalid token")
        return User(sub=sub, expires_at=float(claims["exp"]))


def generate_secret() -> str:
    return secrets.token_urlsafe(64)  # long enough for HS512 too, so pyjwt never warns about the key length


def _encodable(text: str) -> bool:
    """False for a lone surrogate ("\ud800" is valid JSON): no UTF-8 response or frame could carry it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _subprotocol_token(headers: Headers) -> str | None:
    offered = [item.strip() for item in ",".join(headers.getlist("sec-websocket-protocol")).split(",")]
    is_bearer_pair = len(offered) == 2 and offered[0].lower() == "bearer"
    return (offered[1] or None) if is_bearer_pair else None


def _pop_query_token(scope: Scope) -> str | None:
    """The `token` query parameter, taken out of the scope whether or not it is used: uvicorn's access
    log prints the query string of this very scope once the response is sent."""
    if b"token" not in scope["query_string"]:
        return None
    token = QueryParams(scope["query_string"]).get("token") or None
    pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1")
    return token


class JWTAuthMiddleware:
    """Every HTTP request and WebSocket handshake needs a valid token, except `public_routes`: (method, path)
    pairs, where a path `/folder/*` stands for every file right in that folder.

    With `settings=None` the settings are the app's `state.jwt`, set at start-up (the generated
    secret is read from the database then)."""

    def __init__(
        self, app: ASGIApp, settings: JWTSettings | None = None,
        public_routes: frozenset = frozenset({("GET", "/health")}),
    ) -> None:
        self.app = app
        self.settings = settings
        self.public_routes = public_routes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: it hands the connection on, so nothing of the check (the token, its headers) stays
        # on the stack of a socket that may be open for hours.
        if scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        query_token = _pop_query_token(scope)  # out of the scope (and so of the log) in every case
        if self._is_public(scope):
            return self.app(scope, receive, send)
        headers = Headers(scope=scope)
        token = _bearer_token(headers)
        if scope["type"] == "websocket" and token is None:
            token = _subprotocol_token(headers)
            if token is not None:
                scope["auth_subprotocol"] = "bearer"
            else:
                token = query_token  # HTTP clients can always send a header: a token in a URL is refused there
        try:
            if token is None:
                raise TokenError("missing bearer token")
            settings = self.settings or scope["state"]["jwt"]  # the lifespan's, when made at start-up
            scope["user"] = settings.verify(token)
        except TokenError as error:
            return self._deny(scope, receive, send, error.detail, token_given=token is not None)
        return self.app(scope, receive, send)

    def _is_public(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        method, path = "GET" if scope["method"] == "HEAD" else scope["method"], scope["path"]
        return (method, path) in self.public_routes or (method, path.rpartition("/")[0] + "/*") in self.public_routes

    async def _deny(self, scope: Scope, receive: Receive, send: Send, detail: str, token_given: bool) -> None:
        challenge = 'Bearer error="invalid_token"' if token_given else "Bearer"  # RFC 6750 section 3
        response = JSONResponse(
            {"detail": detail}, status_code=status.HTTP_401_UNAUTHORIZED, headers={"WWW-Authenticate": challenge}
        )
        if scope["type"] == "http":
            await response(scope, receive, send)
        elif "websocket.http.response" in (scope.get("extensions") or {}):
            await WebSocket(scope, receive, send).send_denial_response(response)
        else:
            await send({"type": "websocket.close", "code": status.WS_1008_POLICY_VIOLATION})


def demo_tokens_banner(settings: JWTSettings, users=("alice", "bob")) -> str:
    lines = [f"Demo tokens (valid {settings.expires_in_hours:g} h):"]
    lines += [f"  {user}: Authorization: Bearer {settings.mint(user)}" for user in users]
    if settings.secret_is_generated:
        lines += [
            "JWT_SECRET_KEY is not set: these tokens are signed with a secret generated for this database",
            "and kept in it. `python auth.py <user>` mints more; set JWT_SECRET_KEY for real use.",
        ]
    return "\n".join(lines)


NO_SECRET_MESSAGE = """\
auth.py: JWT_SECRET_KEY is not set, and the database ({database}) holds no generated secret yet,
so a token minted here would not match any server. Either start the service once (it generates a
secret and keeps it in its database), or set JWT_SECRET_KEY in the environment or in .env (the same
value the server uses); generate one with:
    python -c 'import secrets; print(secrets.token_urlsafe(32))'"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print a JWT for SUB, signed with JWT_SECRET_KEY, or else with the secret the service "
                    "generated and keeps in its database (DATABASE_URL).")
    parser.add_argument("sub", help="user id to put in the token's sub claim")
    parser.add_argument("--hours", type=float, help="lifetime (default: JWT_EXPIRES_IN_HOURS or 12)")
    args = parser.parse_args(argv)
    load_dotenv(".env")  # the working directory's .env, not one next to this file
    generated = None
    if not os.environ.get("JWT_SECRET_KEY"):
        from store import DEFAULT_DATABASE_URL, stored_setting  # only this path needs the database

        database = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        try:
            generated = stored_setting(database, JWT_SECRET_SETTING)
        except Exception as error:
            print(f"auth.py: could not read the database {database}: {error}", file=sys.stderr)
            return 2
        if generated is None:
            print(NO_SECRET_MESSAGE.format(database=database), file=sys.stderr)
            return 2
    try:
        print(JWTSettings.from_env(generated_secret=generated).mint(args.sub, hours=args.hours))
    except ValueError as error:
        print(f"auth.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
