"""The OpenAI helper: runs assistants on threads with the Responses API, streamed, with event handlers.

An assistant is configuration the service keeps (name, model, instructions). A thread and its
messages live in the service's own store. A run sends the thread's history as `input` to
`responses.create(stream=True)` and turns the stream into the service's events. Runs wait in the
store, so none is lost when a process stops; on each thread one process at a time (the one holding
the thread's lease in the store) runs them, in arrival order.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple

import anyio
import httpx2
import openai

from api import Assistant, AssistantRefOut, ClientTool, Message, RunError, ToolCall
from errors import Conflict, Unavailable, UpstreamError, UpstreamRateLimited, UpstreamTimeout
from store import LeaseLost, Run, Started, Store, Submission
from tools import call_server_tool, tool_spec

log = logging.getLogger("gainz")

ATTRIBUTION_NOTE = (
    "This conversation may be shared by several people and assistants. A message from a person starts "
    "with their user id in brackets, like [alice]. A reply from another assistant starts with its name, "
    "like [assistant poet]. Your own earlier replies carry no label; never add one to your reply.")
HISTORY_MESSAGES = 1000  # read at most this many of the latest messages; the context budget cuts further
TOOL_POLL_SECONDS = 2.0  # a run waiting for tool outputs also asks the store this often, in case a signal was lost


class ServiceStopping(Unavailable):
    message = "the service is shutting down; try again shortly"


def stored_failure(error: dict) -> UpstreamError:
    """The error a failed run recorded, as the kind it was raised as."""
    kind = {"timeout": UpstreamTimeout, "rate_limited": UpstreamRateLimited}.get(error["code"], UpstreamError)
    return kind(error["code"], error["message"], error.get("retry_after"))


def retry_after_seconds(headers) -> float | None:
    if milliseconds := headers.get("retry-after-ms"):
        with contextlib.suppress(ValueError):
            return float(milliseconds) / 1000
    with contextlib.suppress(TypeError, ValueError):
        return float(headers.get("retry-after"))
    return None


def upstream_error(error: Exception) -> UpstreamError:
    """Map an SDK exception to the errors the service reports. The upstream's own text goes to the
    log with its cause, never to a client: it can quote the key or other internals."""
    if isinstance(error, openai.APITimeoutError):
        log.warning("upstream timed out: %r", error.__cause__ or error)
        return UpstreamTimeout("timeout", "the upstream timed out")
    if isinstance(error, openai.APIConnectionError):
        log.warning("upstream unreachable: %r", error.__cause__ or error)
        return UpstreamError("connection_error", "the connection to the upstream failed")
    if isinstance(error, openai.APIStatusError):
        log.warning("upstream answered %s (%s): %s", error.status_code, error.code, error.message)
    elif isinstance(error, openai.APIError):
        log.warning("upstream sent an error event (%s): %s", error.code, error.message)
    if isinstance(error, openai.RateLimitError) and error.code != "insufficient_quota":
        return UpstreamRateLimited("rate_limited", "the upstream is rate limiting",
                                   retry_after=retry_after_seconds(error.response.headers))
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return UpstreamError("upstream_auth", "the upstream refused the service's credentials")
    if isinstance(error, openai.APIError):
        return UpstreamError(error.code or "upstream_error", "the upstream failed")
    log.exception("the upstream's stream could not be read")
    return UpstreamError("invalid_stream", "the upstream sent a stream that could not be read")


@contextlib.contextmanager
def upstream_errors():
    try:
        yield
    except UpstreamError:
        raise
    except Exception as error:  # the SDK's errors, and whatever a malformed stream makes its parser raise
        raise upstream_error(error) from error


def unreadable(event_type: str, field: str, value: Any) -> None:
    """An upstream event field that holds something the service cannot use: logged, and left out."""
    log.warning("upstream event %.80s: field %s cannot be read (%.80r); left out", event_type, field, value)


def token_usage(usage: Any) -> dict | None:
    """`{input_tokens, output_tokens}` from a response's usage, each a count or None; None if neither is."""
    counts = {}
    for name in ("input_tokens", "output_tokens"):
        value = getattr(usage, name, None)
        if value is not None and (type(value) is not int or not 0 <= value < 2**31):  # the store's INTEGER
            unreadable("response.completed", f"usage.{name}", value)
            value = None
        counts[name] = value
    return counts if any(value is not None for value in counts.values()) else None


def clean_text(text: str) -> str:
    """Upstream text with any lone surrogate (valid in JSON, unencodable in UTF-8) replaced."""
    return text.encode("utf-8", "replace").decode()


# ---------------------------------------------------------------- the stream, with a fast path for text deltas

DELTA_TYPES = ("response.output_text.delta", "response.refusal.delta")
# The events a run reads; the rest (response.created, content parts, the text done, ...) repeat what these say,
# and are not built at all.
READ_TYPES = frozenset((*DELTA_TYPES, "response.output_item.added", "response.output_item.done",
                        "response.completed", "response.failed", "response.incomplete", "error"))
LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class Fields(dict):
    """An event's JSON object, read by attribute as the SDK's own types are read: a field it left out reads as
    None, a nested object is Fields too. Building the SDK's type instead (`construct_type`, unvalidated) costs
    50 µs for an output item and 160 µs for response.completed, measured, for the same few fields."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return as_fields(self.get(name))


def as_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return Fields(value)
    if isinstance(value, list):
        return [as_fields(item) for item in value]
    return value


class TextDelta(NamedTuple):
    """A text or refusal delta, as read off the wire: the same fields as the SDK's delta events use."""

    type: str
    item_id: str | None
    delta: str


async def stream_events(client: openai.AsyncOpenAI, **request) -> AsyncGenerator:
    """The events of `client.responses.create(**request, stream=True)` that a run reads (READ_TYPES): text
    deltas as TextDelta, the others as Fields.

    Read at least as leniently as the SDK reads by default (it builds its types without validating them), so a
    server that leaves optional fields out (`logprobs`, `sequence_number`, usage details), adds its own, or
    sends event types newer than the SDK still works; a field it left out reads as None. Why not the SDK's
    types: building an event costs tens of µs, and deltas are nearly all of a stream (`json.loads` alone
    takes 3 µs). The request, its retries and its HTTP errors stay the SDK's (`with_streaming_response`).
    test_fast_stream.py holds both to the same events for the same bytes, errors included."""
    async with client.responses.with_streaming_response.create(**request, stream=True) as response:
        async for data in server_sent_data(response):
            if data.startswith("[DONE]"):
                return
            event = json.loads(data)
            if isinstance(event, dict) and event.get("error"):  # as the SDK does, for the nested error event
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else None
                raise openai.APIError(message if isinstance(message, str) and message
                                      else "An error occurred during streaming", response.http_response.request,
                                      body=error)
            if not isinstance(event, dict):
                log.warning("skipped an upstream event that is not a JSON object: %.80r", event)
                continue
            kind = event.get("type")
            if kind in DELTA_TYPES and type(event.get("delta")) is str:
                item_id = event.get("item_id")
                yield TextDelta(kind, item_id if type(item_id) is str else None, event["delta"])
                continue
            if isinstance(kind, str) and kind in READ_TYPES:
                yield Fields(event)


async def server_sent_data(response) -> AsyncGenerator[str, None]:
    """The `data` of each Server-Sent Event of a response. Lines end at CR, LF or CRLF only
    (`iter_lines` would also end them at U+2028, which a JSON string may hold as it is)."""
    buffer, data = b"", list[str]()
    try:
        async for chunk in chunks_then_none(response.iter_bytes()):
            buffer += chunk or b""
            # A CR at the end may be half of a CRLF, unless the body has ended.
            end = len(buffer) - (chunk is not None and buffer.endswith(b"\r"))
            *lines, rest = LINE_BREAK.split(buffer[:end])
            buffer = rest + buffer[end:]
            for line in lines:
                if not line:
                    if data:
                        yield "\n".join(data)
                        data = []
                    continue
                name, _, value = line.decode().partition(":")
                if name == "data":
                    data.append(value[1:] if value.startswith(" ") else value)
    except httpx2.TimeoutException as error:  # as the SDK maps a broken body
        raise openai.APITimeoutError(request=response.http_response.request) from error
    except (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream) as error:
        raise openai.APIConnectionError(request=response.http_response.request) from error


async def chunks_then_none(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes | None, None]:
    async for chunk in chunks:
        yield chunk
    yield None


class RunEventHandler:
    """Hooks a run calls while it streams, in this order; override the ones you need."""

    async def on_message_created(self, thread_id: str, message: Message) -> None: ...

    async def on_run_started(self, thread_id: str, run_id: str, assistant: AssistantRefOut) -> None: ...

    async def on_text_delta(self, thread_id: str, run_id: str, delta: str) -> None: ...

    async def on_run_completed(self, thread_id: str, run_id: str, message: Message | None,
                               usage: dict | None) -> None: ...

    async def on_run_failed(self, thread_id: str, run_id: str, error: UpstreamError, message: Message | None) -> None:
        ...

    async def on_run_cancelled(self, thread_id: str, run_id: str, by: str, message: Message | None) -> None: ...

    async def on_tool_called(self, thread_id: str, run_id: str, call: ToolCall) -> None: ...

    async def on_tool_result(self, thread_id: str, run_id: str, call_id: str, output: str) -> None: ...


def json_of(message: Message | None) -> dict | None:
    return message.model_dump(mode="json") if message is not None else None


class ThreadEvents(RunEventHandler):
    """Turns the hooks into the service's event frames (a message in them as the API answers it) and publishes
    each one on its thread."""

    def __init__(self, publish: Callable[[str, dict], None]):
        self.publish = publish

    async def on_message_created(self, thread_id, message):
        self.publish(thread_id, {"type": "message.created", "thread_id": thread_id,
                                 "message": message.model_dump(mode="json")})

    async def on_run_started(self, thread_id, run_id, assistant):
        self.publish(thread_id, {"type": "run.started", "thread_id": thread_id, "run_id": run_id,
                                 "assistant": assistant.model_dump(mode="json")})

    async def on_text_delta(self, thread_id, run_id, delta):
        self.publish(thread_id, {"type": "text.delta", "thread_id": thread_id, "run_id": run_id, "delta": delta})

    async def on_run_completed(self, thread_id, run_id, message, usage):
        self.publish(thread_id, {"type": "run.completed", "thread_id": thread_id, "run_id": run_id,
                                 "message": json_of(message), "usage": usage})

    async def on_run_failed(self, thread_id, run_id, error, message):
        self.publish(thread_id, {"type": "run.failed", "thread_id": thread_id, "run_id": run_id,
                                 "error": error.as_json(), "message": json_of(message)})

    async def on_run_cancelled(self, thread_id, run_id, by, message):
        self.publish(thread_id, {"type": "run.cancelled", "thread_id": thread_id, "run_id": run_id, "by": by,
                                 "message": json_of(message)})

    async def on_tool_called(self, thread_id, run_id, call):
        self.publish(thread_id, {"type": "tool.called", "thread_id": thread_id, "run_id": run_id}
                     | call.model_dump(mode="json"))

    async def on_tool_result(self, thread_id, run_id, call_id, output):
        self.publish(thread_id, {"type": "tool.result", "thread_id": thread_id, "run_id": run_id, "call_id": call_id,
                                 "output": output})


def input_item(message: Message, assistant: Assistant) -> dict:
    """A stored message as the assistant is to read it: who wrote it is in the text, since a Responses
    input message has no name field."""
    if message.assistant is None:  # a person's (a reply names its assistant)
        return {"type": "message", "role": "user", "content": f"[{message.author}] {message.content}"}
    if message.assistant.id == assistant.id:
        return {"type": "message", "role": "assistant", "content": message.content}
    return {"type": "message", "role": "user", "content": f"[assistant {message.assistant.name}] {message.content}"}


def input_items(message: Message, assistant: Assistant) -> list[dict]:
    """A stored message as input items: a tool call of the assistant's own is its call and its output; another
    assistant's is text (the functions are not this one's to call); a call never answered is left out (a
    model refuses a call without its output)."""
    call = message.tool_call
    if call is None or message.assistant is None:
        return [input_item(message, assistant)]
    if message.pending:
        return []
    if message.assistant.id == assistant.id:
        return [{"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": message.content}]
    return [{"type": "message", "role": "user", "content": f"[assistant {message.assistant.name} called "
             f"{call.name}({call.arguments}), which returned] {message.content}"}]


def request_body(run: Run, assistant: Assistant, history: list[dict], tools: list[dict]) -> dict:
    """A response's request, sent in the body as it is (`extra_body`): the SDK would first walk it through its
    typed transform, to give back the same JSON (test_fast_stream.py checks that it does), at 0.7 ms an input
    item, measured, and 80 µs for `model` alone (hashing the Literal of every model name it knows)."""
    return {"model": assistant.model, "instructions": f"{assistant.instructions}\n\n{ATTRIBUTION_NOTE}".lstrip(),
            # The service keeps the conversation itself and sends it every time: nothing needs to stay upstream.
            "store": False,
            "metadata": {"run_id": run.id, "assistant_id": assistant.id, "assistant_name": assistant.name},
            "input": history} | ({"tools": tools} if tools else {})


def tool_calls(messages: Iterable[Message]) -> list[ToolCall]:
    return [message.tool_call for message in messages if message.tool_call is not None]


def item_chars(item: dict) -> int:
    return sum(len(item.get(name) or "") for name in ("content", "arguments", "output"))


def total_usage(usage: dict | None, more: dict | None) -> dict | None:
    """The usage of two responses of one run (several when it calls tools)."""
    if usage is None or more is None:
        return usage or more
    return {name: None if usage[name] is None and more[name] is None else (usage[name] or 0) + (more[name] or 0)
            for name in usage}


def function_call(item: Any, calls: dict[str, dict]) -> None:
    """A function call of the response's output, if `item` is one, into `calls` (by call id)."""
    if getattr(item, "type", None) != "function_call":
        return
    call_id, name, arguments = (getattr(item, field, None) for field in ("call_id", "name", "arguments"))
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
        return unreadable("response.output_item.done", "function_call", item)
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {})
    calls.setdefault(call_id, {"call_id": call_id, "name": stored_text(name), "arguments": stored_text(arguments)})


def stored_text(text: str) -> str:
    """Upstream text as every database can store it: no lone surrogate, no NUL."""
    return clean_text(text).replace("\x00", "\ufffd")


class Engine:
    def __init__(self, client: openai.AsyncOpenAI, store: Store, events: RunEventHandler, runner_id: str,
                 context_chars: int = 60_000, lease_seconds: float = 10.0, max_attempts: int = 3,
                 tool_rounds: int = 8, tool_timeout: float = 600.0, tool_call_seconds: float = 10.0,
                 signal: Callable[[dict], None] = lambda message: None):
        self.client = client
        self.store = store
        self.events = events
        self.runner_id = runner_id
        self.signal = signal  # to every process (this one included): see on_signal
        self.context_chars = context_chars
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.tool_rounds = tool_rounds
        self.tool_timeout = tool_timeout
        self.tool_call_seconds = tool_call_seconds
        self._waiting_for_outputs: dict[str, asyncio.Event] = {}  # run id -> set when outputs may have come
        self._draining: dict[str, asyncio.Task] = {}
        self._kicked_again: set[str] = set()
        self._streams: dict[str, asyncio.Task] = {}  # run id -> the task reading its upstream stream
        self._cancelled_by: dict[str, str] = {}
        self._stopping = False
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------ accepting work

    async def submit(self, thread_id: str, sub: str, content: str | None,
                     assistants: list[Assistant], rounds: int = 1) -> Submission:
        """Store the message and queue its runs (the assistants in turn, `rounds` times over); they run in
        order, each reading the thread as it is when it starts, whoever waits for them or not."""
        if self._stopping:
            raise ServiceStopping()
        submission = await self.store.submit(thread_id, sub, content, assistants, rounds)
        if submission.message is not None:
            await self.events.on_message_created(thread_id, submission.message)
        if submission.runs:
            self.kick(thread_id)
        return submission

    async def outcome(self, submission: Submission) -> dict:
        """The replies and errors of a submission's runs (ended ones; a cancelled run lists its partial reply
        among the replies and itself among the errors)."""
        runs = await self.store.runs([run.id for run in submission.runs])
        replies = await self.store.messages([run.reply_id for run in runs if run.reply_id])
        errors = [RunError(assistant=run.assistant, code=run.error["code"], message=run.error["message"])
                  for run in runs if run.error]
        errors += [RunError(assistant=run.assistant, code="cancelled", message=f"stopped by {run.cancelled_by}")
                   for run in runs if run.status == "cancelled"]
        return {"replies": [replies[run.reply_id] for run in runs if run.reply_id in replies], "errors": errors,
                "failures": [stored_failure(run.error) for run in runs if run.error]}

    async def cancel(self, thread_id: str, run_id: str, by: str) -> Run:
        """Stop a run: a queued one ends here; an active one is stopped by the process running it, which the
        signal reaches (or its next lease renewal finds the request in the store). NotFound / Conflict as the
        store says."""
        run = await self.store.request_cancel(thread_id, run_id, by)
        if run.status == "active":
            self.signal({"kind": "cancel", "run_id": run_id, "by": by})
        if run.status == "cancelled":
            await self.events.on_run_cancelled(thread_id, run_id, by, None)
        for dropped in run.rounds_dropped:  # the rounds still to come of the same request
            await self.events.on_run_cancelled(thread_id, dropped, by, None)
        return run

    def stop_run(self, run_id: str, by: str) -> None:
        """A cancel for a run this process may be running: close its upstream stream now."""
        stream = self._streams.get(run_id)
        if stream is not None and run_id not in self._cancelled_by:
            self._cancelled_by[run_id] = by
            stream.cancel()

    async def answer_tool_calls(self, thread_id: str, run_id: str,
                                outputs: list[tuple[str, str]]) -> list[Message]:
        """Store client tools' outputs (the first answer to a call wins) and tell the thread. The process running
        the run must hear of it (see `outputs_arrived`); it also looks in the store now and then."""
        answered = await self.store.answer_tool_calls(thread_id, run_id, outputs)
        self.signal({"kind": "tool_outputs", "run_id": run_id})  # to whichever process runs the run
        for message in answered:
            if message.tool_call is not None:
                await self.events.on_tool_result(thread_id, run_id, message.tool_call.call_id, message.content)
        return answered

    def on_signal(self, message: dict) -> None:
        """A signal from any process (this one included); those of other kinds are the hub's."""
        kind = message.get("kind")
        if kind == "cancel":
            self.stop_run(message["run_id"], message["by"])
        elif kind == "tool_outputs":
            self.outputs_arrived(message["run_id"])
        elif kind == "thread.deleted":
            self.forget_thread(message["thread_id"])

    def outputs_arrived(self, run_id: str) -> None:
        """Tool outputs were stored for a run this process may be running: look at them now."""
        arrived = self._waiting_for_outputs.get(run_id)
        if arrived is not None:
            arrived.set()

    def forget_thread(self, thread_id: str) -> None:
        """The thread was deleted: stop running it here, upstream included; nothing more is stored."""
        drain = self._draining.get(thread_id)
        if drain is not None:
            drain.cancel()

    # ------------------------------------------------------------ running

    def kick(self, thread_id: str) -> None:
        """Make sure some process drains the thread's queue: this one, unless another holds the thread."""
        if self._stopping:
            return
        if thread_id in self._draining:
            self._kicked_again.add(thread_id)
            return
        self._draining[thread_id] = asyncio.create_task(self._drain(thread_id))

    async def _drain(self, thread_id: str) -> None:
        held, keeper = False, None
        try:
            while not self._stopping:
                self._kicked_again.discard(thread_id)  # a run queued from here on is found by the next look
                try:
                    started = await self.store.start_next_run(thread_id, self.runner_id, self.lease_seconds)
                except LeaseLost:
                    if held:
                        raise
                    return  # another process runs the thread; it looks for more when it lets go
                while started is not None:  # a run's end starts the next one, in the same transaction
                    held = True
                    keeper = keeper or asyncio.create_task(self._keep_lease(thread_id, asyncio.current_task()))
                    started = await self._execute(*started)
                held = False  # none pending (or stopping), and the thread let go: unless a run came in since, done
                if thread_id not in self._kicked_again:
                    return
        except LeaseLost:
            log.warning("lost the lease on thread %s to another process; it takes over", thread_id)
        except Exception:
            log.exception("running the queue of thread %s failed; it is retried shortly", thread_id)
        finally:
            if keeper is not None:
                keeper.cancel()
            try:
                if held:  # stopping, cut off or failed with runs left: let go, or the thread waits out its lease
                    await self._let_go(thread_id)
            finally:
                del self._draining[thread_id]

    async def _let_go(self, thread_id: str) -> None:
        release = asyncio.ensure_future(self.store.release_thread(thread_id, self.runner_id))
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            await release  # stopping: let go of the thread first
            raise
        except Exception:
            log.exception("letting go of thread %s failed; its lease runs out", thread_id)

    async def _keep_lease(self, thread_id: str, drain: asyncio.Task | None) -> None:
        try:
            while True:
                await asyncio.sleep(self.lease_seconds / 3)
                # The store also says which of its runs someone asked to stop: a signal may have been lost.
                asked = await self.store.renew_thread(thread_id, self.runner_id, self.lease_seconds)
                for run_id, by in asked.items():
                    self.stop_run(run_id, by)
        except LeaseLost:
            if drain is not None:
                drain.cancel()
        except Exception:
            log.exception("renewing the lease on thread %s failed", thread_id)

    async def _execute(self, run: Run, assistant: Assistant | None) -> Started | None:
        """Run it and record how it ended; returns the thread's next run, started in the same transaction (None:
        none pending, or stopping, and the thread let go)."""
        thread_id, events = run.thread_id, self.events
        if run.cancelled_by:
            _, started = await self._finish(run, "cancelled")
            await events.on_run_cancelled(thread_id, run.id, run.cancelled_by, None)
            return started
        await events.on_run_started(thread_id, run.id, run.assistant)
        if assistant is None or run.attempts > self.max_attempts:
            error = (UpstreamError("assistant_deleted", "the assistant was deleted before the run started")
                     if assistant is None else
                     UpstreamError("interrupted", f"the run was cut off {self.max_attempts} times; giving up"))
            _, started = await self._finish(run, "failed", error=error.as_record())
            await events.on_run_failed(thread_id, run.id, error, None)
            return started
        parts: list[str] = []
        stream = self._streams[run.id] = asyncio.create_task(self._stream(run, assistant, parts))
        try:
            usage = await stream
        except asyncio.CancelledError:
            by, this = self._cancelled_by.get(run.id), asyncio.current_task()
            if by is None or (this is not None and this.cancelling()):
                raise  # the service is stopping, or lost the thread: the run stays pending for the next runner
            message, started = await self._finish(run, "cancelled", reply="".join(parts) or None)
            await events.on_run_cancelled(thread_id, run.id, by, message)
        except UpstreamError as error:
            log.warning("run %s on thread %s failed: %s", run.id, thread_id, error.code)
            # What streamed before the failure was shown to every client: it is kept, marked as failed.
            message, started = await self._finish(run, "failed", reply="".join(parts) or None,
                                                  error=error.as_record())
            await events.on_run_failed(thread_id, run.id, error, message)
        else:
            message, started = await self._finish(run, "completed", reply="".join(parts), usage=usage)
            await events.on_run_completed(thread_id, run.id, message, usage)
        finally:
            del self._streams[run.id]
            self._cancelled_by.pop(run.id, None)
        return started

    async def _finish(self, run: Run, status: str, **outcome) -> tuple[Message | None, Started | None]:
        """Record the run's end and start the next one; stopping, let the thread go instead."""
        return await self.store.finish_run(run, self.runner_id, status, **outcome,
                                           next_lease=None if self._stopping else self.lease_seconds)

    async def history(self, thread_id: str, assistant: Assistant) -> list[dict]:
        """The thread's latest messages, oldest first, as many as fit the context budget."""
        items, budget = list[dict](), self.context_chars
        for message in await self.store.recent_messages(thread_id, HISTORY_MESSAGES):
            more = input_items(message, assistant)  # a call and its output go together, or not at all
            budget -= sum(map(item_chars, more))
            if items and budget < 0:
                break
            items.extend(reversed(more))
        return items[::-1]

    async def _stream(self, run: Run, assistant: Assistant, parts: list[str]) -> dict | None:
        """Stream the reply: while the model calls tools, get their outputs and ask it again with them, at most
        `tool_rounds` times. Returns the usage of all its responses, or raises UpstreamError."""
        tools = [spec for spec in map(tool_spec, assistant.tools) if spec is not None]
        client_tools = {tool.name for tool in assistant.tools if isinstance(tool, ClientTool)}
        # A run picked up again finds the calls it was waiting for; one on its first attempt has made none.
        calls = await self.store.tool_calls(run.id) if run.attempts > 1 else []
        usage = None
        for rounds in itertools.count():
            if any(call.pending for call in calls):
                await self._tool_outputs(run, calls)
            made: dict[str, dict] = {}
            usage = total_usage(usage, await self._respond(run, assistant, tools, parts, made))
            if not made:
                return usage
            if rounds >= self.tool_rounds:
                raise UpstreamError("tool_rounds", f"the model called tools more than {self.tool_rounds} times over")
            calls = await self.store.add_tool_calls(run, self.runner_id, [
                call | {"runs_on": "client" if call["name"] in client_tools else "server"} for call in made.values()])
            for call in tool_calls(calls):
                await self.events.on_tool_called(run.thread_id, run.id, call)
        raise AssertionError("unreachable")

    async def _tool_outputs(self, run: Run, calls: list[Message]) -> None:
        """Run the calls that run here; wait until someone, on any process, has answered the others."""
        pending = tool_calls(call for call in calls if call.pending)
        await asyncio.gather(*(self._call_server_tool(run, call) for call in pending if call.runs_on == "server"))
        if all(call.runs_on == "server" for call in pending):
            return
        arrived = self._waiting_for_outputs[run.id] = asyncio.Event()
        try:
            async with asyncio.timeout(self.tool_timeout):
                while True:
                    arrived.clear()
                    if self._stopping:  # the run stays pending in the store, and waits again at the next start
                        raise asyncio.CancelledError()
                    if not any(call.pending for call in await self.store.tool_calls(run.id)):
                        return
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(TOOL_POLL_SECONDS):
                            await arrived.wait()
        except TimeoutError:
            await self._close_tool_calls(run, "error: no output came in time; the run has ended")
            raise UpstreamError("tool_timeout", f"no output came for a tool call within {self.tool_timeout:g} s") \
                from None
        except asyncio.CancelledError:
            if run.id in self._cancelled_by:
                await self._close_tool_calls(run, "error: the run was cancelled")
            raise
        finally:
            del self._waiting_for_outputs[run.id]

    async def _call_server_tool(self, run: Run, call: ToolCall) -> None:
        output = clean_text(await call_server_tool(call.name, call.arguments, self.tool_call_seconds))
        with contextlib.suppress(Conflict):  # answered before a restart: the first answer stands
            await self.store.answer_tool_calls(run.thread_id, run.id, [(call.call_id, output)], runs_on="server")
            await self.events.on_tool_result(run.thread_id, run.id, call.call_id, output)

    async def _close_tool_calls(self, run: Run, output: str) -> None:
        for call in tool_calls(await self.store.close_tool_calls(run.id, output)):
            await self.events.on_tool_result(run.thread_id, run.id, call.call_id, output)

    async def _respond(self, run: Run, assistant: Assistant, tools: list[dict], parts: list[str],
                       calls: dict[str, dict]) -> dict | None:
        """Stream one response, its deltas into `parts` and out as events, its function calls into `calls`
        (by call id); returns the usage, or raises UpstreamError. Commentary (a message whose phase is not
        the final answer) is not the reply."""
        body = request_body(run, assistant, await self.history(run.thread_id, assistant), tools)
        not_the_reply: set[str | None] = set()
        completed, usage = False, None
        with upstream_errors():
            events = stream_events(self.client, extra_body=body)
            async with contextlib.aclosing(events):
                async for event in events:
                    kind = event.type
                    if kind in DELTA_TYPES:
                        if not isinstance(event.delta, str):
                            unreadable(kind, "delta", event.delta)
                        elif event.item_id not in not_the_reply:
                            delta = clean_text(event.delta)
                            parts.append(delta)
                            await self.events.on_text_delta(run.thread_id, run.id, delta)
                    elif kind == "response.output_item.added":
                        item = event.item
                        if getattr(item, "type", None) == "message" and getattr(item, "phase", None) not in (
                                None, "final_answer"):
                            not_the_reply.add(getattr(item, "id", None))
                    elif kind == "response.output_item.done":
                        function_call(event.item, calls)
                    elif kind == "response.completed":
                        # Not a return: the body ends right after, and read to its end the connection goes back
                        # to the SDK's pool for the next run instead of being closed.
                        completed, usage = True, token_usage(getattr(event.response, "usage", None))
                        for item in getattr(event.response, "output", None) or ():  # for servers that skip item.done
                            function_call(item, calls)
                    elif kind in ("response.failed", "response.incomplete"):
                        error = getattr(event.response, "error", None)
                        code, message = getattr(error, "code", None), getattr(error, "message", None)
                        log.warning("run %s failed upstream: %s", run.id, message or kind)
                        raise UpstreamError(code if isinstance(code, str) and code else "incomplete",
                                            "the model failed to finish the reply")
                    elif kind == "error":  # the spec's flat shape; the nested one raises APIError
                        code = event.code if isinstance(event.code, str) and event.code else "upstream_error"
                        log.warning("run %s: upstream error event %s: %s", run.id, code, event.message)
                        raise UpstreamError(code, "the upstream failed")
        if not completed:
            raise UpstreamError("incomplete_stream", "the upstream's stream ended before the reply was complete")
        return usage

    # ------------------------------------------------------------ the life of the engine

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Pick up threads whose runs wait for a runner: left by a process that stopped, or queued while
        this one started."""
        while True:
            try:
                for thread_id in await self.store.threads_waiting_for_a_runner():
                    self.kick(thread_id)
            except Exception:
                log.exception("looking for runs to pick up failed")
            await asyncio.sleep(self.lease_seconds / 2)

    async def stop(self, grace_seconds: float) -> None:
        """Take no new runs; let active ones finish within the grace period, then cut them off (they stay
        pending in the store and run again at the next start, or on another process at once)."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for arrived in self._waiting_for_outputs.values():  # runs waiting for tool outputs stop waiting now
            arrived.set()
        drains = list(self._draining.values())
        if drains:
            _, late = await asyncio.wait(drains, timeout=grace_seconds)
            for drain in late:
                drain.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._sweeper is not None:
            await asyncio.gather(self._sweeper, return_exceptions=True)

    def active_runs(self) -> int:
        return len(self._streams)

