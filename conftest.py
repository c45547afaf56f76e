"""Shared fixtures: the real app, under TestClient or under a real uvicorn on 127.0.0.1, port 0,
answering from the built-in offline model."""

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

import httpx2
import pytest
from starlette.testclient import TestClient

from auth import JWTSettings
from main import Config, create_app
from offline_model import serve_on_loopback

TEST_SECRET = "test-secret-" + "s" * 64


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def jwt_settings() -> JWTSettings:
    return JWTSettings(secret=TEST_SECRET)


@pytest.fixture
def make_app(tmp_path, jwt_settings):
    """An app factory; keyword arguments override the test Config (fast offline tokens, temp files)."""

    def make(**overrides):
        config = Config(assistants_file=tmp_path / "assistants.json", offline_token_delay=0.002)
        return create_app(Config(**(config.__dict__ | overrides)), jwt_settings)

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def auth(jwt_settings):
    """auth("alice") -> headers carrying a valid token for alice."""
    return lambda sub: {"Authorization": f"Bearer {jwt_settings.mint(sub)}"}


@dataclass
class LiveService:
    app: object
    url: str
    http: httpx2.AsyncClient

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    @property
    def engine(self):
        return self.app.state.engine

    @property
    def hub(self):
        return self.app.state.hub

    @property
    def offline_model(self):
        return self.app.state.offline_model


@contextlib.asynccontextmanager
async def serve_live(app, **uvicorn_config):
    """The app under a real uvicorn on 127.0.0.1 (a free port), with an HTTP client pointed at it."""
    async with serve_on_loopback(app, lifespan="on", **uvicorn_config) as url:
        async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
            yield LiveService(app, url, http)


@pytest.fixture
async def live(app):
    async with serve_live(app) as service:
        yield service


async def eventually(condition, timeout: float = 5.0) -> bool:
    """Server-side cleanup has no event to await: poll it, with a deadline."""
    deadline = time.monotonic() + timeout
    while not (met := condition()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return met


async def next_frame(ws, timeout: float = 10) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def writer_tasks() -> set[asyncio.Task]:
    """The hub's socket writers still alive in this event loop."""
    return {task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "Connection._write"}
