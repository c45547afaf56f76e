"""A built-in, OpenAI-compatible stand-in for what the service uses of /v1/responses and /v1/conversations.

It speaks the real wire format (the SDK parses it with strict validation), so the service, the
demo and the tests run the very code they would run against OpenAI, with no key and no network.
Replies are deterministic and labelled as offline. Tests make it misbehave through
`OfflineModel.fail_next`, a Python call: nothing in the service's own API can reach it.
"""

import asyncio
import contextlib
import itertools
import json
import re
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import uvicorn
from starlette import status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

FAULTS = (
    "server_error",  # 500 before streaming
    "unauthorized",  # 401 quoting part of the key, as the live API does
    "rate_limited",  # 429 with Retry-After before streaming
    "locked",  # 400 conversation_locked, as when another response is active
    "response_failed",  # streams a little, then response.failed
    "error_event",  # streams a little, then the live API's nested `error` event
    "disconnect",  # streams a little, then drops the connection
    "malformed",  # streams a little, then an event whose data is not JSON
)
ITEMS_PAGE_MAX = 100
ITEMS_PAGE_DEFAULT = 20


class WireJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, as the live API sends it, so any text the model holds can go out."""

    def render(self, content) -> bytes:
        return json.dumps(content).encode()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def openai_error(status_code: int, message: str, code: str | None = None, error_type: str = "invalid_request_error",
                 headers: dict | None = None) -> WireJSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return WireJSONResponse(body, status_code=status_code, headers=headers)


def message_item(role: str, text: str) -> dict:
    part_type = "output_text" if role == "assistant" else "input_text"
    part = {"type": part_type, "text": text}
    if role == "assistant":
        part |= {"annotations": [], "logprobs": []}
    return {"id": new_id("msg"), "type": "message", "status": "completed", "role": role, "content": [part]}


def tokens(text: str) -> list[str]:
    """How the model cuts a reply into deltas: word by word, each with the spaces after it."""
    return re.findall(r"\S+\s*", text)


def item_text(item: dict) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or () if isinstance(part, dict))


def input_items(raw_input) -> list[dict]:
    """The request's `input` as stored conversation items (plain text messages only)."""
    if raw_input is None:
        return []
    if isinstance(raw_input, str):
        return [message_item("user", raw_input)]
    return [message_item(item.get("role", "user"), item_text(item)) for item in raw_input if isinstance(item, dict)]


@dataclass
class Conversation:
    id: str
    created_at: int
    metadata: dict
    items: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}


class OfflineModel:
    def __init__(self, token_delay: float = 0.02):
        self.token_delay = token_delay
        self.conversations: dict[str, Conversation] = {}
        self.active_conversations: set[str] = set()
        self.responses_started = 0
        self.deltas_sent = 0
        self.locked_refusals = 0
        self._faults: deque[str] = deque()
        self.app = Starlette(routes=[
            Route("/v1/conversations", self.create_conversation, methods=["POST"]),
            Route("/v1/conversations/{id}", self.get_conversation, methods=["GET"]),
            Route("/v1/conversations/{id}/items", self.add_items, methods=["POST"]),
            Route("/v1/conversations/{id}/items", self.list_items, methods=["GET"]),
            Route("/v1/responses", self.create_response, methods=["POST"]),
        ])

    def fail_next(self, fault: str, times: int = 1) -> None:
        """Make the next `times` calls to /v1/responses fail in the given way (see FAULTS)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        self._faults.extend([fault] * times)

    @staticmethod
    async def _json(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError:
            body = None
        return body if isinstance(body, dict) else {}

    def _conversation(self, request: Request) -> Conversation | None:
        return self.conversations.get(request.path_params["id"])

    def _not_found(self, request: Request) -> WireJSONResponse:
        return openai_error(status.HTTP_404_NOT_FOUND, f"Conversation with id '{request.path_params['id']}' not found.")

    async def create_conversation(self, request: Request) -> WireJSONResponse:
        body = await self._json(request)
        conversation = Conversation(new_id("conv"), int(time.time()), body.get("metadata") or {})
        conversation.items.extend(input_items(body.get("items")))
        self.conversations[conversation.id] = conversation
        return WireJSONResponse(conversation.as_json())

    async def get_conversation(self, request: Request) -> WireJSONResponse:
        conversation = self._conversation(request)
        return WireJSONResponse(conversation.as_json()) if conversation else self._not_found(request)

    async def add_items(self, request: Request) -> WireJSONResponse:
        conversation = self._conversation(request)
        if not conversation:
            return self._not_found(request)
        added = input_items((await self._json(request)).get("items"))
        conversation.items.extend(added)
        return WireJSONResponse(self._page(added, has_more=False))

    async def list_items(self, request: Request) -> WireJSONResponse:
        conversation = self._conversation(request)
        if not conversation:
            return self._not_found(request)
        query = request.query_params
        try:
            limit = int(query.get("limit", ITEMS_PAGE_DEFAULT))
        except ValueError:
            limit = 0
        if not 1 <= limit <= ITEMS_PAGE_MAX:
            return openai_error(status.HTTP_400_BAD_REQUEST, f"limit must be between 1 and {ITEMS_PAGE_MAX}")
        items = conversation.items if query.get("order") == "asc" else conversation.items[::-1]
        if after := query.get("after"):
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        return WireJSONResponse(self._page(items[:limit], has_more=len(items) > limit))

    @staticmethod
    def _page(items: list[dict], has_more: bool) -> dict:
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else "",
                "last_id": items[-1]["id"] if items else "", "has_more": has_more}

    async def create_response(self, request: Request):
        body = await self._json(request)
        conversation_id = body.get("conversation")
        if isinstance(conversation_id, dict):
            conversation_id = conversation_id.get("id")
        conversation = self.conversations.get(conversation_id) if conversation_id else None
        if conversation_id and not conversation:
            return openai_error(status.HTTP_404_NOT_FOUND, f"Conversation with id '{conversation_id}' not found.")
        fault = self._faults.popleft() if self._faults else None
        if fault == "server_error":
            return openai_error(status.HTTP_500_INTERNAL_SERVER_ERROR, "The offline model was told to fail.",
                                error_type="server_error")
        if fault == "unauthorized":
            return openai_error(status.HTTP_401_UNAUTHORIZED, "Incorrect API key provided: sk-proj-****abcd.",
                                code="invalid_api_key")
        if fault == "rate_limited":
            return openai_error(status.HTTP_429_TOO_MANY_REQUESTS, "Rate limit reached (offline model).",
                                code="rate_limit_exceeded", error_type="requests", headers={"Retry-After": "1"})
        if fault == "locked" or (conversation and conversation.id in self.active_conversations):
            self.locked_refusals += fault != "locked"
            return openai_error(status.HTTP_400_BAD_REQUEST,
                                "Another process is currently operating on this conversation. Please retry in a few seconds.",
                                code="conversation_locked")
        self.responses_started += 1
        new_items = input_items(body.get("input"))
        seen = (conversation.items if conversation else []) + new_items
        reply = self.reply_text(body.get("metadata") or {}, seen)
        response = {
            "id": new_id("resp"), "object": "response", "created_at": time.time(), "model": body.get("model") or "offline",
            "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "status": "in_progress",
            "instructions": body.get("instructions"), "metadata": body.get("metadata") or {}, "error": None,
            "incomplete_details": None, "usage": None, "store": True,
            "conversation": {"id": conversation.id} if conversation else None,
        }
        if not body.get("stream"):
            message = message_item("assistant", reply)
            self._commit(conversation, new_items, message)
            return WireJSONResponse(response | {"status": "completed", "output": [message], "usage": self._usage(seen, reply)})
        if conversation:
            self.active_conversations.add(conversation.id)
        return StreamingResponse(self._stream(response, conversation, new_items, seen, reply, fault),
                                 media_type="text/event-stream")

    @staticmethod
    def reply_text(metadata: dict, seen: list[dict]) -> str:
        name = metadata.get("assistant_name") or "assistant"
        user_texts = [item_text(item) for item in seen if item.get("role") == "user"]
        heard = user_texts[-1] if user_texts else "nothing yet"
        return f"[offline model] {name} heard: {heard} ({len(seen)} items in this conversation)"

    @staticmethod
    def _usage(seen: list[dict], reply: str) -> dict:
        input_tokens = sum(len(item_text(item).split()) for item in seen)
        output_tokens = len(reply.split())
        return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens}

    def _commit(self, conversation: Conversation | None, new_items: list[dict], message: dict) -> None:
        if conversation:
            conversation.items.extend(new_items + [message])

    async def _stream(self, response, conversation, new_items, seen, reply, fault):
        sequence = itertools.count()
        item_id = new_id("msg")
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        in_progress = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}

        def frame(event_type: str, **fields) -> str:
            data = {"type": event_type, "sequence_number": next(sequence), **fields}
            return f"event: {event_type}\ndata: {json.dumps(data)}\n\n"

        try:
            yield frame("response.created", response=response)
            yield frame("response.in_progress", response=response)
            yield frame("response.output_item.added", output_index=0, item=in_progress)
            yield frame("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            for index, token in enumerate(tokens(reply)):
                if fault and index == 2:
                    async for tail in self._fail_midway(frame, response, fault):
                        yield tail
                    return
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                self.deltas_sent += 1
                yield frame("response.output_text.delta", **where, delta=token, logprobs=[])
            part = {"type": "output_text", "text": reply, "annotations": [], "logprobs": []}
            message = in_progress | {"status": "completed", "content": [part]}
            yield frame("response.output_text.done", **where, text=reply, logprobs=[])
            yield frame("response.content_part.done", **where, part=part)
            yield frame("response.output_item.done", output_index=0, item=message)
            self._commit(conversation, new_items, message)
            completed = response | {"status": "completed", "output": [message], "usage": self._usage(seen, reply)}
            yield frame("response.completed", response=completed)
        finally:
            if conversation:
                self.active_conversations.discard(conversation.id)

    @staticmethod
    async def _fail_midway(frame, response, fault):
        if fault == "response_failed":
            error = {"code": "server_error", "message": "The offline model was told to fail mid-response."}
            yield frame("response.failed", response=response | {"status": "failed", "error": error})
        elif fault == "error_event":
            error = {"type": "server_error", "code": "server_error", "param": None,
                     "message": "The offline model sent an error event mid-stream."}
            yield frame("error", error=error)
        elif fault == "malformed":
            yield 'event: response.output_text.delta\ndata: {"type": "response.output_text.del\n\n'
        else:  # disconnect: end the body without the events that close the response
            raise ConnectionAbortedError("offline model dropped the connection on purpose")


class _NoSignalServer(uvicorn.Server):
    """A uvicorn server running inside another app's event loop must leave its signals alone."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@contextlib.asynccontextmanager
async def serve_on_loopback(app, **config):
    """Serve an ASGI app on 127.0.0.1 at a free port for the duration of the block; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # log_config=None and log_level=None leave the logging of the process (maybe another uvicorn) alone.
    config = {"log_config": None, "log_level": None, "access_log": False, "lifespan": "off",
              "timeout_graceful_shutdown": 1} | config
    server = _NoSignalServer(uvicorn.Config(app, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
