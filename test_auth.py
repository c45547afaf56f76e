"""Tests for auth.py: the token matrix over HTTP, settings, the CLI, and WebSocket
handshakes against a real uvicorn server."""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from auth import (
    JWT_SECRET_SETTING,
    JWTAuthMiddleware,
    JWTSettings,
    TokenError,
    User,
    demo_tokens_banner,
    generate_secret,
)
from store import Store, database_for

SECRET = "test-secret-" + "x" * 64  # long enough that pyjwt accepts it for HS512 without a warning
SETTINGS = JWTSettings(secret=SECRET)
AUTH_PY = Path(__file__).with_name("auth.py")


# ---------- helpers ----------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(header: dict, payload: dict, sign=lambda signing_input: b"") -> str:
    """A token assembled without pyjwt, for headers pyjwt refuses to produce."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def claims(**overrides) -> dict:
    """Valid claims for alice; an override of None removes that claim."""
    now = int(time.time())
    return {k: v for k, v in {"sub": "alice", "iat": now, "exp": now + 3600, **overrides}.items() if v is not None}


def signed(secret: str = SECRET, algorithm: str = "HS256", **overrides) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm=algorithm)


def alg_none_token() -> str:
    return hand_built({"alg": "none", "typ": "JWT"}, claims())


def rs256_headed_hmac_token() -> str:
    # The classic key-confusion forgery: claim RS256 but sign with HMAC, using the shared secret as the "public key".
    return hand_built(
        {"alg": "RS256", "typ": "JWT"}, claims(), lambda data: hmac.new(SECRET.encode(), data, hashlib.sha256).digest()
    )


def tampered_token() -> str:
    header, _, signature = signed().split(".")
    return f"{header}.{b64url(json.dumps(claims(sub='mallory')).encode())}.{signature}"


def make_app(settings: JWTSettings = SETTINGS) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def private(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.scope["user"].sub)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol=websocket.scope.get("auth_subprotocol"))
        await websocket.send_text(websocket.scope["user"].sub)
        await websocket.close()

    return Starlette(
        routes=[Route("/health", health), Route("/private", private), WebSocketRoute("/ws", ws)],
        middleware=[Middleware(JWTAuthMiddleware, settings=settings)],
    )


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app()) as test_client:
        yield test_client


def assert_refused(response, detail: str, token: str | None) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json() == {"detail": detail}
    if token:
        assert token not in response.text
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# ---------- HTTP ----------


def test_health_is_public(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.head("/health").status_code == 200


def test_public_routes_are_per_method_and_everything_else_is_denied(client):
    assert_refused(client.post("/health"), "missing bearer token", None)
    assert_refused(client.get("/no-such-route"), "missing bearer token", None)


def test_http_ignores_a_token_in_the_query(client):
    assert_refused(client.get(f"/private?token={signed()}"), "missing bearer token", None)


def test_valid_token_reaches_the_route_with_its_user(client):
    response = client.get("/private", headers={"Authorization": f"Bearer {signed(sub='bob')}"})
    assert response.status_code == 200
    assert response.text == "bob"


def test_scheme_is_case_insensitive(client):
    assert client.get("/private", headers={"Authorization": f"bearer {signed()}"}).text == "alice"


def test_exp_within_leeway_is_accepted(client):
    token = signed(exp=int(time.time()) - 2)
    assert client.get("/private", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic YWxpY2U6cGFzc3dvcmQ=", "Bearer", "Bearer   ", signed()],  # the last: token without a scheme
    ids=["no header", "basic", "bearer without token", "bearer blank", "bare token"],
)
def test_missing_bearer_token(client, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.get("/private", headers=headers)
    assert_refused(response, "missing bearer token", None)
    assert response.headers["www-authenticate"] == "Bearer"
    if authorization:
        assert authorization not in response.text


@pytest.mark.parametrize(
    ("make_token", "detail"),
    [
        (lambda: "garbage", "invalid token"),
        (lambda: "not.a.jwt", "invalid token"),
        (lambda: signed(secret="another-" + "y" * 64), "invalid token"),
        (tampered_token, "invalid token"),
        (alg_none_token, "invalid token"),
        (lambda: signed(algorithm="HS512"), "invalid token"),
        (rs256_headed_hmac_token, "invalid token"),
        (lambda: signed(exp=int(time.time()) - 3600), "token expired"),
        (lambda: signed(nbf=int(time.time()) + 3600), "token not yet valid"),
        (lambda: signed(sub=None), "invalid token"),
        (lambda: signed(sub=""), "invalid token"),
        (lambda: signed(sub=42), "invalid token"),
        (lambda: signed(exp=None), "invalid token"),
        (lambda: signed(exp="soon"), "invalid token"),
        (lambda: signed(sub="\ud800"), "invalid token"),
        (lambda: signed(sub="alice\nbob"), "invalid token"),
    ],
    ids=[
        "garbage", "three garbage segments", "other secret", "tampered payload", "alg none",
        "HS512 same secret", "RS256 header HMAC signature", "expired",
        "nbf in future", "no sub", "empty sub", "non-string sub", "no exp", "non-numeric exp",
        "unencodable sub", "control character in sub",
    ],
)
def test_refused_tokens(client, make_token, detail):
    token = make_token()
    assert_refused(client.get("/private", headers={"Authorization": f"Bearer {token}"}), detail, token)


def test_audience_and_issuer_when_configured():
    settings = JWTSettings(secret=SECRET, audience="chat", issuer="https://issuer.example")
    with TestClient(make_app(settings)) as client:

        def get(token: str):
            return client.get("/private", headers={"Authorization": f"Bearer {token}"})

        good = {"aud": "chat", "iss": "https://issuer.example"}
        assert get(signed(**good)).text == "alice"
        assert get(settings.mint("carol")).text == "carol"  # minted tokens carry aud and iss
        for wrong in [{"aud": "other"}, {"aud": None}, {"iss": "https://evil.example"}, {"iss": None}]:
            token = signed(**{**good, **wrong})
            assert_refused(get(token), "invalid token", token)


def test_audience_unset_means_not_checked(client):
    token = signed(aud="whatever", iss="anyone")
    assert client.get("/private", headers={"Authorization": f"Bearer {token}"}).text == "alice"


# ---------- settings, mint, verify ----------


def test_without_a_configured_secret_the_generated_one_is_used_and_marked_so():
    generated = generate_secret()
    settings = JWTSettings.from_env({"JWT_SECRET_KEY": ""}, generated_secret=generated)
    assert settings.secret == generated
    assert settings.secret_is_generated
    assert len(generated) >= 64
    assert generate_secret() != generated
    assert (settings.algorithm, settings.expires_in_hours) == ("HS256", 12)
    assert (settings.audience, settings.issuer) == (None, None)
    configured = JWTSettings.from_env({"JWT_SECRET_KEY": SECRET}, generated_secret=generated)
    assert configured.secret == SECRET
    assert not configured.secret_is_generated
    with pytest.raises(ValueError, match="must not be empty"):
        JWTSettings.from_env({})


def test_from_env_reads_every_variable_and_empty_means_unset():
    settings = JWTSettings.from_env(
        {"JWT_SECRET_KEY": SECRET, "JWT_ALGORITHM": "HS384", "JWT_EXPIRES_IN_HOURS": "1.5",
         "JWT_AUDIENCE": "chat", "JWT_ISSUER": ""}
    )
    assert settings == JWTSettings(secret=SECRET, algorithm="HS384", expires_in_hours=1.5, audience="chat")
    assert settings.verify(settings.mint("dave")).sub == "dave"


@pytest.mark.parametrize("algorithm", ["none", "NONE", "None"])
def test_from_env_refuses_alg_none(algorithm):
    with pytest.raises(ValueError, match="JWT_ALGORITHM=none would accept unsigned tokens; use HS256"):
        JWTSettings.from_env({"JWT_SECRET_KEY": SECRET, "JWT_ALGORITHM": algorithm})


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "hs256", "sha256"])
def test_from_env_refuses_other_algorithms(algorithm):
    with pytest.raises(ValueError, match="HS256, HS384, HS512"):
        JWTSettings.from_env({"JWT_SECRET_KEY": SECRET, "JWT_ALGORITHM": algorithm})


@pytest.mark.parametrize("hours", ["abc", "0", "-1", "nan", "inf"])
def test_from_env_refuses_bad_lifetimes(hours):
    with pytest.raises(ValueError, match="JWT_EXPIRES_IN_HOURS must be a positive number"):
        JWTSettings.from_env({"JWT_SECRET_KEY": SECRET, "JWT_EXPIRES_IN_HOURS": hours})


def test_mint_claims_and_verify_round_trip():
    before = time.time()
    token = SETTINGS.mint("erin", hours=2)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert set(payload) == {"sub", "iat", "exp"}
    assert payload["sub"] == "erin"
    assert before + 2 * 3600 - 2 <= payload["exp"] <= time.time() + 2 * 3600 + 1
    assert SETTINGS.verify(token) == User(sub="erin", expires_at=float(payload["exp"]))


@pytest.mark.parametrize("sub", ["", None, 7])
def test_mint_refuses_bad_sub(sub):
    with pytest.raises(ValueError, match="sub must be a non-empty string"):
        SETTINGS.mint(sub)


def test_token_error_never_carries_the_token():
    token = signed(secret="another-" + "y" * 64)
    with pytest.raises(TokenError) as caught:
        SETTINGS.verify(token)
    assert caught.value.detail == "invalid token"
    assert token not in str(caught.value)
    assert caught.value.__cause__ is None


def test_demo_tokens_banner():
    settings = JWTSettings.from_env({}, generated_secret=generate_secret())
    banner = demo_tokens_banner(settings)
    for user in ("alice", "bob"):
        line = next(line for line in banner.splitlines() if line.strip().startswith(f"{user}: Authorization: Bearer "))
        assert settings.verify(line.rsplit(" ", 1)[1]).sub == user
    assert "generated for this database" in banner
    assert "JWT_SECRET_KEY" in banner
    assert "generated" not in demo_tokens_banner(SETTINGS)


# ---------- CLI ----------


def run_cli(tmp_path, *args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "DATABASE_URL"))}
    return subprocess.run(
        [sys.executable, str(AUTH_PY), *args], env={**clean, **env}, cwd=tmp_path, capture_output=True, text=True
    )


def test_cli_prints_a_token_signed_with_the_configured_secret(tmp_path):
    result = run_cli(tmp_path, "carol", "--hours", "1", JWT_SECRET_KEY=SECRET)
    assert result.returncode == 0, result.stderr
    user = SETTINGS.verify(result.stdout.strip())
    assert user.sub == "carol"
    assert abs(user.expires_at - (time.time() + 3600)) < 60
    assert result.stdout.count("\n") == 1


def test_cli_reads_dotenv_in_working_directory(tmp_path):
    (tmp_path / ".env").write_text(f"JWT_SECRET_KEY={SECRET}\nJWT_EXPIRES_IN_HOURS=3\n")
    result = run_cli(tmp_path, "frank")
    assert result.returncode == 0, result.stderr
    user = SETTINGS.verify(result.stdout.strip())
    assert user.sub == "frank"
    assert abs(user.expires_at - (time.time() + 3 * 3600)) < 60


def test_cli_without_any_secret_explains_and_exits_2_without_creating_a_database(tmp_path):
    result = run_cli(tmp_path, "carol")
    assert result.returncode == 2
    assert result.stdout == ""
    for hint in ("JWT_SECRET_KEY", ".env", "secrets.token_urlsafe(32)", "start the service once", "gainz.db"):
        assert hint in result.stderr
    assert not (tmp_path / "gainz.db").exists()


def test_cli_without_a_configured_secret_mints_with_the_one_the_service_generated(tmp_path):
    async def generated_by_the_service() -> str:
        store = Store(database_for(f"sqlite:///{tmp_path}/gainz.db"))
        await store.open()
        secret, _ = await store.setting(JWT_SECRET_SETTING, generate_secret)
        await store.close()
        return secret

    secret = asyncio.run(generated_by_the_service())
    result = run_cli(tmp_path, "carol")
    assert result.returncode == 0, result.stderr
    assert JWTSettings(secret=secret).verify(result.stdout.strip()).sub == "carol"


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"JWT_ALGORITHM": "none"}, ["carol"], "JWT_ALGORITHM=none"),
        ({"JWT_EXPIRES_IN_HOURS": "forever"}, ["carol"], "JWT_EXPIRES_IN_HOURS"),
        ({}, ["carol", "--hours", "0"], "hours must be a positive number"),
        ({}, ["", "--hours", "1"], "sub must be a non-empty string"),
    ],
)
def test_cli_bad_configuration_exits_2_without_traceback(tmp_path, env, args, message):
    result = run_cli(tmp_path, *args, JWT_SECRET_KEY=SECRET, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# ---------- WebSocket over a real uvicorn ----------


@pytest.fixture(scope="module")
def ws_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(), lifespan="off", log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"ws://127.0.0.1:{port}/ws"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


async def receive_sub(url: str, **kwargs) -> tuple[str, str | None]:
    async with connect(url, **kwargs) as ws:
        return await ws.recv(), ws.subprotocol


async def refused(url: str, **kwargs) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, **kwargs):
            pass
    return caught.value


def test_ws_token_in_authorization_header(ws_url):
    sub, subprotocol = asyncio.run(receive_sub(ws_url, additional_headers={"Authorization": f"Bearer {signed()}"}))
    assert (sub, subprotocol) == ("alice", None)


def test_ws_token_in_subprotocol_selects_bearer_without_echoing_token(ws_url):
    token = signed(sub="bob")

    async def scenario():
        async with connect(ws_url, subprotocols=["bearer", token]) as ws:
            return await ws.recv(), ws.subprotocol, ws.response.headers.get_all("Sec-WebSocket-Protocol")

    assert asyncio.run(scenario()) == ("bob", "bearer", ["bearer"])


def test_ws_token_in_query_is_kept_out_of_the_access_log(ws_url, caplog):
    token = signed(sub="carol")
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    assert asyncio.run(receive_sub(f"{ws_url}?token={token}&room=1"))[0] == "carol"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/ws?room=1" in logged
    assert token not in logged


def test_ws_header_is_preferred_over_query_and_the_unused_query_token_is_not_logged(ws_url, caplog):
    caplog.set_level(logging.INFO)
    query_token = signed(sub="bob")
    kwargs = {"additional_headers": {"Authorization": f"Bearer {signed(sub='alice')}"}}
    assert asyncio.run(receive_sub(f"{ws_url}?token={query_token}", **kwargs))[0] == "alice"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/ws" in logged
    assert query_token not in logged


@pytest.mark.parametrize(
    ("how", "detail"),
    [
        ("nothing", "missing bearer token"),
        ("header", "invalid token"),
        ("subprotocol", "invalid token"),
        ("query", "token expired"),
    ],
)
def test_ws_handshake_refused_with_401(ws_url, caplog, how, detail):
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    token = signed(exp=int(time.time()) - 3600) if how == "query" else "garbage.token.value"
    kwargs = {
        "nothing": {},
        "header": {"additional_headers": {"Authorization": f"Bearer {token}"}},
        "subprotocol": {"subprotocols": ["bearer", token]},
        "query": {},
    }[how]
    url = f"{ws_url}?token={token}" if how == "query" else ws_url
    error = asyncio.run(refused(url, **kwargs))
    assert error.response.status_code == 401
    assert error.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(error.response.body) == {"detail": detail}
    assert token.encode() not in error.response.body
    if how == "query":
        assert token not in "\n".join(record.getMessage() for record in caplog.records)
