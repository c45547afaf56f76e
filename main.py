"""Gainz OpenAI Backend: OpenAI assistants behind a JWT-secured REST API and WebSocket.

Run it with `uvicorn main:app` (or `python serve.py`, which adds the connection limits). Every reply
streams, token by token, to every socket on its thread.
"""

import asyncio
import contextlib
import functools
import gc
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
from dotenv import load_dotenv
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette import status
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect
from swagger_ui_bundle import swagger_ui_path

import openapi
from api import (
    NUL_REFUSED,
    Assistant,
    AssistantList,
    CancelFrame,
    Cancelling,
    Frame,
    Health,
    ListQuery,
    MessageFrame,
    MessageList,
    NewAssistant,
    NewMessage,
    NewThread,
    NotReady,
    PresenceList,
    RunRequest,
    Runs,
    Thread,
    ThreadChange,
    ThreadList,
    ToolList,
    ToolOutputs,
    ToolOutputsAccepted,
    ToolOutputsFrame,
    Turn,
    TypingFrame,
    describe,
)
from assistants import Engine, ServiceStopping
from auth import JWT_SECRET_SETTING, JWTAuthMiddleware, JWTSettings, User, demo_tokens_banner, generate_secret
from broker import TERMINAL, UNLOGGED, Broker, ResumeWindow, broker_for
from errors import BadRequest, Forbidden, LimitReached, NotFound, RequestTimeout, ServiceError, TooLarge
from hub import WS_REMOVED_FROM_THREAD, WS_THREAD_DELETED, Closed, Connection, Hub
from metrics import MeasuredEvents, Metrics
from offline_model import OfflineModel, serve_on_loopback
from openapi import ApiRoute
from store import (
    DEFAULT_DATABASE_URL,
    DatabaseUnreachable,
    Limits,
    Page,
    Store,
    Submission,
    database_for,
)
from tools import SERVER_TOOLS

log = logging.getLogger("gainz")
VERSION = "2.0.0"
Body = TypeVar("Body", bound=BaseModel)

DEMO_PAGE = (Path(__file__).resolve().parent / "demo.html").read_text()
DEMO_TOKENS_SLOT = '<script id="demo-tokens" type="application/json">null</script>'
FORWARDING_HEADERS = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip", b"x-forwarded-host"})
DEFAULT_ASSISTANT = "assistant"
DEFAULT_INSTRUCTIONS = "You are a helpful, concise assistant."
MAX_BODY_BYTES = 256 * 1024
MAX_FRAME_CHARS = 64 * 1024
WS_TOKEN_EXPIRED = 4401
SSE_KEEPALIVE_SECONDS = 15  # proxies close HTTP connections that stay silent for long
RUN_CHECK_SECONDS = 5  # a request waiting for its runs asks the store this often, in case an event was lost
RUN_POLL_SECONDS = 0.5  # ... and this often once it no longer hears the thread's events (or Redis was down)
READY_CHECK_SECONDS = 3  # a database or Redis slower than this to answer SELECT 1 or PING is as good as down
MAX_COALESCE_MS = 10  # a coalescing window longer than this would be felt as lag
SEVERAL_PROCESSES = """\
Another process is already serving {database}. Several processes (uvicorn --workers, or several hosts)
must share their live events and limits: set REDIS_URL (for example REDIS_URL=redis://127.0.0.1:6379/0)
in every one of them. One process needs nothing more."""


@dataclass(frozen=True)
class Config:
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-5-mini"
    openai_timeout_seconds: float = 120.0
    openai_max_retries: int = 2
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = ""
    redis_prefix: str = "gainz:"
    cors_origins: tuple[str, ...] = ()
    assistants_file: Path = Path("assistants.json")
    offline_token_delay: float = 0.02
    max_waiting_runs: int = 32
    max_runs_per_user: int = 16
    max_sockets_per_user: int = 20
    max_assistants_per_user: int = 100
    max_threads_per_user: int = 1000
    max_rounds: int = 5
    socket_slot_seconds: float = 30.0
    messages_per_minute: int = 60
    message_burst: int = 10
    max_page_chars: int = 1024 * 1024
    context_chars: int = 60_000
    run_lease_seconds: float = 10.0
    shutdown_grace_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    resume_events: int = 2000
    resume_seconds: float = 300.0
    resume_log_events: int = 200_000
    tool_rounds: int = 8
    tool_timeout_seconds: float = 600.0
    tool_call_seconds: float = 10.0
    coalesce_ms: float = 0.0
    environ: dict = field(default_factory=dict, repr=False)  # for the JWT settings, read at start-up

    def __post_init__(self):
        counts = ("max_waiting_runs", "max_runs_per_user", "max_sockets_per_user", "max_assistants_per_user",
                  "max_threads_per_user", "max_rounds", "resume_events", "resume_log_events", "messages_per_minute",
                  "message_burst", "max_page_chars")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1")
        for name in ("openai_timeout_seconds", "run_lease_seconds", "resume_seconds", "body_timeout_seconds",
                     "socket_slot_seconds", "tool_timeout_seconds", "tool_call_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.upper()} must be positive")
        for name in ("openai_max_retries", "offline_token_delay", "shutdown_grace_seconds", "tool_rounds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.upper()} must not be negative")
        if not 0 <= self.coalesce_ms <= MAX_COALESCE_MS:
            raise ValueError(f"COALESCE_MS must be between 0 and {MAX_COALESCE_MS}")
        if self.context_chars < 32_000:
            raise ValueError("CONTEXT_CHARS must be at least 32000: the longest message must fit")

    @classmethod
    def from_env(cls, environ=os.environ) -> "Config":
        def number(name, default, kind=float):
            try:
                return kind(environ.get(name) or default)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {environ[name]!r}") from None

        numbers = {setting.name: number(setting.name.upper(), setting.default, setting.type)
                   for setting in fields(cls) if setting.type in (int, float)}
        return cls(
            openai_api_key=environ.get("OPENAI_API_KEY") or None,
            openai_base_url=environ.get("OPENAI_BASE_URL") or None,
            openai_model=environ.get("OPENAI_MODEL") or cls.openai_model,
            database_url=environ.get("DATABASE_URL") or cls.database_url,
            redis_url=environ.get("REDIS_URL") or "",
            redis_prefix=environ.get("REDIS_PREFIX") or cls.redis_prefix,
            cors_origins=tuple(filter(None, (origin.strip() for origin in environ.get("CORS_ORIGINS", "").split(",")))),
            assistants_file=Path(environ.get("ASSISTANTS_FILE") or cls.assistants_file),
            environ=dict(environ),
            **numbers,
        )

    @property
    def limits(self) -> Limits:
        return Limits(waiting_runs_per_thread=self.max_waiting_runs, runs_per_user=self.max_runs_per_user,
                      assistants_per_user=self.max_assistants_per_user, threads_per_user=self.max_threads_per_user,
                      messages_per_minute=self.messages_per_minute, message_burst=self.message_burst,
                      page_chars=self.max_page_chars)

    @property
    def resume_window(self) -> ResumeWindow:
        return ResumeWindow(self.resume_events, self.resume_seconds, self.resume_log_events)


# ---------------------------------------------------------------- requests

async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = TooLarge(f"body over {MAX_BODY_BYTES} bytes")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    seconds = services(request).config.body_timeout_seconds
    try:
        async with asyncio.timeout(seconds):  # a body trickled in a byte at a time holds a connection
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise too_large
    except TimeoutError:
        raise RequestTimeout(f"the body took over {seconds:g} s") from None
    return bytes(body)


async def parsed(request: Request, model: type[Body], optional: bool = False) -> Body:
    body = await read_body(request)
    if optional and not body.strip():
        body = b"{}"
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise BadRequest(describe(error)) from None


def path_param(request: Request | WebSocket, name: str) -> str:
    """A part of the path, as text every database can store (the ASGI server has already replaced what is
    not UTF-8, lone surrogates included)."""
    value = request.path_params[name]
    if "\x00" in value:
        raise BadRequest(f"{name}: {NUL_REFUSED}")
    return value


def page_of(request: Request) -> Page:
    try:
        query = ListQuery.model_validate(dict(request.query_params))
    except ValidationError as error:
        raise BadRequest(describe(error)) from None
    return Page(query.limit, query.after, query.before, query.order)


@dataclass
class Services:
    """What the lifespan builds, each in a step of its own, and every request uses: `services(request)`."""

    config: Config
    jwt: JWTSettings
    metrics: Metrics
    store: Store
    broker: Broker
    hub: Hub
    engine: Engine
    offline_model: OfflineModel | None  # the upstream when none is configured


def services(connection: Request | WebSocket) -> Services:
    """The lifespan's services: Starlette hands each request the state the lifespan yielded."""
    return connection.state.services


async def chosen_assistants(request: Request | WebSocket, sub: str, body: RunRequest) -> tuple[list, int]:
    """The assistants named, and how many rounds they answer in."""
    if body.rounds > (most := services(request).config.max_rounds):
        raise BadRequest(f"rounds: at most {most}")
    store = services(request).store
    return [await store.find_assistant(sub, name) for name in body.names(DEFAULT_ASSISTANT)], body.rounds


# ---------------------------------------------------------------- REST routes

def answer(model: BaseModel, status_code: int = status.HTTP_200_OK) -> JSONResponse:
    """A model as the JSON the document describes for it."""
    return JSONResponse(model.model_dump(mode="json"), status_code)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """200 when the database (and Redis, where configured) answer; 503 naming those that do not."""
    app = services(request)
    checks = {"database": app.store.check()}
    if app.config.redis_url:
        checks["redis"] = app.broker.ping()
    answered = await asyncio.gather(*map(answers, checks.values()))
    if down := [name for name, up in zip(checks, answered, strict=True) if not up]:
        return JSONResponse({"status": "unavailable", "down": down}, status.HTTP_503_SERVICE_UNAVAILABLE)
    return JSONResponse({"status": "ok"})


async def answers(check) -> bool:
    try:
        async with asyncio.timeout(READY_CHECK_SECONDS):
            await check
    except Exception as error:
        log.warning("readiness: %s", error or type(error).__name__)
        return False
    return True


async def metrics_page(request: Request) -> Response:
    return Response(generate_latest(services(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def docs_page(request: Request) -> HTMLResponse:
    return HTMLResponse(openapi.INTERACTIVE_PAGE)


async def demo_page(request: Request) -> HTMLResponse:
    """The demo page. In dev mode (no JWT_SECRET_KEY), to a browser on this machine, it comes with alice's
    and bob's tokens, as the start-up log does; never to another host."""
    page = DEMO_PAGE
    jwt_settings = services(request).jwt
    if jwt_settings.secret_is_generated and straight_from_this_machine(request.scope):
        tokens = json.dumps({sub: jwt_settings.mint(sub) for sub in ("alice", "bob")})
        page = page.replace(DEMO_TOKENS_SLOT, DEMO_TOKENS_SLOT.replace(">null<", f">{tokens}<"))
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


def straight_from_this_machine(scope) -> bool:
    """Whether the connection came from this machine, with no proxy in between. A request that names a
    forwarded client came through a proxy, whatever it says; without such a header, `client` is the peer
    as the socket has it (a proxy-headers middleware rewrites it only from X-Forwarded-For), and
    `server`, the address the connection reached, is never rewritten: a remote peer cannot reach loopback."""
    if any(name in FORWARDING_HEADERS for name, _ in scope["headers"]):
        return False
    return all(address is not None and is_loopback(address[0]) for address in (scope.get("client"),
                                                                                scope.get("server")))


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


@functools.cache
def api_document() -> dict:
    """The OpenAPI document of the route table, the same for every app: made once, when first asked for."""
    return openapi.document(ROUTES, VERSION)


async def openapi_document(request: Request) -> JSONResponse:
    # The server is the one asked: a client that imports the document (Postman) sends its requests there.
    return JSONResponse(api_document() | {"servers": [{"url": str(request.base_url).rstrip("/")}]})


async def list_assistants(request: Request) -> JSONResponse:
    listing = await services(request).store.list_assistants(request.user.sub, page_of(request))
    return answer(AssistantList(data=listing.data, has_more=listing.has_more))


async def create_assistant(request: Request) -> JSONResponse:
    body = await parsed(request, NewAssistant)
    assistant, created = await services(request).store.create_or_load_assistant(
        request.user.sub, body.name, body.model or services(request).config.openai_model, body.instructions,
        body.tool_list())
    return answer(assistant, status.HTTP_201_CREATED if created else status.HTTP_200_OK)


async def list_tools(request: Request) -> JSONResponse:
    """The server tools an assistant may be given by name."""
    return JSONResponse({"data": [tool.as_json() for tool in SERVER_TOOLS.values()], "has_more": False})


async def get_assistant(request: Request) -> JSONResponse:
    assistant = await services(request).store.find_assistant(request.user.sub, path_param(request, "assistant"))
    return answer(assistant)


async def delete_assistant(request: Request) -> Response:
    await services(request).store.delete_assistant(request.user.sub, path_param(request, "assistant"))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def list_threads(request: Request) -> JSONResponse:
    listing = await services(request).store.list_threads(request.user.sub, page_of(request))
    return answer(ThreadList(data=listing.data, has_more=listing.has_more))


async def create_thread(request: Request) -> JSONResponse:
    body = await parsed(request, NewThread, optional=True)
    thread = await services(request).store.create_thread(request.user.sub, body.members, body.title)
    return answer(thread, status.HTTP_201_CREATED)


async def visible_thread(request: Request | WebSocket):
    return await services(request).store.visible_thread(path_param(request, "thread_id"), request.user.sub)


async def owned_thread(request: Request):
    """The thread, for its owner; a member gets 403, anyone else the same 404 as for no thread."""
    thread = await visible_thread(request)
    if thread.owner != request.user.sub:
        raise Forbidden("only the thread's owner may do this")
    return thread


async def get_thread(request: Request) -> JSONResponse:
    return answer(await visible_thread(request))


async def change_thread(request: Request) -> JSONResponse:
    thread = await owned_thread(request)
    body = await parsed(request, ThreadChange)
    thread, removed = await services(request).store.update_thread(thread.id, thread.owner, body.members, body.title)
    services(request).hub.members_removed(thread.id, removed)
    return answer(thread)


async def delete_thread(request: Request) -> Response:
    thread = await owned_thread(request)
    await services(request).store.delete_thread(thread.id, thread.owner)
    services(request).hub.thread_deleted(thread.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def list_messages(request: Request) -> JSONResponse:
    thread = await visible_thread(request)
    listing = await services(request).store.list_messages(thread.id, page_of(request))
    return answer(MessageList(data=listing.data, has_more=listing.has_more))


async def post_message(request: Request) -> Response:
    thread = await visible_thread(request)
    body = await parsed(request, NewMessage)
    assistants, rounds = await chosen_assistants(request, request.user.sub, body) if body.run else ([], 1)
    return await answer_runs(request, thread.id, body.content, assistants, rounds, status.HTTP_201_CREATED)


async def start_runs(request: Request) -> Response:
    thread = await visible_thread(request)
    body = await parsed(request, RunRequest, optional=True)
    return await answer_runs(request, thread.id, None, *await chosen_assistants(request, request.user.sub, body),
                             status.HTTP_200_OK)


async def answer_runs(request: Request, thread_id: str, content: str | None, assistants: list, rounds: int,
                      status_code: int) -> Response:
    """Submit, then answer once every run has ended: with JSON, or as it happens with Server-Sent Events.
    The runs go on, and are stored, if the client leaves."""
    app = services(request)
    listening = contextlib.AsyncExitStack()
    # Listen before submitting: the runs may start (on any process) the moment they are stored.
    connection = await listening.enter_async_context(app.hub.listening(thread_id, request.user.sub))
    try:
        submission = await app.engine.submit(thread_id, request.user.sub, content, assistants, rounds)
    except BaseException:
        await listening.aclose()
        raise
    if wants_event_stream(request):
        return EventStream(own_events(connection, submission, request.user, app.store), listening, status_code)
    async with listening:
        await until_runs_end(connection, submission, app.store)
    outcome = await app.engine.outcome(submission)
    if content is None and outcome["failures"] and len(outcome["failures"]) == len(submission.runs):
        raise outcome["failures"][0]  # POST /runs: every run failed, so the request did
    if submission.message is None:
        return answer(Runs(replies=outcome["replies"], errors=outcome["errors"]), status_code)
    return answer(Turn(message=submission.message, replies=outcome["replies"], errors=outcome["errors"]), status_code)


async def until_runs_end(connection: Connection, submission: Submission, store: Store) -> None:
    waiting = {run.id for run in submission.runs}
    while waiting:
        try:
            frame = await connection.get(within=RUN_CHECK_SECONDS if connection.live else RUN_POLL_SECONDS)
        except Closed as closed:
            # Deleted, or the caller removed from it: the thread is no longer theirs, whatever it holds now.
            if closed.code in (WS_THREAD_DELETED, WS_REMOVED_FROM_THREAD):
                raise NotFound("thread not found") from None
            if closed.code == status.WS_1001_GOING_AWAY:  # its runs wait in the store for the next process
                raise ServiceStopping() from None
            while waiting:  # closed for another reason (too far behind, its user removed): the runs go on
                await asyncio.sleep(RUN_POLL_SECONDS)
                waiting -= await store.ended(waiting)
            return
        if frame is None or frame.type == "resync":
            waiting -= await store.ended(waiting)
        elif frame.type in TERMINAL:
            waiting.discard(frame.run_id)


def wants_event_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def sse(frame, thread_id: str) -> str:
    event_id = "" if frame.type in UNLOGGED else f"id: {frame.seq}\n"  # a client resumes from thread events only
    return f"{event_id}event: {frame.type}\ndata: {frame.text(thread_id)}\n\n"


class EventStream(StreamingResponse):
    """Server-Sent Events; `closing` is exited once the response is over, however it ends."""

    def __init__(self, frames, closing: contextlib.AsyncExitStack, status_code: int = status.HTTP_200_OK):
        super().__init__(frames, status_code, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.closing = closing

    async def __call__(self, scope, receive, send):
        async with self.closing:
            await super().__call__(scope, receive, send)


async def frames_until_expiry(connection: Connection, user: User, quiet_seconds: float | None = None):
    """The listener's frames, with None (a keep-alive comment) after `quiet_seconds` without one
    (SSE_KEEPALIVE_SECONDS by default), until it is closed or the token expires."""
    while (left := user.expires_at - time.time()) > 0:
        try:
            frame = await connection.get(within=min(quiet_seconds or SSE_KEEPALIVE_SECONDS, left))
        except Closed:
            return
        yield frame


async def own_events(connection: Connection, submission: Submission, user: User, store: Store):
    """A POST's own events (its message.created, its runs'), ending after its last run."""
    waiting = {run.id for run in submission.runs}
    message_id = submission.message and submission.message.id
    announced = message_id is None
    async for frame in frames_until_expiry(connection, user, None if connection.live else RUN_POLL_SECONDS):
        if frame is None:
            yield ": keep-alive\n\n"
            # Quiet for a while: an event may have been lost on the way (the broker was down).
            waiting -= await store.ended(waiting)
            announced = announced or not waiting
        elif frame.type == "message.created" and not announced and frame.event.fields()["message"]["id"] == message_id:
            announced = True
            yield sse(frame, connection.thread_id)
        elif frame.run_id in waiting:
            yield sse(frame, connection.thread_id)
            if frame.type in TERMINAL:
                waiting.discard(frame.run_id)
        if announced and not waiting:
            return


async def thread_events(request: Request) -> Response:
    """GET /threads/{id}/events: the thread's live events as Server-Sent Events, as a socket gets them."""
    thread = await visible_thread(request)
    after = resume_point(request.headers.get("last-event-id") or request.query_params.get("after"))
    app, user = services(request), request.user
    listening = contextlib.AsyncExitStack()
    connection = await listening.enter_async_context(app.hub.joined(
        thread.id, user.sub, after=after, socket_limit=app.config.max_sockets_per_user))

    async def frames():
        async for frame in frames_until_expiry(connection, user):
            yield ": keep-alive\n\n" if frame is None else sse(frame, thread.id)

    return EventStream(frames(), listening)


async def thread_presence(request: Request) -> JSONResponse:
    """GET /threads/{id}/presence: who is connected to the thread now, service-wide."""
    thread = await visible_thread(request)
    return JSONResponse({"data": await services(request).broker.present(thread.id), "has_more": False})


def resume_point(value: str | None) -> int | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,20}", value):
        raise BadRequest("after / Last-Event-ID: a seq, the number of the last event received")
    return int(value)


async def cancel_run(request: Request) -> JSONResponse:
    thread = await visible_thread(request)
    run = await services(request).engine.cancel(thread.id, path_param(request, "run_id"), request.user.sub)
    return JSONResponse({"run_id": run.id, "status": run.status}, status.HTTP_202_ACCEPTED)


async def post_tool_outputs(request: Request) -> JSONResponse:
    thread = await visible_thread(request)
    body = await parsed(request, ToolOutputs)
    run_id = path_param(request, "run_id")
    answered = await services(request).engine.answer_tool_calls(thread.id, run_id, body.pairs())
    return answer(ToolOutputsAccepted(run_id=run_id, messages=answered))


# ---------------------------------------------------------------- WebSocket

async def thread_socket(websocket: WebSocket) -> None:
    """A refusal before the handshake is accepted (no such thread, a bad `after`, too many sockets, no
    broker) raises, and `service_error` answers it as it would a request: an HTTP denial response."""
    app, user = services(websocket), websocket.scope["user"]
    await visible_thread(websocket)
    # What an idle socket keeps is kept for hours: the path's own thread id, and no parsed query string.
    thread_id = path_param(websocket, "thread_id")
    after = resume_point(QueryParams(websocket.scope["query_string"]).get("after"))
    async with app.hub.joined(thread_id, user.sub, after=after,
                              socket_limit=app.config.max_sockets_per_user) as connection:
        await websocket.accept(subprotocol=websocket.scope.get("auth_subprotocol"))
        app.metrics.sockets_open.inc()
        try:
            with connection.serving(websocket.send_text, until=user.expires_at, expired_code=WS_TOKEN_EXPIRED):
                await read_frames(websocket, connection, app)
        finally:
            app.metrics.sockets_open.dec()
        close_code = connection.close_code
    if close_code is not None:
        # Best effort: a socket that stopped reading may never take the close frame.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(close_code), timeout=1)


class SocketRoute(WebSocketRoute):
    """A WebSocket route whose endpoint Starlette wraps once (its exception middleware), not twice: for a function
    endpoint it adds a session object, two closures and an exception layer of their own, which an idle socket
    carries for as long as it stays open. A refusal still reaches `service_error`, through the middleware."""

    def __init__(self, path: str, endpoint: Callable[[WebSocket], Awaitable[None]]):
        super().__init__(path, endpoint)
        self.app = lambda scope, receive, send: endpoint(WebSocket(scope, receive, send))


async def read_frames(websocket: WebSocket, connection: Connection, app: "Services") -> None:
    """The client's frames, each answered in turn, until it leaves or the listener is closed."""
    try:
        while connection.close_code is None:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                await answer_frame(websocket, connection, message.get("text"), app)
            except ServiceError as error:  # as REST answers it, but to this client alone and the socket stays open
                count_limit_hit(websocket, error)
                connection.note({"type": "error", "error": error_frame(error)})
    except WebSocketDisconnect:
        pass
    except Exception as failure:
        log.error("reading frames from a socket failed", exc_info=failure)


async def answer_frame(websocket: WebSocket, connection: Connection, text: str | None, app: "Services") -> None:
    thread_id, sub = connection.thread_id, connection.sub
    if text is None:
        raise BadRequest("binary frames are not supported: send JSON text")
    if len(text) > MAX_FRAME_CHARS:
        raise TooLarge(f"frame over {MAX_FRAME_CHARS} characters")
    try:
        frame = Frame.validate_json(text)
    except ValidationError as error:
        raise BadRequest(describe(error, tagged=True)) from None
    if isinstance(frame, TypingFrame):
        await app.hub.typing(connection)
    elif isinstance(frame, CancelFrame):
        await app.engine.cancel(thread_id, frame.run_id, sub)
    elif isinstance(frame, ToolOutputsFrame):
        await app.engine.answer_tool_calls(thread_id, frame.run_id, frame.pairs())
    else:
        content = frame.content if isinstance(frame, MessageFrame) else None
        run = not isinstance(frame, MessageFrame) or frame.run
        assistants, rounds = await chosen_assistants(websocket, sub, frame) if run else ([], 1)
        await app.engine.submit(thread_id, sub, content, assistants, rounds)


# ---------------------------------------------------------------- errors

def error_response(status_code: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code, headers=headers)


def error_frame(error: ServiceError) -> dict:
    retry_after = {"retry_after": error.retry_after} if error.retry_after else {}
    return {"code": error.frame_code, "message": error.message} | retry_after


def count_limit_hit(connection: Request | WebSocket, error: ServiceError) -> None:
    if isinstance(error, LimitReached):
        services(connection).metrics.limit_hit(connection.scope.get("endpoint"))


async def service_error(connection: Request | WebSocket, error: ServiceError) -> Response:
    """Every error the service raises, answered with the status its class names; Starlette finds this handler
    for each subclass, and answers a refused socket handshake with it too."""
    count_limit_hit(connection, error)
    seconds = error.retry_after
    headers = {"Retry-After": str(max(1, round(seconds)))} if seconds else None
    return error_response(error.status, error.message, headers)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own: an unknown route (404) or method (405)."""
    return error_response(error.status_code, error.detail, error.headers)


async def internal_error(request: Request, error: Exception) -> Response:
    return error_response(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


async def client_left(request: Request, error: ClientDisconnect) -> None:
    """The client's own doing: one line, no traceback, and nothing to answer."""
    log.info('%s "%s %s": the client left before sending its whole body', request.client and request.client.host,
             request.method, request.url.path)


class StartupRefused(Exception):
    """A configuration this service cannot run as; uvicorn shows the message alone, not a traceback."""


class RefusalsInOneLine:
    """Starlette reports a failed start-up with the whole traceback; for a refusal, the reason is enough."""

    def __init__(self, app):
        self.app = app

    def __call__(self, scope, receive, send) -> Awaitable[None]:
        if scope["type"] != "lifespan":
            return self.app(scope, receive, send)  # handed on, not awaited: this layer stays off every socket's stack
        return self.lifespan(scope, receive, send)

    async def lifespan(self, scope, receive, send) -> None:
        async def send_reason(message):
            # Starlette sends startup.failed from inside its `except` block: the error is the one being handled.
            if message["type"] == "lifespan.startup.failed" and isinstance(error := sys.exc_info()[1], StartupRefused):
                message = message | {"message": str(error)}
            await send(message)

        await self.app(scope, receive, send_reason)


# ---------------------------------------------------------------- app

@contextlib.contextmanager
def stop_gracefully_on_signals(stop):
    """On SIGINT/SIGTERM, run `stop()` (runs finish, then sockets close with 1001) before uvicorn's own
    handler sees the signal: uvicorn would otherwise close the sockets with 1012 at its next tick."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopping: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def stop_then_let_uvicorn_know(sig, frame):
        await stop()
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)

    def on_signal(sig, frame):
        task = loop.create_task(stop_then_let_uvicorn_know(sig, frame))
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    for sig, handler in previous.items():
        if callable(handler):
            signal.signal(sig, lambda sig, frame: loop.call_soon_threadsafe(on_signal, sig, frame))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if callable(handler):
                signal.signal(sig, handler)


def shared_assistants(path: Path) -> list[dict]:
    """The operator's shared assistants: a JSON list of {"name", "model"?, "instructions"?, "id"?}."""
    if not path.exists():
        return []
    try:
        declared = json.loads(path.read_text())
        if not isinstance(declared, list) or not all(isinstance(item, dict) and item.get("name") for item in declared):
            raise ValueError("expected a list of objects with a name")
    except ValueError as error:
        raise StartupRefused(f"{path} is not a valid shared-assistants file ({error}); fix or remove it") from None
    return declared


def redacted_url(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if parts.netloc else url


async def open_store(config: Config, stack: contextlib.AsyncExitStack) -> Store:
    store = Store(database_for(config.database_url), config.limits)
    try:
        await store.open()
    except DatabaseUnreachable as error:
        raise StartupRefused(f"{error} ({redacted_url(config.database_url)})") from None
    stack.push_async_callback(store.close)
    return store


async def choose_broker(config: Config, store: Store) -> Broker:
    """Redis with REDIS_URL; else this process alone, which it must be (refused if another serves the database)."""
    broker = broker_for(config.redis_url, config.resume_window, config.redis_prefix, config.socket_slot_seconds)
    if not broker.shared_across_processes() and not await store.db.hold_process_lock():
        raise StartupRefused(SEVERAL_PROCESSES.format(database=redacted_url(config.database_url)))
    return broker


async def token_settings(config: Config, given: JWTSettings | None, store: Store) -> JWTSettings:
    """JWT_SECRET_KEY's settings, or a secret generated once and kept in the database, for every process."""
    if given is None:
        secret, _ = await store.setting(JWT_SECRET_SETTING, generate_secret)
        given = JWTSettings.from_env(config.environ, generated_secret=secret)
    if given.secret_is_generated:
        log.warning("Demo sign-in is on (no JWT_SECRET_KEY): the page at / hands alice's and bob's tokens to a "
                    "browser on this machine, never through a proxy; set JWT_SECRET_KEY to turn it off")
    else:
        log.info("Demo sign-in is off: JWT_SECRET_KEY is set")
    return given


async def upstream(config: Config, stack: contextlib.AsyncExitStack) -> tuple[openai.AsyncOpenAI, OfflineModel | None]:
    """The SDK's client for the configured upstream, or for the built-in offline model when none is."""
    api_key, base_url, offline_model = config.openai_api_key, config.openai_base_url, None
    if not api_key and not base_url:
        offline_model = OfflineModel(token_delay=config.offline_token_delay)
        base_url = await stack.enter_async_context(serve_on_loopback(offline_model.app)) + "/v1"
        api_key = "offline"
        log.warning("No OPENAI_API_KEY: replies come from the built-in offline model (%s)", base_url)
    else:
        log.info("Upstream: %s, model %s by default", base_url or "https://api.openai.com/v1", config.openai_model)
    client = openai.AsyncOpenAI(
        api_key=api_key or "none", base_url=base_url, max_retries=config.openai_max_retries,
        timeout=openai.Timeout(config.openai_timeout_seconds, connect=5.0))
    stack.push_async_callback(client.close)
    return client, offline_model


async def declare_shared_assistants(config: Config, store: Store) -> None:
    """The default assistant, and the operator's from ASSISTANTS_FILE, brought in line with what is declared."""
    declared = shared_assistants(config.assistants_file)
    if not any(item["name"] == DEFAULT_ASSISTANT for item in declared):
        await store.ensure_shared(DEFAULT_ASSISTANT, config.openai_model, DEFAULT_INSTRUCTIONS)
    for item in declared:
        await store.ensure_shared(item["name"], item.get("model") or config.openai_model,
                                  item.get("instructions") or "", item.get("id"), update=True)


async def connect_live_events(broker: Broker, hub: Hub, engine: Engine, metrics: Metrics,
                              stack: contextlib.AsyncExitStack) -> None:
    """Events to the hub's listeners; signals to the hub and the engine, each taking the kinds that are its own."""
    def on_signal(message: dict) -> None:
        hub.on_signal(message)
        engine.on_signal(message)

    await broker.open(metrics.delivering(hub), on_signal, hub.resync)
    stack.push_async_callback(broker.close)


def lifespan_for(config: Config, given_jwt: JWTSettings | None, metrics: Metrics):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        async with contextlib.AsyncExitStack() as stack:
            store = await open_store(config, stack)
            broker = await choose_broker(config, store)
            jwt_settings = await token_settings(config, given_jwt, store)
            client, offline_model = await upstream(config, stack)
            await declare_shared_assistants(config, store)
            hub = Hub(broker, coalesce_seconds=config.coalesce_ms / 1000)
            engine = Engine(client, store, MeasuredEvents(broker.publish, metrics), broker.process_id,
                            context_chars=config.context_chars, lease_seconds=config.run_lease_seconds,
                            tool_rounds=config.tool_rounds, tool_timeout=config.tool_timeout_seconds,
                            tool_call_seconds=config.tool_call_seconds, signal=broker.signal)
            await connect_live_events(broker, hub, engine, metrics, stack)
            log.info("Database: %s; live events: %s", redacted_url(config.database_url),
                     redacted_url(config.redis_url) if config.redis_url else "this process only (no REDIS_URL)")
            await engine.start()
            # What start-up made (modules, the SDK's and pydantic's types) lives as long as the process: frozen, a
            # full collection no longer walks it all, which held every socket's frames for tens of ms at a time.
            gc.freeze()

            async def stop() -> None:
                await engine.stop(config.shutdown_grace_seconds)
                if endpoints := hub.close_all(status.WS_1001_GOING_AWAY):
                    await asyncio.wait(endpoints, timeout=2)

            stack.push_async_callback(stop)  # for servers that end the lifespan with sockets still open
            if jwt_settings.secret_is_generated and await broker.claim_once("demo-tokens", 10):
                # Printed, not logged: the log never holds a token.
                print(demo_tokens_banner(jwt_settings), file=sys.stderr, flush=True)
            with stop_gracefully_on_signals(stop):
                # Each request sees this as request.state; the JWT middleware reads "jwt" from the scope's state.
                yield {"services": Services(config, jwt_settings, metrics, store, broker, hub, engine, offline_model),
                       "jwt": jwt_settings}

    return lifespan


# ---------------------------------------------------------------- the route table

# Every HTTP route with what it takes and answers: the OpenAPI document is derived from this table alone.
ROUTES = [
    ApiRoute("GET", "/health", health, "Is the service up", {200: Health}, public=True),
    ApiRoute("GET", "/ready", ready, "Do the database (and Redis, where configured) answer",
             {200: Health, 503: NotReady}, public=True),
    ApiRoute("GET", "/metrics", metrics_page, "This process's metrics, in Prometheus's text format", {200: None},
             public=True, content_type="text/plain"),
    ApiRoute("GET", "/", demo_page, "The demo page", {200: None}, public=True, content_type="text/html"),
    ApiRoute("GET", "/openapi.json", openapi_document, "This document", {200: None}, public=True,
             content_type="application/json"),
    ApiRoute("GET", "/docs", docs_page, "This document, to read and try in a browser", {200: None}, public=True,
             content_type="text/html"),
    Mount("/docs", StaticFiles(directory=swagger_ui_path), name="docs_assets"),
    ApiRoute("GET", "/tools", list_tools, "The server tools an assistant may be given by name", {200: ToolList}),
    ApiRoute("GET", "/assistants", list_assistants, "The assistants the caller may use (shared and own), oldest first",
             {200: AssistantList}, listing=True, errors=(400,)),
    ApiRoute("POST", "/assistants", create_assistant,
             "Create the caller's assistant, or load it by name (never modified)",
             {201: Assistant, 200: Assistant}, body=NewAssistant, errors=(400, 413, 429)),
    ApiRoute("GET", "/assistants/{assistant}", get_assistant, "One assistant, by id or name", {200: Assistant},
             errors=(404,)),
    ApiRoute("DELETE", "/assistants/{assistant}", delete_assistant, "Delete one of the caller's own assistants",
             {204: None}, errors=(404,)),
    ApiRoute("GET", "/threads", list_threads,
             "The caller's threads (owned or shared with them), most recently updated first",
             {200: ThreadList}, listing=True, errors=(400,)),
    ApiRoute("POST", "/threads", create_thread, "Start a thread", {201: Thread}, body=NewThread, body_optional=True,
             errors=(400, 413, 429)),
    ApiRoute("GET", "/threads/{thread_id}", get_thread, "One thread", {200: Thread}, errors=(404,)),
    ApiRoute("PATCH", "/threads/{thread_id}", change_thread, "Change the members or title (owner only)",
             {200: Thread}, body=ThreadChange, errors=(400, 403, 404, 413)),
    ApiRoute("DELETE", "/threads/{thread_id}", delete_thread, "Delete the thread and its messages (owner only)",
             {204: None}, errors=(403, 404)),
    ApiRoute("GET", "/threads/{thread_id}/messages", list_messages, "The thread's messages, oldest first",
             {200: MessageList}, listing=True, errors=(400, 404)),
    ApiRoute("POST", "/threads/{thread_id}/messages", post_message,
             "Post a message and run the assistant(s) on the thread; answers once every run has ended",
             {201: Turn}, body=NewMessage, streams=True, errors=openapi.RUNS),
    ApiRoute("POST", "/threads/{thread_id}/runs", start_runs,
             "Run the assistant(s) on the thread without a new message", {200: Runs}, body=RunRequest,
             body_optional=True, streams=True, errors=openapi.RUNS),
    ApiRoute("POST", "/threads/{thread_id}/runs/{run_id}/cancel", cancel_run, "Stop a run; it ends in run.cancelled",
             {202: Cancelling}, errors=(404, 409)),
    ApiRoute("POST", "/threads/{thread_id}/runs/{run_id}/tool_outputs", post_tool_outputs,
             "Answer a run's client tool calls (the first answer to a call wins); the run goes on once all are",
             {200: ToolOutputsAccepted}, body=ToolOutputs, errors=(400, 404, 409, 413)),
    ApiRoute("GET", "/threads/{thread_id}/events", thread_events,
             "The thread's live events as Server-Sent Events, from thread.joined on; resume with Last-Event-ID",
             {200: None}, content_type="text/event-stream", errors=(400, 404, 429),
             headers={"Last-Event-ID": "resume after this seq"}),
    ApiRoute("GET", "/threads/{thread_id}/presence", thread_presence,
             "Who is connected to the thread now (sockets and event streams, service-wide)", {200: PresenceList},
             errors=(404,)),
    SocketRoute("/threads/{thread_id}/ws", thread_socket),
]
PUBLIC_ROUTES = openapi.public_routes(ROUTES)


def create_app(config: Config | None = None, jwt_settings: JWTSettings | None = None) -> Starlette:
    """`jwt_settings` None: from the environment at start-up, the secret generated once and kept in the
    database when JWT_SECRET_KEY is unset."""
    config = config or Config.from_env()
    if jwt_settings is None and config.environ.get("JWT_SECRET_KEY"):
        jwt_settings = JWTSettings.from_env(config.environ)
    middleware = [Middleware(RefusalsInOneLine),
                  Middleware(JWTAuthMiddleware, settings=jwt_settings, public_routes=PUBLIC_ROUTES)]
    if config.cors_origins:  # outside the JWT check: a preflight carries no token
        middleware.insert(1, Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                        allow_methods=["GET", "POST", "PATCH", "DELETE"],
                                        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                                        expose_headers=["Retry-After"], max_age=600))
    handlers: dict[Any, Any] = {ServiceError: service_error, HTTPException: http_error, ClientDisconnect: client_left,
                                Exception: internal_error}
    return Starlette(
        routes=ROUTES,
        middleware=middleware,
        exception_handlers=handlers,
        lifespan=lifespan_for(config, jwt_settings, Metrics()),
    )


class ClientMisbehaviourInOneLine(logging.Filter):
    """What uvicorn logs of a WebSocket client's own doing, as one line or none. A denial response (the
    HTTP 401/404/429 a refused handshake gets) is followed by an error about an incomplete handshake,
    although the client got its answer: noise, dropped. A text frame that is not UTF-8 is closed with
    1007 and logged with a traceback: one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "ASGI callable returned without completing handshake.":
            return False
        if record.msg == "Invalid UTF-8 sequence received from client." and record.exc_info:
            record.msg, record.args = "a WebSocket client sent a text frame that is not UTF-8: closed with 1007", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


SECRETS_IN_TEXT = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*|(?<=token=)[^&\s\"']+|sk-[\w*-]{6,}", re.ASCII)


def redact(value):
    return SECRETS_IN_TEXT.sub("[redacted]", value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """No token or key in any log line, the access log included: whatever a client puts in a URL or a
    header that ends up logged, and whatever an upstream error quotes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) for arg in record.args)
        return True


def configure_logging() -> None:
    logging.getLogger("uvicorn.error").addFilter(ClientMisbehaviourInOneLine())
    if not log.handlers:
        own = logging.StreamHandler()
        own.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(own)
        log.setLevel(logging.INFO)
        log.propagate = False
    redaction = RedactSecrets()
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "gainz"):
        for handler in logging.getLogger(name).handlers:
            if redaction not in handler.filters and not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(redaction)


load_dotenv(".env")
configure_logging()
app = create_app()
