"""The OpenAI helper: assistants, threads, messages and streamed runs on Responses + Conversations.

The vocabulary is the Assistants API's; the calls are today's: an assistant is configuration this
service keeps (name, model, instructions, sent on every call), a thread is a Conversation, a message
is a conversation item, and a run is one streamed Response on the conversation.
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai
from starlette import status

log = logging.getLogger("gainz")

THREAD_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
LOCKED_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
CACHE_SIZE = 10_000


class UpstreamError(Exception):
    """The upstream refused or failed; `status_code` is what the HTTP layer answers."""

    status_code = status.HTTP_502_BAD_GATEWAY

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after

    def as_json(self) -> dict:
        return {"code": self.code, "message": self.message}


class UpstreamRateLimited(UpstreamError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE


class UpstreamTimeout(UpstreamError):
    status_code = status.HTTP_504_GATEWAY_TIMEOUT


class NotFound(LookupError):
    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class RunQueueFull(Exception):
    retry_after = 1


def retry_after_seconds(headers) -> float | None:
    if milliseconds := headers.get("retry-after-ms"):
        with contextlib.suppress(ValueError):
            return float(milliseconds) / 1000
    with contextlib.suppress(TypeError, ValueError):
        return float(headers.get("retry-after"))
    return None


def upstream_error(error: Exception) -> UpstreamError:
    """Map an SDK exception to one of the three errors the HTTP layer knows. The upstream's own text
    is logged, never passed on: it can quote the service's key or other internals."""
    if isinstance(error, openai.APITimeoutError):
        return UpstreamTimeout("timeout", "the upstream timed out")
    if isinstance(error, openai.APIConnectionError):
        return UpstreamError("connection_error", "the connection to the upstream failed")
    if isinstance(error, openai.APIError):
        log.warning("upstream error %s: %s", error.code, error.message)
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


def clean_text(text: str) -> str:
    """Upstream text with any lone surrogate (valid in JSON, unencodable in UTF-8) replaced."""
    return text.encode("utf-8", "replace").decode()


@dataclass(frozen=True)
class Assistant:
    id: str
    name: str
    model: str
    instructions: str
    created_at: int

    def as_json(self) -> dict:
        return asdict(self)

    def ref(self) -> dict:
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True)
class Thread:
    id: str
    owner: str
    members: tuple[str, ...]
    created_at: int

    def visible_to(self, sub: str) -> bool:
        return sub == self.owner or sub in self.members

    def as_json(self) -> dict:
        return {"id": self.id, "owner": self.owner, "members": list(self.members), "created_at": self.created_at}


@dataclass
class Turn:
    """What one request on a thread produced: the user's message (if any), replies, failed runs."""

    message: dict | None = None
    replies: list[dict] = field(default_factory=list)
    failures: list[tuple[Assistant, UpstreamError]] = field(default_factory=list)

    @property
    def errors(self) -> list[dict]:
        return [{"assistant": assistant.ref()} | error.as_json() for assistant, error in self.failures]


class AssistantStore:
    """Assistants by id and by name, kept in a JSON file that is replaced atomically on every change."""

    def __init__(self, path: Path):
        self.path = path
        self._by_id: dict[str, Assistant] = {}
        self._save_lock = asyncio.Lock()
        if path.exists():
            try:
                records = json.loads(path.read_text())
                for record in records:
                    assistant = Assistant(**record)
                    self._by_id[assistant.id] = assistant
            except (ValueError, TypeError) as error:
                raise RuntimeError(f"{path} is not a valid assistants file ({error}); fix or remove it") from error

    def list(self) -> list[Assistant]:
        return sorted(self._by_id.values(), key=lambda assistant: (assistant.created_at, assistant.name))

    def _named(self, name: str) -> Assistant | None:
        return next((assistant for assistant in self._by_id.values() if assistant.name == name), None)

    def get(self, id_or_name: str) -> Assistant:
        found = self._by_id.get(id_or_name) or self._named(id_or_name)
        if found is None:
            raise NotFound(f"unknown assistant: {id_or_name!r}")
        return found

    async def create_or_load(self, name: str, model: str, instructions: str) -> tuple[Assistant, bool]:
        """The assistant called `name`, created if new; an existing one is returned unchanged."""
        if existing := self._named(name):
            return existing, False
        assistant = Assistant(f"asst_{secrets.token_hex(12)}", name, model, instructions, int(time.time()))
        self._by_id[assistant.id] = assistant
        await self._save()
        return assistant, True

    async def _save(self) -> None:
        async with self._save_lock:
            text = json.dumps([assistant.as_json() for assistant in self.list()], indent=2)
            await asyncio.to_thread(self._write_atomically, text)

    def _write_atomically(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=self.path.name, delete=False) as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(file.name, self.path)


class RunEventHandler:
    """Hooks a run calls while it streams, in this order; override the ones you need."""

    async def on_message_created(self, thread_id: str, message: dict) -> None: ...

    async def on_run_started(self, thread_id: str, run_id: str, assistant: Assistant) -> None: ...

    async def on_text_delta(self, thread_id: str, run_id: str, delta: str) -> None: ...

    async def on_run_completed(self, thread_id: str, run_id: str, message: dict) -> None: ...

    async def on_run_failed(self, thread_id: str, run_id: str, error: UpstreamError) -> None: ...


class ThreadEvents(RunEventHandler):
    """Turns the hooks into the service's event frames and hands each one to every sink."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def publish(self, event: dict) -> None:
        for sink in self.sinks:
            sink(event)

    async def on_message_created(self, thread_id, message):
        self.publish({"type": "message.created", "thread_id": thread_id, "message": message})

    async def on_run_started(self, thread_id, run_id, assistant):
        self.publish({"type": "run.started", "thread_id": thread_id, "run_id": run_id, "assistant": assistant.ref()})

    async def on_text_delta(self, thread_id, run_id, delta):
        self.publish({"type": "text.delta", "thread_id": thread_id, "run_id": run_id, "delta": delta})

    async def on_run_completed(self, thread_id, run_id, message):
        self.publish({"type": "run.completed", "thread_id": thread_id, "run_id": run_id, "message": message})

    async def on_run_failed(self, thread_id, run_id, error):
        self.publish({"type": "run.failed", "thread_id": thread_id, "run_id": run_id, "error": error.as_json()})


class ThreadQueue:
    """Runs the work submitted for one thread one at a time, in arrival order.

    The work runs in a task of its own, so a caller that goes away does not stop it.
    """

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._waiting: dict[str, deque] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._closed = False

    def submit(self, thread_id: str, work) -> asyncio.Future:
        if self._closed:
            raise RuntimeError("the run queue is closed")
        if len(self._waiting.get(thread_id, ())) >= self.max_waiting:
            raise RunQueueFull()
        waiting = self._waiting.setdefault(thread_id, deque())
        future = asyncio.get_running_loop().create_future()
        # A caller that left no longer reads the outcome; mark it read so it is not reported as lost.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        waiting.append((work, future))
        if thread_id not in self._workers:
            self._workers[thread_id] = asyncio.create_task(self._drain(thread_id, waiting))
        return future

    async def _drain(self, thread_id: str, waiting: deque) -> None:
        future = None
        try:
            while waiting:
                work, future = waiting.popleft()
                try:
                    result = await work()
                except Exception as error:
                    if not isinstance(error, (UpstreamError, NotFound)):
                        log.exception("work on thread %s failed", thread_id)
                    if not future.done():  # a caller that went away may have cancelled it
                        future.set_exception(error)
                else:
                    if not future.done():
                        future.set_result(result)
        finally:
            for pending in [future, *(queued for _, queued in waiting)]:
                if pending is not None and not pending.done():
                    pending.cancel()
            del self._waiting[thread_id], self._workers[thread_id]

    def busy_threads(self) -> int:
        return len(self._workers)

    async def aclose(self) -> None:
        self._closed = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        # A worker cancelled before its first step never ran its own clean-up.
        for waiting in self._waiting.values():
            for _, future in waiting:
                future.cancel()
        self._waiting.clear()
        self._workers.clear()


class Engine:
    def __init__(self, client: openai.AsyncOpenAI, store: AssistantStore, max_waiting_runs: int = 32):
        self.client = client
        self.store = store
        self.queue = ThreadQueue(max_waiting_runs)
        self._threads: OrderedDict[str, Thread] = OrderedDict()
        # Conversation items carry no author; remember who wrote the messages this process saw.
        self._attribution: OrderedDict[str, dict] = OrderedDict()

    @staticmethod
    def _remember(cache: OrderedDict, key: str, value) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)

    async def create_thread(self, owner: str, members: list[str]) -> Thread:
        metadata = {"owner": owner, "members": json.dumps(members)}
        with upstream_errors():
            conversation = await self.client.conversations.create(metadata=metadata)
        thread = Thread(conversation.id, owner, tuple(members), conversation.created_at)
        self._remember(self._threads, thread.id, thread)
        return thread

    async def get_thread(self, thread_id: str) -> Thread:
        if thread := self._threads.get(thread_id):
            return thread
        if not THREAD_ID_PATTERN.fullmatch(thread_id):
            raise NotFound("thread not found")
        try:
            with upstream_errors():
                conversation = await self.client.conversations.retrieve(thread_id)
        except UpstreamError as error:
            # The live API answers 400 for an id that is not a conversation id at all.
            if isinstance(error.__cause__, (openai.NotFoundError, openai.BadRequestError)):
                raise NotFound("thread not found") from None
            raise
        metadata = conversation.metadata or {}
        try:
            members = json.loads(metadata.get("members", "[]"))
        except ValueError:
            members = []
        if not metadata.get("owner"):
            raise NotFound("thread not found")
        thread = Thread(conversation.id, metadata["owner"], tuple(members), conversation.created_at)
        self._remember(self._threads, thread.id, thread)
        return thread

    async def visible_thread(self, thread_id: str, sub: str) -> Thread:
        """The thread, when `sub` may see it; otherwise the same NotFound as for no thread at all."""
        thread = await self.get_thread(thread_id)
        if not thread.visible_to(sub):
            raise NotFound("thread not found")
        return thread

    async def add_message(self, thread_id: str, author: str, content: str) -> dict:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": content}]}
        with upstream_errors():
            added = await self.client.conversations.items.create(thread_id, items=[item])
        message = {"id": added.data[0].id, "role": "user", "content": content, "author": author,
                   "created_at": int(time.time())}
        self._remember(self._attribution, message["id"], {"author": author, "created_at": message["created_at"]})
        return message

    async def list_messages(self, thread_id: str) -> list[dict]:
        """Every message of the thread, oldest first (the API pages 100 at a time, newest first by default)."""
        messages = []
        with upstream_errors():
            async for item in self.client.conversations.items.list(thread_id, order="asc", limit=100):
                if item.type == "message" and item.role in ("user", "assistant"):
                    text = clean_text("".join(getattr(part, "text", "") for part in item.content))
                    messages.append({"id": item.id, "role": item.role, "content": text}
                                    | self._attribution.get(item.id, {}))
        return messages

    async def run(self, thread_id: str, assistant: Assistant, events: RunEventHandler) -> dict:
        """One streamed run; returns the assistant's reply message, or raises UpstreamError."""
        run_id = f"run_{secrets.token_hex(12)}"
        await events.on_run_started(thread_id, run_id, assistant)
        try:
            reply = await self._stream_reply(thread_id, run_id, assistant, events)
        except UpstreamError as error:
            log.warning("run %s on thread %s failed: %s", run_id, thread_id, error.code)
            await events.on_run_failed(thread_id, run_id, error)
            raise
        await events.on_run_completed(thread_id, run_id, reply)
        return reply

    async def _stream_reply(self, thread_id, run_id, assistant, events) -> dict:
        for delay in (*LOCKED_RETRY_DELAYS, None):
            try:
                return await self._stream_once(thread_id, run_id, assistant, events)
            except UpstreamError as error:
                # Another process holds the conversation: the live API says so before streaming anything.
                if error.code != "conversation_locked" or delay is None:
                    raise
                await asyncio.sleep(delay)

    async def _stream_once(self, thread_id, run_id, assistant, events) -> dict:
        metadata = {"assistant_id": assistant.id, "assistant_name": assistant.name, "run_id": run_id}
        with upstream_errors():
            async with self.client.responses.stream(
                # No input: the conversation already holds the messages. Without truncation a long
                # thread would outgrow the model's context and fail every run from then on.
                model=assistant.model, instructions=assistant.instructions, conversation=thread_id,
                metadata=metadata, truncation="auto",
            ) as stream:
                async for event in stream:
                    if event.type == "response.output_text.delta":
                        await events.on_text_delta(thread_id, run_id, clean_text(event.delta))
                    elif event.type in ("response.failed", "response.incomplete"):
                        error = event.response.error
                        code = error.code if error else "incomplete"
                        log.warning("run %s failed upstream: %s", run_id, error.message if error else event.type)
                        raise UpstreamError(code, "the model failed to finish the reply")
                response = await stream.get_final_response()
        item = next((output for output in response.output if output.type == "message"), None)
        reply = {"id": item.id if item else response.id, "role": "assistant",
                 "content": clean_text(response.output_text), "assistant": assistant.ref(),
                 "created_at": int(time.time())}
        self._remember(self._attribution, reply["id"], {"assistant": assistant.ref(), "created_at": reply["created_at"]})
        return reply

    async def run_in_order(self, thread_id: str, assistants: list[Assistant], events: RunEventHandler) -> Turn:
        """Each assistant in turn; each sees the replies before it. A failed run is recorded, not raised."""
        turn = Turn()
        for assistant in assistants:
            try:
                turn.replies.append(await self.run(thread_id, assistant, events))
            except UpstreamError as error:
                turn.failures.append((assistant, error))
        return turn

    async def post_message(self, thread_id: str, author: str, content: str, assistants: list[Assistant],
                           events: RunEventHandler) -> Turn:
        message = await self.add_message(thread_id, author, content)
        await events.on_message_created(thread_id, message)
        turn = await self.run_in_order(thread_id, assistants, events)
        turn.message = message
        return turn

    async def aclose(self) -> None:
        await self.queue.aclose()
