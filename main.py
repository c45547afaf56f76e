"""Gainz OpenAI Backend: OpenAI assistants behind a JWT-secured REST API and WebSocket.

Run it with `uvicorn main:app`. Every reply streams, token by token, to every socket on its thread.
"""

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
from dotenv import load_dotenv
from starlette import status
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from assistants import (AssistantStore, Engine, NotFound, RunQueueFull, ThreadEvents, Turn, UpstreamError)
from auth import JWTAuthMiddleware, JWTSettings, demo_tokens_banner
from hub import Hub
from offline_model import OfflineModel, serve_on_loopback

log = logging.getLogger("gainz")

DEFAULT_ASSISTANT = "assistant"
DEFAULT_INSTRUCTIONS = "You are a helpful, concise assistant."
MAX_BODY_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32
MAX_FRAME_CHARS = 64 * 1024
MAX_CONTENT_CHARS = 32_000
MAX_NAME_CHARS = 64
MAX_INSTRUCTIONS_CHARS = 32_000
MAX_ASSISTANTS_PER_RUN = 8
MAX_MEMBERS = 10
METADATA_VALUE_MAX_CHARS = 512  # what a Conversations metadata value holds (owner, members)
WS_TOKEN_EXPIRED = 4401
SSE_KEEPALIVE_SECONDS = 15  # proxies close HTTP connections that stay silent for long


@dataclass(frozen=True)
class Config:
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-5-mini"
    openai_timeout_seconds: float = 120.0
    openai_max_retries: int = 2
    assistants_file: Path = Path("assistants.json")
    offline_token_delay: float = 0.02
    max_waiting_runs: int = 32

    def __post_init__(self):
        if self.max_waiting_runs < 1:
            raise ValueError("MAX_WAITING_RUNS must be at least 1")
        if self.openai_timeout_seconds <= 0 or self.openai_max_retries < 0 or self.offline_token_delay < 0:
            raise ValueError("OPENAI_TIMEOUT_SECONDS must be positive; OPENAI_MAX_RETRIES and "
                             "OFFLINE_TOKEN_DELAY must not be negative")

    @classmethod
    def from_env(cls, environ=os.environ) -> "Config":
        def number(name, default, kind=float):
            try:
                return kind(environ.get(name) or default)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {environ[name]!r}") from None

        return cls(
            openai_api_key=environ.get("OPENAI_API_KEY") or None,
            openai_base_url=environ.get("OPENAI_BASE_URL") or None,
            openai_model=environ.get("OPENAI_MODEL") or cls.openai_model,
            openai_timeout_seconds=number("OPENAI_TIMEOUT_SECONDS", cls.openai_timeout_seconds),
            openai_max_retries=number("OPENAI_MAX_RETRIES", cls.openai_max_retries, int),
            assistants_file=Path(environ.get("ASSISTANTS_FILE") or cls.assistants_file),
            offline_token_delay=number("OFFLINE_TOKEN_DELAY", cls.offline_token_delay),
            max_waiting_runs=number("MAX_WAITING_RUNS", cls.max_waiting_runs, int),
        )


# ---------------------------------------------------------------- request bodies

def bad_request(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, detail)


async def read_json(request: Request, optional: bool = False) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
    if optional and not body.strip():
        return {}
    return parse_object(body)


def too_deep(text: str) -> bool:
    """Whether the JSON nests deeper than MAX_JSON_DEPTH. json.loads would recurse down to the interpreter's
    recursion limit, where a finalizer that a garbage collection runs at that moment has no stack left."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth, in_string, escaped = 0, False, False
    for char in text:
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = char == "\\", char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif char in "]}":
            depth -= 1
    return False


def parse_object(raw: bytes | str) -> dict:
    """The JSON object of a body or a frame; anything else is a 400 that says what is wrong."""
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode()  # JSON on the wire is UTF-8 (RFC 8259)
        text.encode()
    except UnicodeError:
        raise bad_request("malformed JSON: not UTF-8") from None
    if too_deep(text):
        raise bad_request(f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise bad_request("malformed JSON") from None
    # A lone surrogate escape ("\ud800") is valid JSON, but no UTF-8 encoder takes the string it decodes to
    # (the SDK's request body, JSONResponse, a WebSocket text frame): refuse it here, where it comes in.
    if "\\u" in text and not encodable(value):
        raise bad_request("malformed JSON: a lone surrogate escape (\\ud800-\\udfff)")
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return value


def encodable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def check_fields(body: dict, allowed: set[str]) -> None:
    if unknown := sorted(set(body) - allowed):
        raise bad_request(f"unknown field(s): {', '.join(unknown)}")


def text_field(body: dict, name: str, max_chars: int, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"{name}: required")
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name}: must be a string")
    if required and not value.strip():
        raise bad_request(f"{name}: must not be empty")
    if len(value) > max_chars:
        raise bad_request(f"{name}: at most {max_chars} characters")
    return value


def members_field(body: dict) -> list[str]:
    members = body.get("members", [])
    if not isinstance(members, list) or not all(isinstance(m, str) and m.strip() for m in members):
        raise bad_request("members: must be a list of non-empty strings (user ids)")
    members = list(dict.fromkeys(members))
    if len(members) > MAX_MEMBERS or len(json.dumps(members)) > METADATA_VALUE_MAX_CHARS:
        raise bad_request(f"members: at most {MAX_MEMBERS} and {METADATA_VALUE_MAX_CHARS} characters in all")
    return members


def assistants_field(body: dict, engine: Engine) -> list:
    """The assistants a request names (`assistant` or `assistants`), or the default one."""
    if "assistant" in body and "assistants" in body:
        raise bad_request("assistant, assistants: give one or the other")
    names = body.get("assistants")
    if "assistant" in body:
        names = [body["assistant"]]
    if names is None:
        names = [DEFAULT_ASSISTANT]
    if (not isinstance(names, list) or not 1 <= len(names) <= MAX_ASSISTANTS_PER_RUN
            or not all(isinstance(name, str) and name for name in names)):
        field = "assistant" if "assistant" in body else "assistants"
        raise bad_request(f"{field}: a non-empty assistant id or name (at most {MAX_ASSISTANTS_PER_RUN})")
    return [engine.store.get(name) for name in names]


def message_request(body: dict, engine: Engine) -> tuple[str, list]:
    """The content of a new message and the assistants to run after it (none with "run": false)."""
    check_fields(body, {"content", "assistant", "assistants", "run"})
    content = text_field(body, "content", MAX_CONTENT_CHARS, required=True)
    run = body.get("run", True)
    if not isinstance(run, bool):
        raise bad_request("run: must be true or false")
    return content, assistants_field(body, engine) if run else []


def run_request(body: dict, engine: Engine) -> list:
    check_fields(body, {"assistant", "assistants"})
    return assistants_field(body, engine)


# ---------------------------------------------------------------- REST routes

async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def list_assistants(request: Request) -> JSONResponse:
    return JSONResponse([assistant.as_json() for assistant in request.app.state.engine.store.list()])


async def create_assistant(request: Request) -> JSONResponse:
    body = await read_json(request)
    check_fields(body, {"name", "model", "instructions"})
    name = text_field(body, "name", MAX_NAME_CHARS, required=True)
    model = text_field(body, "model", MAX_NAME_CHARS) or request.app.state.config.openai_model
    instructions = text_field(body, "instructions", MAX_INSTRUCTIONS_CHARS) or ""
    assistant, created = await request.app.state.engine.store.create_or_load(name, model, instructions)
    return JSONResponse(assistant.as_json(), status.HTTP_201_CREATED if created else status.HTTP_200_OK)


async def get_assistant(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.engine.store.get(request.path_params["assistant"]).as_json())


async def create_thread(request: Request) -> JSONResponse:
    body = await read_json(request, optional=True)
    check_fields(body, {"members"})
    if len(request.user.sub) > METADATA_VALUE_MAX_CHARS:
        raise bad_request(f"the token's sub is too long to own a thread (at most {METADATA_VALUE_MAX_CHARS})")
    members = [member for member in members_field(body) if member != request.user.sub]
    thread = await request.app.state.engine.create_thread(request.user.sub, members)
    return JSONResponse(thread.as_json(), status.HTTP_201_CREATED)


async def visible_thread(request: Request):
    return await request.app.state.engine.visible_thread(request.path_params["thread_id"], request.user.sub)


async def get_thread(request: Request) -> JSONResponse:
    return JSONResponse((await visible_thread(request)).as_json())


async def list_messages(request: Request) -> JSONResponse:
    thread = await visible_thread(request)
    return JSONResponse(await request.app.state.engine.list_messages(thread.id))


async def post_message(request: Request):
    thread = await visible_thread(request)
    engine = request.app.state.engine
    content, assistants = message_request(await read_json(request), engine)

    def work(events):
        return engine.post_message(thread.id, request.user.sub, content, assistants, events)

    if wants_event_stream(request):
        return event_stream(request, thread.id, work)
    turn = await submit(request, thread.id, work)
    return JSONResponse(turn_json(turn, message=True), status.HTTP_201_CREATED)


async def start_runs(request: Request):
    thread = await visible_thread(request)
    engine = request.app.state.engine
    assistants = run_request(await read_json(request, optional=True), engine)

    def work(events):
        return engine.run_in_order(thread.id, assistants, events)

    if wants_event_stream(request):
        return event_stream(request, thread.id, work)
    turn = await submit(request, thread.id, work)
    if turn.failures and not turn.replies:
        raise turn.failures[0][1]
    return JSONResponse(turn_json(turn, message=False))


def turn_json(turn: Turn, message: bool) -> dict:
    body = {"replies": turn.replies, "errors": turn.errors}
    return {"message": turn.message} | body if message else body


def wants_event_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def thread_events(hub: Hub, thread_id: str, *more_sinks) -> ThreadEvents:
    """Events of runs on the thread, for every socket on it and for any further sink."""
    return ThreadEvents(functools.partial(hub.broadcast, thread_id), *more_sinks)


def queue_work(request: Request, thread_id: str, work, *more_sinks) -> asyncio.Future:
    events = thread_events(request.app.state.hub, thread_id, *more_sinks)
    return request.app.state.engine.queue.submit(thread_id, lambda: work(events))


async def submit(request: Request, thread_id: str, work) -> Turn:
    """Queue the work on the thread and wait for it; the work goes on if this request goes away."""
    return await asyncio.shield(queue_work(request, thread_id, work))


def event_stream(request: Request, thread_id: str, work) -> StreamingResponse:
    """The thread's events for this request's runs, as Server-Sent Events, ending after the last run."""
    finished = object()
    events_for_client: asyncio.Queue = asyncio.Queue()
    future = queue_work(request, thread_id, work, events_for_client.put_nowait)
    future.add_done_callback(lambda _: events_for_client.put_nowait(finished))

    async def frames():
        while True:
            try:
                event = await asyncio.wait_for(events_for_client.get(), SSE_KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event is finished:
                break
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
        if not future.cancelled() and isinstance(error := future.exception(), UpstreamError):
            failure = {"type": "error", "error": error.as_json()}
            yield f"event: error\ndata: {json.dumps(failure)}\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- WebSocket

async def thread_socket(websocket: WebSocket) -> None:
    engine, hub, user = websocket.app.state.engine, websocket.app.state.hub, websocket.scope["user"]
    try:
        thread = await engine.visible_thread(websocket.path_params["thread_id"], user.sub)
    except NotFound as error:
        return await websocket.send_denial_response(await not_found(websocket, error))
    except UpstreamError as error:
        return await websocket.send_denial_response(await upstream_failed(websocket, error))
    await websocket.accept(subprotocol=websocket.scope.get("auth_subprotocol"))
    connection = hub.join(thread.id, websocket)
    hub.send(connection, {"type": "thread.joined", "thread_id": thread.id, "clients": hub.clients(thread.id)})
    reader = asyncio.create_task(read_frames(websocket, connection, thread, user.sub, engine, hub))
    try:
        async with asyncio.timeout(max(0.0, user.expires_at - time.time())):
            await asyncio.wait([reader, connection.writer], return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        connection.close(WS_TOKEN_EXPIRED)
    finally:
        reader.cancel()
        await hub.leave(connection)
        (failure,) = await asyncio.gather(reader, return_exceptions=True)
        if isinstance(failure, Exception):
            log.error("reading frames from a socket failed", exc_info=failure)
    if connection.close_code is not None:
        # Best effort: a socket that stopped reading may never accept the close frame.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(connection.close_code), timeout=1)


async def read_frames(websocket: WebSocket, connection, thread, author: str, engine: Engine, hub: Hub) -> None:
    def reply_error(code: str, message: str) -> None:
        hub.send(connection, {"type": "error", "error": {"code": code, "message": message}})

    def report_unsaved_message(done: asyncio.Future) -> None:
        if not done.cancelled() and isinstance(error := done.exception(), UpstreamError):
            reply_error(error.code, error.message)

    events = thread_events(hub, thread.id)
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            reply_error("invalid_frame", "binary frames are not supported: send JSON text")
            continue
        if len(text) > MAX_FRAME_CHARS:
            reply_error("invalid_frame", f"frame over {MAX_FRAME_CHARS} characters")
            continue
        try:
            fields = parse_object(text)
            kind = fields.pop("type", None)
            if kind == "message":
                content, assistants = message_request(fields, engine)
                work = functools.partial(engine.post_message, thread.id, author, content, assistants, events)
            elif kind == "run":
                work = functools.partial(engine.run_in_order, thread.id, run_request(fields, engine), events)
            else:
                raise bad_request('type: must be "message" or "run"')
            engine.queue.submit(thread.id, work).add_done_callback(report_unsaved_message)
        except HTTPException as error:
            reply_error("invalid_frame", error.detail)
        except NotFound as error:
            reply_error("not_found", error.detail)
        except RunQueueFull:
            reply_error("queue_full", "too many runs are waiting on this thread; try again shortly")


# ---------------------------------------------------------------- errors

def error_response(status_code: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code, headers=headers)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    return error_response(error.status_code, error.detail, error.headers)


async def not_found(request: Request, error: NotFound) -> JSONResponse:
    return error_response(status.HTTP_404_NOT_FOUND, error.detail)


async def queue_full(request: Request, error: RunQueueFull) -> JSONResponse:
    return error_response(status.HTTP_429_TOO_MANY_REQUESTS, "too many runs are waiting on this thread",
                          {"Retry-After": str(error.retry_after)})


async def upstream_failed(request: Request, error: UpstreamError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after else None
    return error_response(error.status_code, error.message, headers)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


# ---------------------------------------------------------------- app

@contextlib.contextmanager
def close_sockets_before_server_stops(hub: Hub):
    """uvicorn closes the sockets still open with 1012 (service restart) at its next tick after
    SIGINT/SIGTERM, before the lifespan ends; close them first with 1001 (going away), which is what
    the service promises, and only then let uvicorn's own handler see the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    goodbyes: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def goodbye_then_stop(sig, frame):
        if endpoints := hub.close_all(status.WS_1001_GOING_AWAY):
            await asyncio.wait(endpoints, timeout=2)
        previous[sig](sig, frame)

    def start_goodbye(sig, frame):
        task = loop.create_task(goodbye_then_stop(sig, frame))
        goodbyes.add(task)
        task.add_done_callback(goodbyes.discard)

    def say_goodbye(sig, frame):
        loop.call_soon_threadsafe(start_goodbye, sig, frame)

    for sig, handler in previous.items():
        if callable(handler):
            signal.signal(sig, say_goodbye)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if callable(handler):
                signal.signal(sig, handler)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    config: Config = app.state.config
    async with contextlib.AsyncExitStack() as stack:
        api_key, base_url = config.openai_api_key, config.openai_base_url
        if not api_key and not base_url:
            app.state.offline_model = OfflineModel(token_delay=config.offline_token_delay)
            base_url = await stack.enter_async_context(serve_on_loopback(app.state.offline_model.app)) + "/v1"
            api_key = "offline"
            log.warning("No OPENAI_API_KEY: replies come from the built-in offline model (%s)", base_url)
        client = openai.AsyncOpenAI(
            api_key=api_key or "none", base_url=base_url, max_retries=config.openai_max_retries,
            timeout=openai.Timeout(config.openai_timeout_seconds, connect=5.0))
        stack.push_async_callback(client.close)
        store = AssistantStore(config.assistants_file)
        await store.create_or_load(DEFAULT_ASSISTANT, config.openai_model, DEFAULT_INSTRUCTIONS)
        engine = Engine(client, store, max_waiting_runs=config.max_waiting_runs)
        stack.push_async_callback(engine.aclose)
        hub = Hub()
        # Under uvicorn the sockets are closed before this runs (see close_sockets_before_server_stops);
        # this is for servers that end the lifespan with sockets still open.
        stack.callback(hub.close_all, status.WS_1001_GOING_AWAY)
        if app.state.jwt.secret_is_generated:
            log.warning("%s", demo_tokens_banner(app.state.jwt))
        app.state.engine, app.state.hub = engine, hub
        with close_sockets_before_server_stops(hub):
            yield


def create_app(config: Config | None = None, jwt_settings: JWTSettings | None = None) -> Starlette:
    jwt_settings = jwt_settings or JWTSettings.from_env()
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/assistants", list_assistants, methods=["GET"]),
            Route("/assistants", create_assistant, methods=["POST"]),
            Route("/assistants/{assistant}", get_assistant, methods=["GET"]),
            Route("/threads", create_thread, methods=["POST"]),
            Route("/threads/{thread_id}", get_thread, methods=["GET"]),
            Route("/threads/{thread_id}/messages", list_messages, methods=["GET"]),
            Route("/threads/{thread_id}/messages", post_message, methods=["POST"]),
            Route("/threads/{thread_id}/runs", start_runs, methods=["POST"]),
            WebSocketRoute("/threads/{thread_id}/ws", thread_socket),
        ],
        middleware=[Middleware(JWTAuthMiddleware, settings=jwt_settings)],
        exception_handlers={
            HTTPException: http_error,
            NotFound: not_found,
            RunQueueFull: queue_full,
            UpstreamError: upstream_failed,
            Exception: internal_error,
        },
        lifespan=lifespan,
    )
    app.state.config = config or Config.from_env()
    app.state.jwt = jwt_settings
    return app


class DeniedHandshakeNoise(logging.Filter):
    """uvicorn's default WebSocket protocol logs this error after every denial response (the HTTP
    401/404 a refused handshake gets), although the client received it; this app always either
    accepts or denies, so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def configure_logging() -> None:
    logging.getLogger("uvicorn.error").addFilter(DeniedHandshakeNoise())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


load_dotenv(".env")
configure_logging()
app = create_app()
