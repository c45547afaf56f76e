"""Tests for assistants.py: AssistantStore, ThreadQueue and the Engine, driving the real openai SDK
over real HTTP (uvicorn on 127.0.0.1) against the offline model."""

import asyncio
import json
import time
from dataclasses import dataclass

import openai
import pytest

import assistants
from assistants import (AssistantStore, Engine, NotFound, RunEventHandler, RunQueueFull, ThreadQueue,
                        UpstreamError, UpstreamRateLimited, UpstreamTimeout)
from offline_model import OfflineModel, message_item, serve_on_loopback

pytestmark = pytest.mark.anyio


class RequestLog:
    """An ASGI wrapper around the offline model that records each request it receives."""

    def __init__(self, app):
        self.app, self.requests = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.requests.append((scope["method"], scope["path"], scope["query_string"].decode()))
        await self.app(scope, receive, send)

    def queries(self, method: str, path_end: str) -> list[str]:
        return [query for m, path, query in self.requests if m == method and path.endswith(path_end)]


def sdk_client(url: str, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="offline", base_url=url + "/v1", max_retries=0,
                              _strict_response_validation=True, **options)


@dataclass
class Upstream:
    model: OfflineModel
    log: RequestLog
    url: str
    engine: Engine

    async def assistant(self, name: str):
        return (await self.engine.store.create_or_load(name, "offline-model", f"You are {name}."))[0]

    async def thread_with_message(self, content: str = "hello there") -> str:
        thread = await self.engine.create_thread("alice", ["bob"])
        await self.engine.add_message(thread.id, "alice", content)
        return thread.id


@pytest.fixture
async def upstream(tmp_path):
    model = OfflineModel(token_delay=0.0)
    request_log = RequestLog(model.app)
    async with serve_on_loopback(request_log) as url:
        client = sdk_client(url)
        engine = Engine(client, AssistantStore(tmp_path / "assistants.json"))
        try:
            yield Upstream(model, request_log, url, engine)
        finally:
            await engine.aclose()
            await client.close()


class Recorder(RunEventHandler):
    """Records every hook call as (hook, payload); notes the model's progress at the first delta."""

    def __init__(self, model: OfflineModel | None = None):
        self.model, self.events = model, []
        self.deltas_sent_at_first_delta = None
        self.first_delta, self.completed = asyncio.Event(), asyncio.Event()

    async def on_message_created(self, thread_id, message):
        self.events.append(("message_created", message))

    async def on_run_started(self, thread_id, run_id, assistant):
        self.events.append(("run_started", assistant.name))

    async def on_text_delta(self, thread_id, run_id, delta):
        if not self.first_delta.is_set() and self.model:
            self.deltas_sent_at_first_delta = self.model.deltas_sent
        self.first_delta.set()
        self.events.append(("delta", delta))

    async def on_run_completed(self, thread_id, run_id, message):
        self.events.append(("run_completed", message))
        self.completed.set()

    async def on_run_failed(self, thread_id, run_id, error):
        self.events.append(("run_failed", error))

    def hooks(self) -> list[str]:
        """Hook names in order, with each run of consecutive deltas collapsed into one 'deltas'."""
        names = ["deltas" if hook == "delta" else hook for hook, _ in self.events]
        return [name for i, name in enumerate(names) if not (name == "deltas" and i and names[i - 1] == "deltas")]

    def payloads(self, hook: str) -> list:
        return [payload for name, payload in self.events if name == hook]


# AssistantStore

async def test_create_or_load_is_idempotent_and_survives_a_restart(tmp_path):
    path = tmp_path / "assistants.json"
    store = AssistantStore(path)
    helper, created = await store.create_or_load("helper", "model-a", "Be helpful.")
    again, created_again = await store.create_or_load("helper", "model-b", "Be rude.")
    other, _ = await store.create_or_load("other", "model-a", "")
    assert (created, created_again) == (True, False)
    assert again == helper and again.model == "model-a" and again.instructions == "Be helpful."
    restarted = AssistantStore(path)
    assert [record["name"] for record in json.loads(path.read_text())] == ["helper", "other"]
    assert restarted.list() == [helper, other]
    assert restarted.get(helper.id) == restarted.get("helper") == helper
    assert await restarted.create_or_load("helper", "model-c", "x") == (helper, False)
    with pytest.raises(NotFound):
        restarted.get("nobody")


@pytest.mark.parametrize("text", ["{not json", "42", '[{"id": "asst_1"}]', '{"name": "helper"}'])
def test_a_corrupt_assistants_file_is_a_clear_error(tmp_path, text):
    path = tmp_path / "assistants.json"
    path.write_text(text)
    with pytest.raises(RuntimeError, match="not a valid assistants file"):
        AssistantStore(path)


# Messages and streamed runs

async def test_a_long_thread_lists_every_message_in_order_across_pages(upstream):
    thread = await upstream.engine.create_thread("alice", ["bob"])
    for index in range(250):
        await upstream.engine.add_message(thread.id, ["alice", "bob"][index % 2], f"message {index}")
    messages = await upstream.engine.list_messages(thread.id)
    assert [m["content"] for m in messages] == [f"message {index}" for index in range(250)]
    assert [m["author"] for m in messages] == ["alice", "bob"] * 125
    assert {m["role"] for m in messages} == {"user"}
    pages = upstream.log.queries("GET", "/items")
    assert len(pages) == 3 and all("limit=100" in query and "order=asc" in query for query in pages)


async def test_a_run_streams_its_deltas_while_the_model_is_still_writing(upstream):
    upstream.model.token_delay = 0.01
    helper = await upstream.assistant("helper")
    thread_id = await upstream.thread_with_message("please repeat " + "word " * 30)
    sent_before = upstream.model.deltas_sent
    events = Recorder(upstream.model)
    reply = await upstream.engine.run(thread_id, helper, events)
    deltas = events.payloads("delta")
    assert len(deltas) > 30 and upstream.model.deltas_sent - sent_before == len(deltas)
    assert events.deltas_sent_at_first_delta - sent_before < len(deltas)
    assert events.hooks() == ["run_started", "deltas", "run_completed"]
    assert "".join(deltas) == reply["content"] == events.payloads("run_completed")[0]["content"]
    stored = (await upstream.engine.list_messages(thread_id))[-1]
    assert stored["role"] == "assistant" and stored["content"] == reply["content"]
    assert stored["id"] == reply["id"] and stored["assistant"] == {"id": helper.id, "name": "helper"}


async def test_two_assistants_answer_in_order_and_the_second_sees_the_first(upstream):
    first, second = await upstream.assistant("first"), await upstream.assistant("second")
    thread = await upstream.engine.create_thread("alice", [])
    events = Recorder()
    turn = await upstream.engine.post_message(thread.id, "alice", "compare notes", [first, second], events)
    assert turn.message["author"] == "alice" and turn.errors == []
    assert [reply["assistant"]["name"] for reply in turn.replies] == ["first", "second"]
    assert turn.replies[0]["content"].endswith("first heard: compare notes (1 items in this conversation)")
    assert turn.replies[1]["content"].endswith("second heard: compare notes (2 items in this conversation)")
    assert events.hooks() == ["message_created", "run_started", "deltas", "run_completed",
                              "run_started", "deltas", "run_completed"]
    assert events.payloads("run_started") == ["first", "second"]
    messages = await upstream.engine.list_messages(thread.id)
    assert [m.get("author") or m["assistant"]["name"] for m in messages] == ["alice", "first", "second"]
    assert [m["content"] for m in messages[1:]] == [reply["content"] for reply in turn.replies]


# Failures

@pytest.mark.parametrize("fault, error_type, status_code, code", [
    ("server_error", UpstreamError, 502, None),
    ("rate_limited", UpstreamRateLimited, 503, "rate_limited"),
    ("response_failed", UpstreamError, 502, "server_error"),
    ("error_event", UpstreamError, 502, "server_error"),
    ("disconnect", UpstreamError, 502, "connection_error"),
    ("malformed", UpstreamError, 502, "invalid_stream"),
    ("unauthorized", UpstreamError, 502, "upstream_auth"),
])
async def test_each_upstream_failure_is_typed_reported_and_recoverable(upstream, fault, error_type, status_code, code):
    helper = await upstream.assistant("helper")
    thread_id = await upstream.thread_with_message("will this survive?")
    upstream.model.fail_next(fault)
    events = Recorder()
    with pytest.raises(error_type) as raised:
        await upstream.engine.run(thread_id, helper, events)
    assert raised.value.status_code == status_code
    assert code is None or raised.value.code == code
    assert raised.value.retry_after == (1.0 if fault == "rate_limited" else None)
    assert events.hooks()[0] == "run_started" and events.hooks()[-1] == "run_failed"
    assert events.payloads("run_failed") == [raised.value]
    assert "sk-" not in raised.value.message and "offline model" not in raised.value.message
    assert [m["content"] for m in await upstream.engine.list_messages(thread_id)] == ["will this survive?"]
    reply = await upstream.engine.run(thread_id, helper, Recorder())
    assert "helper heard: will this survive?" in reply["content"]


async def test_a_slow_upstream_is_a_timeout(upstream):
    upstream.model.token_delay = 0.5
    helper = await upstream.assistant("helper")
    thread_id = await upstream.thread_with_message()
    events = Recorder()
    async with sdk_client(upstream.url, timeout=openai.Timeout(0.05)) as impatient_client:
        impatient = Engine(impatient_client, upstream.engine.store)
        with pytest.raises(UpstreamTimeout) as raised:
            await impatient.run(thread_id, helper, events)
    assert raised.value.status_code == 504 and raised.value.code == "timeout"
    assert events.payloads("run_failed") == [raised.value]
    assert "sk-" not in raised.value.message and "offline model" not in raised.value.message


@pytest.fixture
def quick_lock_retries(monkeypatch):
    monkeypatch.setattr(assistants, "LOCKED_RETRY_DELAYS", (0.001,) * len(assistants.LOCKED_RETRY_DELAYS))
    return len(assistants.LOCKED_RETRY_DELAYS)


async def test_a_locked_conversation_is_retried_until_it_frees_up(upstream, quick_lock_retries):
    helper = await upstream.assistant("helper")
    thread_id = await upstream.thread_with_message()
    upstream.model.fail_next("locked", 2)
    events = Recorder()
    reply = await upstream.engine.run(thread_id, helper, events)
    assert "helper heard: hello there" in reply["content"]
    assert len(upstream.log.queries("POST", "/v1/responses")) == 3
    assert events.hooks() == ["run_started", "deltas", "run_completed"]


async def test_a_conversation_locked_for_too_long_fails_the_run(upstream, quick_lock_retries):
    helper = await upstream.assistant("helper")
    thread_id = await upstream.thread_with_message()
    upstream.model.fail_next("locked", quick_lock_retries + 1)
    events = Recorder()
    with pytest.raises(UpstreamError) as raised:
        await upstream.engine.run(thread_id, helper, events)
    assert raised.value.code == "conversation_locked" and raised.value.status_code == 502
    assert len(upstream.log.queries("POST", "/v1/responses")) == quick_lock_retries + 1
    assert events.hooks() == ["run_started", "run_failed"]
    assert "helper heard" in (await upstream.engine.run(thread_id, helper, Recorder()))["content"]


# Queueing

async def test_runs_submitted_together_on_a_thread_do_not_overlap(upstream):
    upstream.model.token_delay = 0.002
    first, second = await upstream.assistant("first"), await upstream.assistant("second")
    thread_id = await upstream.thread_with_message()
    events = Recorder()
    futures = [upstream.engine.queue.submit(thread_id, lambda a=a: upstream.engine.run(thread_id, a, events))
               for a in (first, second)]
    replies = await asyncio.gather(*futures)
    assert upstream.model.locked_refusals == 0
    assert [reply["assistant"]["name"] for reply in replies] == ["first", "second"]
    assert events.hooks() == ["run_started", "deltas", "run_completed"] * 2
    assert [message["id"] for message in events.payloads("run_completed")] == [reply["id"] for reply in replies]


async def test_the_queue_bounds_waiting_work_and_leaves_no_worker_behind():
    queue, gate, started = ThreadQueue(max_waiting=2), asyncio.Event(), asyncio.Event()

    async def blocked():
        started.set()
        await gate.wait()
        return "blocked"

    async def failing():
        raise UpstreamError("boom", "failed on purpose")
    running = queue.submit("thread", blocked)
    await started.wait()
    waiting = [queue.submit("thread", failing), queue.submit("thread", lambda: asyncio.sleep(0, "last"))]
    with pytest.raises(RunQueueFull):
        queue.submit("thread", blocked)
    other_thread = queue.submit("other", lambda: asyncio.sleep(0, "elsewhere"))
    gate.set()
    assert await running == "blocked" and await other_thread == "elsewhere"
    with pytest.raises(UpstreamError):
        await waiting[0]
    assert await waiting[1] == "last"
    deadline = time.monotonic() + 2  # the worker's own cleanup signals nothing: poll it
    while queue.busy_threads():
        assert time.monotonic() < deadline, "the worker never finished"
        await asyncio.sleep(0.001)
    assert queue._waiting == {} and queue._workers == {}


async def test_a_caller_that_goes_away_does_not_stop_the_run(upstream):
    upstream.model.token_delay = 0.005
    helper = await upstream.assistant("helper")
    thread_id = await upstream.thread_with_message("keep going without me")
    events = Recorder()
    future = upstream.engine.queue.submit(thread_id, lambda: upstream.engine.run(thread_id, helper, events))

    async def wait_for_reply():
        return await asyncio.shield(future)

    caller = asyncio.create_task(wait_for_reply())
    await events.first_delta.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(5):
        await events.completed.wait()
    stored = (await upstream.engine.list_messages(thread_id))[-1]
    assert stored["role"] == "assistant" and "keep going without me" in stored["content"]
    assert stored["content"] == "".join(events.payloads("delta"))


async def test_text_the_upstream_cannot_encode_is_cleaned_where_it_comes_in(upstream):
    helper = await upstream.assistant("helper")
    thread = await upstream.engine.create_thread("alice", [])
    # Valid JSON ("\ud800") that no UTF-8 encoder takes; the SDK cannot even send it, so plant it upstream.
    upstream.model.conversations[thread.id].items.append(message_item("user", "lone \ud800 surrogate"))
    reply = await upstream.engine.run(thread.id, helper, Recorder())
    assert "lone ? surrogate" in reply["content"]
    assert all(message["content"].encode() for message in await upstream.engine.list_messages(thread.id))


async def test_a_closed_queue_cancels_what_never_started_and_takes_no_more():
    queue = ThreadQueue(max_waiting=4)
    started = []

    async def work():
        started.append(True)

    future = queue.submit("thread", work)
    await queue.aclose()
    assert future.cancelled() and started == []
    with pytest.raises(RuntimeError):
        queue.submit("thread", work)


async def test_a_thread_is_fetched_from_the_upstream_once_then_served_from_cache(upstream, tmp_path):
    thread = await upstream.engine.create_thread("alice", ["bob"])
    cold = Engine(upstream.engine.client, AssistantStore(tmp_path / "other.json"))  # e.g. after a restart
    for user in ("alice", "bob", "alice"):
        assert (await cold.visible_thread(thread.id, user)).members == ("bob",)
    with pytest.raises(NotFound):
        await cold.visible_thread(thread.id, "carol")
    assert len(upstream.log.queries("GET", f"/conversations/{thread.id}")) == 1
