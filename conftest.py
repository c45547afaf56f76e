"""Shared test helpers: the real app under TestClient or a real uvicorn on 127.0.0.1 (port 0), answering
from the built-in offline model; real PostgreSQL and Redis where a test needs them; one test secret.

Tests that need PostgreSQL, Redis, Chromium or newman skip, saying why, when the machine lacks
them, except under CI (the environment variable CI set), where they fail instead.
"""

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx2
import pytest
from starlette.testclient import TestClient
from websockets.asyncio.client import connect

from auth import JWTSettings
from broker import UNLOGGED
from main import Config, create_app
from offline_model import serve_on_loopback

TEST_SECRET = "test-secret-" + "s" * 64
REPO = Path(__file__).resolve().parent
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FRAME_TIMEOUT = 10
TEST_JWT = JWTSettings(secret=TEST_SECRET)


def require(available: bool, what: str) -> None:
    """Skip a test whose service or tool is missing, saying so; under CI, fail instead."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI", pytrace=False)
    pytest.skip(f"{what} is not available on this machine")


def reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


# ---------------------------------------------------------------- settings and apps

@pytest.fixture
def anyio_backend():
    return "asyncio"


def authorization(token: str) -> dict:
    """Headers carrying this very token."""
    return {"Authorization": f"Bearer {token}"}


def bearer(sub: str, settings: JWTSettings = TEST_JWT) -> dict:
    """Headers carrying a fresh token for `sub`, signed with the test secret (or `settings`)."""
    return authorization(settings.mint(sub))


@pytest.fixture
def jwt_settings() -> JWTSettings:
    return JWTSettings(secret=TEST_SECRET)


@pytest.fixture
def auth(jwt_settings):
    """auth("alice") -> headers carrying a valid token for alice."""
    return lambda sub: bearer(sub, jwt_settings)


# Tests post far faster than a person: the message rate is tested where it is set on purpose.
TEST_MESSAGE_RATE = {"messages_per_minute": 60_000, "message_burst": 1000}


def config_for(directory: Path, **overrides) -> Config:
    """Fast offline tokens, a database of its own, no shared-assistants file, a message rate no test reaches
    by accident; `overrides` on top."""
    config = Config(database_url=f"sqlite:///{directory}/gainz.db", assistants_file=directory / "assistants.json",
                    offline_token_delay=0.002, **TEST_MESSAGE_RATE)
    return dataclasses.replace(config, **overrides)


@pytest.fixture
def make_app(tmp_path, jwt_settings):
    """An app factory; keyword arguments override the test Config."""
    return lambda **overrides: create_app(config_for(tmp_path, **overrides), jwt_settings)


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    with TestClient(app) as test_client:
        yield test_client


# ---------------------------------------------------------------- real PostgreSQL and Redis

@pytest.fixture
def postgres_url():
    """A PostgreSQL URL whose tables live in a schema of this test's own, dropped afterwards."""
    import psycopg

    require(reachable("127.0.0.1", 5432) or "TEST_POSTGRES_URL" in os.environ, "PostgreSQL (127.0.0.1:5432)")
    schema = f"test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each test with this fixture runs on both engines."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gainz.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def redis_url():
    """The test Redis, with a key prefix of this test's own (keys and channels), cleared afterwards."""
    import redis

    require(reachable("127.0.0.1", 6379) or "TEST_REDIS_URL" in os.environ, "Redis (127.0.0.1:6379)")
    prefix = f"test-{secrets.token_hex(6)}:"
    yield REDIS_URL, prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


# ---------------------------------------------------------------- live servers

@dataclass
class LiveService:
    app: object
    url: str
    http: httpx2.AsyncClient

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    lifespan_state: dict = dataclasses.field(default_factory=dict)

    @property
    def services(self):
        """The services the app's lifespan built (main.Services)."""
        return self.lifespan_state["services"]

    async def new_thread(self, auth, owner: str = "alice", members=(), **body) -> str:
        response = await self.http.post("/threads", json={"members": list(members)} | body, headers=auth(owner))
        assert response.status_code == 201, response.text
        return response.json()["id"]

    async def messages(self, auth, thread_id: str, sub: str = "alice") -> list[dict]:
        return await thread_messages(self.http, thread_id, auth(sub))

    def socket_url(self, thread_id: str, query: str = "") -> str:
        return f"{self.ws_url}/threads/{thread_id}/ws{query}"


class LifespanState:
    """The app, keeping the state its lifespan yields (the services) where a test can reach it."""

    def __init__(self, app):
        self.app, self.state = app, {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            self.state = scope["state"]
        await self.app(scope, receive, send)


def services_of(client: TestClient):
    """The services the app's lifespan built (main.Services), under a TestClient."""
    return client.app_state["services"]


@contextlib.asynccontextmanager
async def serve_live(app, **uvicorn_config):
    """The app under a real uvicorn on 127.0.0.1 (a free port), with an HTTP client pointed at it."""
    noted = LifespanState(app)
    async with serve_on_loopback(noted, lifespan="on", **uvicorn_config) as url:
        async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
            yield LiveService(app, url, http, noted.state)


@pytest.fixture
async def live(app):
    async with serve_live(app) as service:
        yield service


@pytest.fixture
async def opened():
    """The sockets a test opens; those still open are closed when it ends, passed or failed."""
    sockets = []
    yield sockets
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


@pytest.fixture
def join(opened, jwt_settings):
    async def join_thread(service, thread_id: str, sub: str, query: str = "", **kwargs):
        """A socket on the thread as `sub`, and its first frame (thread.joined)."""
        # close_timeout: a test may leave frames unread, and a client whose queue is full never reads the close.
        ws = await connect(service.socket_url(thread_id, query),
                           additional_headers={"Authorization": f"Bearer {jwt_settings.mint(sub)}"},
                           **{"close_timeout": 1} | kwargs)
        opened.append(ws)
        joined = await next_frame(ws)
        assert joined["type"] == "thread.joined", joined
        assert joined["thread_id"] == thread_id
        return ws, joined

    return join_thread


async def thread_messages(http, thread_id: str, headers: dict, url: str = "") -> list[dict]:
    """A thread's messages over HTTP (`url`: the server's, when `http` has no base URL)."""
    response = await http.get(f"{url}/threads/{thread_id}/messages", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["data"]


# ---------------------------------------------------------------- polling: state with no event to await

ANYTHING_TRUE = object()


async def polled(ask, wanted=ANYTHING_TRUE, timeout: float = 5.0, interval: float = 0.01):
    """`ask()` (a function or a coroutine function) again and again until it answers `wanted` (by default,
    anything true), or the time is up; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = ask()
        if inspect.isawaitable(answer):
            answer = await answer
        if (bool(answer) if wanted is ANYTHING_TRUE else answer == wanted) or time.monotonic() >= deadline:
            return answer
        await asyncio.sleep(interval)


async def eventually(condition, timeout: float = 5.0):
    """Server-side cleanup has no event to await: poll it, with a deadline; the condition's last answer."""
    return await polled(condition, timeout=timeout)


async def until(condition, timeout: float = 30.0):
    """Polls a condition (server state seen over HTTP) until it holds, failing the test past the deadline."""
    answer = await polled(condition, timeout=timeout, interval=0.05)
    assert answer, "timed out"
    return answer


async def next_frame(ws, timeout: float = FRAME_TIMEOUT, skip: tuple[str, ...] = UNLOGGED) -> dict:
    """The next frame; by default past `presence` and `typing`, which come whenever someone joins, leaves or
    types (the tests of those frames pass `skip=()`)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.0, deadline - time.monotonic())))
        if frame["type"] not in skip:
            return frame


async def frames_until(ws, last_type: str, count: int = 1, timeout: float = FRAME_TIMEOUT) -> list[dict]:
    """Frames up to and including the `count`-th frame of type `last_type`."""
    frames = []
    while count:
        frames.append(await next_frame(ws, timeout))
        count -= frames[-1]["type"] == last_type
    return frames


def run_ends(frames: list[dict]) -> list[dict]:
    return [frame for frame in frames if frame["type"] in ("run.completed", "run.failed", "run.cancelled")]


def check_run(frames: list[dict]) -> str:
    """Asserts one run's frames (run.started, text.delta..., run.completed); returns the reply."""
    started, *deltas, completed = frames
    assert started["type"] == "run.started", started
    assert completed["type"] == "run.completed", completed
    assert deltas
    assert all(frame["type"] == "text.delta" for frame in deltas)
    assert {frame["run_id"] for frame in frames} == {started["run_id"]}
    reply = completed["message"]["content"]
    assert "".join(frame["delta"] for frame in deltas) == reply
    assert completed["message"]["assistant"] == started["assistant"]
    return reply


def assert_seq_grows_by_one(frames: list[dict]) -> None:
    """Consecutive thread events; a merged text.delta carries its last delta's seq, so it may jump."""
    seqs = [frame["seq"] for frame in frames if "seq" in frame and frame["type"] != "thread.joined"]
    assert seqs == sorted(set(seqs)), seqs


async def sse_stream(response):
    """Each thread event of a Server-Sent Events body as it arrives (a dict, checked against its `event:` and
    `id:` lines: the id is its seq), and each comment line (a str, such as ': keep-alive'); `presence` and
    `typing`, which have no id, are skipped (see next_frame)."""
    fields = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield line
        elif line:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        else:
            if "data" in fields:
                event = json.loads(fields["data"])
                assert event["type"] == fields["event"], fields
                if event["type"] not in UNLOGGED:
                    assert int(fields["id"]) == event["seq"], fields
                    yield event
            fields = {}


async def sse_events(response) -> list[dict]:
    """Every thread event of a Server-Sent Events body, to its end (comments left out)."""
    return [item async for item in sse_stream(response) if isinstance(item, dict)]


async def sse_until(stream, last_type: str, count: int = 1) -> list[dict]:
    """Events (comments skipped) up to and including the `count`-th event of type `last_type`."""
    events = []
    while count:
        item = await asyncio.wait_for(anext(stream), FRAME_TIMEOUT)
        if isinstance(item, dict):
            events.append(item)
            count -= item["type"] == last_type
    return events


async def sse_rest(stream) -> list:
    """Everything until the server ends the stream."""
    async def drain():
        return [item async for item in stream]
    return await asyncio.wait_for(drain(), FRAME_TIMEOUT)


def writer_tasks() -> set[asyncio.Task]:
    """The hub's socket writers still alive in this event loop."""
    return {task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "Connection._write"}


# ---------------------------------------------------------------- the service as a process

class PeakMemory:
    """How far a process's resident memory rose, at its peak over the block, above where it stood (MiB):
    memory a process takes and gives back at once shows only in its peak (Linux's VmHWM, reset here)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.growth = 0.0

    def _mib(self, field: str) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field + ":")).split()[1]) / 1024

    def __enter__(self) -> "PeakMemory":
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # the peak starts again from now
        self.before = self._mib("VmRSS")
        return self

    def __exit__(self, *exc_info) -> None:
        self.growth = self._mib("VmHWM") - self.before


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python serve.py` (the README's run command) in a process of its own, on a free port."""

    def __init__(self, workdir: Path, env: dict, args: tuple = (), port: int | None = None,
                 open_files: int | None = None):
        self.workdir, self.port, self.open_files = workdir, port or free_port(), open_files
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        clean = {key: value for key, value in os.environ.items()
                 if not key.startswith(("JWT_", "OPENAI_", "DATABASE_", "REDIS_", "CI"))}
        self.env = clean | {"JWT_SECRET_KEY": TEST_SECRET, "OFFLINE_TOKEN_DELAY": "0.002", "PYTHONPATH": str(REPO),
                            **{name.upper(): str(value) for name, value in TEST_MESSAGE_RATE.items()}} | env
        self.args = args
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--port", str(self.port),
                                         *self.args], cwd=self.workdir, env=self.env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, preexec_fn=self._limit_files)
        return self

    def _limit_files(self) -> None:
        if self.open_files is not None:  # the hard limit too: serve.py raises its own to the hard one
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    async def ready(self, timeout: float = 30) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        async with httpx2.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()}")
                with contextlib.suppress(httpx2.HTTPError):
                    if (await http.get(self.url + "/health")).status_code == 200:
                        return self
                await asyncio.sleep(0.05)
        raise AssertionError(f"the server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig=9) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            stop_process(self.process)
        if self.process:
            self.log_file.close()


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def servers(tmp_path):
    """Start service processes with `servers(env=..., args=...)`; all are stopped when the test ends."""
    started: list[ServerProcess] = []

    async def start(env: dict | None = None, args: tuple = (), port: int | None = None, wait: bool = True,
                    open_files: int | None = None):
        server = ServerProcess(tmp_path, env or {}, args, port, open_files).start()
        started.append(server)
        return await server.ready() if wait else server

    yield start
    for server in started:
        server.stop()


def tool(name: str) -> str | None:
    return shutil.which(name)
