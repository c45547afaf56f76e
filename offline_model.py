"""A built-in, OpenAI-compatible stand-in for `/v1/responses`: the one upstream route the service uses.

It speaks the real wire format (the SDK parses it with strict validation), so the service, the demo
and the tests run the very code they would run against OpenAI, with no key and no network. It keeps
nothing between calls, like a Responses server called with `store: false`. Replies are
deterministic and labelled as offline. Tests make it misbehave through `OfflineModel.fail_next`, a
Python call: nothing in the service's own API can reach it.

Tools: when the request offers functions, `call <name>` in the latest user message, optionally followed
by a JSON object of arguments, makes it call that function (several such phrases: parallel calls in one
response). Once the outputs come back (`function_call_output` items after that message), it answers
with text that quotes each one.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import re
import secrets
import socket
import time
from collections import deque

import uvicorn
from starlette import status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

FAULTS = (
    "server_error",  # 500 before streaming
    "unauthorized",  # 401 quoting part of the key, as the live API does
    "rate_limited",  # 429 with Retry-After before streaming
    "hang",  # accepts the request and never answers
    "response_failed",  # streams a little, then response.failed
    "incomplete",  # streams a little, then response.incomplete
    "error_event",  # streams a little, then an `error` event nested as the live API sends it
    "flat_error_event",  # streams a little, then an `error` event flat as the spec defines it
    "disconnect",  # streams a little, then drops the connection
    "malformed",  # streams a little, then an event whose data is not JSON
    "refusal",  # the reply is a refusal part
    "commentary",  # a commentary message first, then the final answer
)
FAULTS_AFTER_TEXT = ("response_failed", "incomplete", "error_event", "flat_error_event", "disconnect", "malformed")
RECEIVED_KEPT = 100
CALL_PHRASE = re.compile(r"\bcall\s+([A-Za-z0-9_-]{1,64})")


class WireJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, as the live API sends it, so any text the model holds can go out."""

    def render(self, content) -> bytes:
        return json.dumps(content).encode()


def numbered_frames():
    """frame(type, **fields) -> one Server-Sent Event of a response's stream, numbered in order, as OpenAI sends it."""
    sequence = itertools.count()

    def frame(event_type: str, **fields) -> str:
        data = {"type": event_type, "sequence_number": next(sequence), **fields}
        return f"event: {event_type}\ndata: {json.dumps(data)}\n\n"

    return frame


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def openai_error(status_code: int, message: str, code: str | None = None, error_type: str = "invalid_request_error",
                 headers: dict | None = None) -> WireJSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return WireJSONResponse(body, status_code=status_code, headers=headers)


def tokens(text: str) -> list[str]:
    """How the model cuts a reply into deltas: word by word, each with the spaces after it."""
    return re.findall(r"\S+\s*", text)


def item_text(item: dict) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or () if isinstance(part, dict))


def input_items(raw_input) -> list[dict]:
    """The request's `input` as message items (a string is one user message)."""
    if isinstance(raw_input, str):
        return [{"role": "user", "content": raw_input}]
    return [item for item in raw_input or () if isinstance(item, dict)]


def requested_calls(text: str, names: set[str]) -> list[tuple[str, str]]:
    """The `call <name> {json}?` phrases of a text that name one of `names`: (name, arguments as JSON text)."""
    calls = []
    for match in CALL_PHRASE.finditer(text):
        if match.group(1) not in names:
            continue
        arguments: object = {}
        rest = text[match.end():].lstrip()
        if rest.startswith("{"):
            with contextlib.suppress(ValueError):
                arguments = json.JSONDecoder().raw_decode(rest)[0]
        calls.append((match.group(1), json.dumps(arguments if isinstance(arguments, dict) else {})))
    return calls


def function_tools(raw_tools) -> list[dict]:
    """The request's function tools, as a response echoes them."""
    return [{"type": "function", "name": tool["name"], "description": tool.get("description"),
             "parameters": tool.get("parameters"), "strict": tool.get("strict")}
            for tool in raw_tools or () if isinstance(tool, dict) and tool.get("type") == "function"
            and isinstance(tool.get("name"), str)]


class OfflineModel:
    def __init__(self, token_delay: float = 0.02):
        self.token_delay = token_delay
        self.responses_started = 0
        self.deltas_sent = 0
        self.streams_open = 0
        self.received: deque[dict] = deque(maxlen=RECEIVED_KEPT)  # request bodies, newest last
        self._faults: deque[str] = deque()
        self.app = Starlette(routes=[Route("/v1/responses", self.create_response, methods=["POST"])])

    def fail_next(self, fault: str, times: int = 1) -> None:
        """Make the next `times` calls to /v1/responses go wrong in the given way (see FAULTS)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        self._faults.extend([fault] * times)

    @staticmethod
    def reply_text(metadata: dict, seen: list[dict]) -> str:
        name = metadata.get("assistant_name") or "assistant"
        user_texts = [item_text(item) for item in seen if item.get("role") == "user"]
        heard = user_texts[-1] if user_texts else "nothing yet"
        count = f"{len(seen)} message" if len(seen) == 1 else f"{len(seen)} messages"
        return f"[offline model] {name} heard: {heard} ({count} in its context)"

    @staticmethod
    def outputs_text(metadata: dict, seen: list[dict], outputs: list[dict]) -> str:
        name = metadata.get("assistant_name") or "assistant"
        called = {item.get("call_id"): item.get("name") for item in seen if item.get("type") == "function_call"}
        quoted = "; ".join(f"{called.get(item.get('call_id'), 'a tool')} returned {json.dumps(item.get('output'))}"
                           for item in outputs)
        return f"[offline model] {name} got the tool outputs: {quoted}"

    async def create_response(self, request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError:
            return openai_error(status.HTTP_400_BAD_REQUEST, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not body.get("model"):
            return openai_error(status.HTTP_400_BAD_REQUEST, "Missing required parameter: 'model'.")
        self.received.append(body)
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
        if fault == "hang":
            await asyncio.Event().wait()
        self.responses_started += 1
        seen = input_items(body.get("input"))
        tools = function_tools(body.get("tools"))
        # What the latest user message asked for: the tools' outputs, once they are in, else the calls, if any.
        last_user = max((index for index, item in enumerate(seen) if item.get("role") == "user"), default=-1)
        outputs = [item for item in seen[last_user + 1:] if item.get("type") == "function_call_output"]
        calls = [] if outputs or last_user < 0 else requested_calls(item_text(seen[last_user]),
                                                                   {tool["name"] for tool in tools})
        metadata = body.get("metadata") or {}
        reply = self.outputs_text(metadata, seen, outputs) if outputs else self.reply_text(metadata, seen)
        response = {
            "id": new_id("resp"), "object": "response", "created_at": time.time(), "model": body["model"],
            "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": tools, "status": "in_progress",
            "instructions": body.get("instructions"), "metadata": body.get("metadata") or {}, "error": None,
            "incomplete_details": None, "usage": None, "store": bool(body.get("store", True)),
            "temperature": 1.0, "top_p": 1.0,
        }
        usage = self._usage(seen, "".join(arguments for _, arguments in calls) if calls else reply)
        if not body.get("stream"):
            output = ([self._function_call(new_id("fc"), name, arguments, "completed") for name, arguments in calls]
                      or [self._message(new_id("msg"), reply, "output_text", "completed")])
            return WireJSONResponse(response | {"status": "completed", "output": output, "usage": usage})
        if calls:
            return StreamingResponse(self._stream_calls(response, calls, usage), media_type="text/event-stream")
        return StreamingResponse(self._stream(response, reply, usage, fault), media_type="text/event-stream")

    @staticmethod
    def _usage(seen: list[dict], reply: str) -> dict:
        input_tokens = sum(len(item_text(item).split()) for item in seen)
        output_tokens = len(reply.split())
        return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens}

    @staticmethod
    def _message(item_id: str, text: str | None, part_type: str, item_status: str, phase: str | None = None) -> dict:
        item: dict = {"id": item_id, "type": "message", "status": item_status, "role": "assistant", "content": []}
        if phase is not None:
            item["phase"] = phase
        if text is not None:
            item["content"] = [OfflineModel._part(part_type, text)]
        return item

    @staticmethod
    def _function_call(item_id: str, name: str, arguments: str, item_status: str, call_id: str | None = None) -> dict:
        return {"id": item_id, "type": "function_call", "call_id": call_id or new_id("call"), "name": name,
                "arguments": arguments, "status": item_status}

    async def _stream_calls(self, response, calls, usage):
        """A response that calls functions, as OpenAI streams it: each call item, its arguments in deltas."""
        frame = numbered_frames()
        self.streams_open += 1
        try:
            yield frame("response.created", response=response)
            yield frame("response.in_progress", response=response)
            output: list[dict] = []
            for index, (name, arguments) in enumerate(calls):
                item = self._function_call(new_id("fc"), name, "", "in_progress")
                where = {"item_id": item["id"], "output_index": index}
                yield frame("response.output_item.added", output_index=index, item=item)
                half = len(arguments) // 2
                for delta in filter(None, (arguments[:half], arguments[half:])):
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                    yield frame("response.function_call_arguments.delta", **where, delta=delta)
                yield frame("response.function_call_arguments.done", **where, name=name, arguments=arguments)
                done = item | {"arguments": arguments, "status": "completed"}
                output.append(done)
                yield frame("response.output_item.done", output_index=index, item=done)
            yield frame("response.completed", response=response | {"status": "completed", "output": output,
                                                                   "usage": usage})
        finally:
            self.streams_open -= 1

    @staticmethod
    def _part(part_type: str, text: str) -> dict:
        if part_type == "refusal":
            return {"type": "refusal", "refusal": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    async def _stream(self, response, reply, usage, fault):
        frame = numbered_frames()
        self.streams_open += 1
        try:
            yield frame("response.created", response=response)
            yield frame("response.in_progress", response=response)
            output: list[dict] = []
            if fault == "commentary":
                async for text in self._stream_message(frame, output, "Let me think about that. ", "commentary"):
                    yield text
            part_type = "refusal" if fault == "refusal" else "output_text"
            async for text in self._stream_message(frame, output, reply, "final_answer" if fault == "commentary"
                                                   else None, part_type, fault):
                yield text
            if fault in ("response_failed", "incomplete", "error_event", "flat_error_event", "malformed",
                         "disconnect"):
                return
            yield frame("response.completed", response=response | {"status": "completed", "output": output,
                                                                   "usage": usage})
        finally:
            self.streams_open -= 1

    async def _stream_message(self, frame, output, text, phase, part_type="output_text", fault=None):
        index = len(output)
        item_id = new_id("msg")
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        yield frame("response.output_item.added", output_index=index,
                    item=self._message(item_id, None, part_type, "in_progress", phase))
        yield frame("response.content_part.added", **where, part=self._part(part_type, ""))
        delta_type = "response.refusal.delta" if part_type == "refusal" else "response.output_text.delta"
        for position, token in enumerate(tokens(text)):
            if position == 2 and fault in ("response_failed", "incomplete", "error_event", "flat_error_event",
                                           "malformed", "disconnect"):
                yield self._fail_midway(frame, fault, output)
                return
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            self.deltas_sent += 1
            extra: dict = {} if part_type == "refusal" else {"logprobs": []}
            yield frame(delta_type, **where, delta=token, **extra)
        if part_type == "refusal":
            yield frame("response.refusal.done", **where, refusal=text)
        else:
            yield frame("response.output_text.done", **where, text=text, logprobs=[])
        yield frame("response.content_part.done", **where, part=self._part(part_type, text))
        message = self._message(item_id, text, part_type, "completed", phase)
        output.append(message)
        yield frame("response.output_item.done", output_index=index, item=message)

    @staticmethod
    def _fail_midway(frame, fault, output) -> str:
        if fault == "response_failed":
            error = {"code": "server_error", "message": "The offline model was told to fail mid-response."}
            return frame("response.failed", response={"status": "failed", "error": error} | _RESPONSE_STUB)
        if fault == "incomplete":
            return frame("response.incomplete", response={"status": "incomplete", "error": None,
                                                          "incomplete_details": {"reason": "max_output_tokens"}}
                         | _RESPONSE_STUB)
        if fault == "error_event":
            return frame("error", error={"type": "server_error", "code": "server_error", "param": None,
                                         "message": "The offline model sent an error event mid-stream."})
        if fault == "flat_error_event":
            return frame("error", code="server_error", param=None,
                         message="The offline model sent a flat error event mid-stream.")
        if fault == "malformed":
            return 'event: response.output_text.delta\ndata: {"type": "response.output_text.del\n\n'
        raise ConnectionAbortedError("offline model dropped the connection on purpose")


_RESPONSE_STUB = {"id": "resp_stub", "object": "response", "created_at": 0.0, "model": "offline", "output": [],
                  "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": 1.0,
                  "top_p": 1.0, "metadata": {}, "instructions": None, "incomplete_details": None, "usage": None}


class _QuietH11Protocol(H11Protocol):
    """HTTP without access-log lines for this server's own requests. (uvicorn's `access_log=False`
    would empty the process-wide `uvicorn.access` logger, silencing the service's access log too.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.access_log = False


class _NoSignalServer(uvicorn.Server):
    """A uvicorn server running inside another app's event loop must leave its signals alone."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class _NotFromTask(logging.Filter):
    """Drops what a given task logs: an in-process server's "Started server process" and "Shutting down"
    lines would read as the service's own."""

    def __init__(self, task: asyncio.Task):
        super().__init__()
        self.task = task

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return asyncio.current_task() is not self.task
        except RuntimeError:  # logged outside any event loop
            return True


@contextlib.asynccontextmanager
async def serve_on_loopback(app, **config):
    """Serve an ASGI app on 127.0.0.1 at a free port for the duration of the block; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # log_config=None and log_level=None leave the logging of the process (maybe another uvicorn) alone.
    config = {"log_config": None, "log_level": None, "http": _QuietH11Protocol, "lifespan": "off",
              "timeout_graceful_shutdown": 1} | config
    server = _NoSignalServer(uvicorn.Config(app, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    quiet = _NotFromTask(task)
    logging.getLogger("uvicorn.error").addFilter(quiet)
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
        logging.getLogger("uvicorn.error").removeFilter(quiet)
