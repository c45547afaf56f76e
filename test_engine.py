"""The engine (assistants.Engine) driving the real openai SDK, with strict response validation, over real
HTTP (uvicorn on 127.0.0.1) against the offline model, on a real Store: the history it sends as `input`
and how it tells authors apart, the context budget, streaming, the order of runs on a thread (one engine,
and two engines standing in for two processes on one database), every upstream failure, refusals,
commentary and usage, recovery of runs left by a runner that died, cancelling, a deleted assistant, a
graceful stop, and text the upstream cannot encode. Tests where the engine's use of the store matters run
on SQLite and on PostgreSQL."""

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import openai
import pytest

from api import Message
from assistants import (
    ATTRIBUTION_NOTE,
    Engine,
    RunEventHandler,
    ServiceStopping,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    clean_text,
    stored_failure,
)
from conftest import eventually
from offline_model import FAULTS, FAULTS_AFTER_TEXT, OfflineModel, item_text, serve_on_loopback, tokens
from store import Page, Store, database_for

pytestmark = pytest.mark.anyio

TIMEOUT = 10
ENDS = ("run_completed", "run_failed", "run_cancelled")


def sdk_client(url: str, timeout: float = 30.0) -> openai.AsyncOpenAI:
    """Strict: a stand-in that drifts from the wire shape fails loudly. No retries: a fault hits once."""
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="offline", max_retries=0,
                              timeout=openai.Timeout(timeout, connect=5.0), _strict_response_validation=True)


def expected_reply(request: dict) -> str:
    """What the offline model answers to a request body it received."""
    return OfflineModel.reply_text(request.get("metadata") or {}, request["input"])


def texts(request: dict) -> list[str]:
    return [item_text(item) for item in request["input"]]


# ---------------------------------------------------------------- a recording event handler

@dataclass
class Hook:
    name: str
    thread_id: str
    run_id: str | None
    payload: object
    tag: str | None  # which engine called it, where several share one record
    streams_open: int  # the model's state when the hook was called
    deltas_sent: int
    at: float = field(default_factory=time.monotonic)


class Recorder(RunEventHandler):
    """Records every hook call in order. `view(tag)` gives another engine a handler writing to the same record."""

    def __init__(self, model: OfflineModel, tag: str | None = None, shared: "Recorder | None" = None):
        self.model, self.tag = model, tag
        self.hooks: list[Hook] = shared.hooks if shared else []
        # The reply a failed run kept (apart from the hook's payload, the error, which tests read for secrets).
        self.failed_replies: dict[str, Message | None] = shared.failed_replies if shared else {}
        self._changed: asyncio.Event = shared._changed if shared else asyncio.Event()

    def view(self, tag: str) -> "Recorder":
        return Recorder(self.model, tag, self)

    def _add(self, name, thread_id, run_id, payload) -> None:
        self.hooks.append(Hook(name, thread_id, run_id, payload, self.tag, self.model.streams_open,
                               self.model.deltas_sent))
        self._changed.set()

    async def on_message_created(self, thread_id, message):
        self._add("message_created", thread_id, None, message)

    async def on_run_started(self, thread_id, run_id, assistant):
        self._add("run_started", thread_id, run_id, assistant)

    async def on_text_delta(self, thread_id, run_id, delta):
        self._add("text_delta", thread_id, run_id, delta)

    async def on_run_completed(self, thread_id, run_id, message, usage):
        self._add("run_completed", thread_id, run_id, {"message": message, "usage": usage})

    async def on_run_failed(self, thread_id, run_id, error, message):
        self.failed_replies[run_id] = message
        self._add("run_failed", thread_id, run_id, error)

    async def on_run_cancelled(self, thread_id, run_id, by, message):
        self._add("run_cancelled", thread_id, run_id, {"by": by, "message": message})

    # -------------------------------------------------------- reading the record

    def of(self, name: str, run_id: str | None = None) -> list[Hook]:
        return [hook for hook in self.hooks if hook.name == name and (run_id is None or hook.run_id == run_id)]

    def ends(self, run_id: str | None = None) -> list[Hook]:
        return [hook for hook in self.hooks if hook.name in ENDS and (run_id is None or hook.run_id == run_id)]

    def deltas(self, run_id: str) -> list[str]:
        return [hook.payload for hook in self.of("text_delta", run_id)]

    def names(self, run_id: str) -> list[str]:
        """The run's hooks in order, each stretch of deltas as one 'deltas'."""
        names = ["deltas" if hook.name == "text_delta" else hook.name for hook in self.hooks if hook.run_id == run_id]
        return [name for i, name in enumerate(names) if not (name == "deltas" and i and names[i - 1] == "deltas")]

    async def until(self, condition, timeout: float = TIMEOUT) -> None:
        """Wait, hook by hook, for `condition()` to hold."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def ended(self, *run_ids: str, timeout: float = TIMEOUT) -> None:
        await self.until(lambda: all(self.ends(run_id) for run_id in run_ids), timeout)


# ---------------------------------------------------------------- the rig: model, stores, engines

class PathLog:
    """The offline model's app, noting the path of every request it receives."""

    def __init__(self, app):
        self.app, self.paths = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@dataclass
class Rig:
    model: OfflineModel
    url: str
    database_url: str
    paths: list[str]
    stores: list[Store] = field(default_factory=list)
    engines: list[Engine] = field(default_factory=list)
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    async def store(self) -> Store:
        """A Store on the test database; call again for another process's."""
        store = Store(database_for(self.database_url))
        await store.open()
        self.stores.append(store)
        return store

    def engine(self, store: Store, events: RunEventHandler, runner_id: str = "runner-a", timeout: float = 30.0,
               **options) -> Engine:
        client = sdk_client(self.url, timeout)
        self.clients.append(client)
        engine = Engine(client, store, events, runner_id, **options)
        self.engines.append(engine)
        return engine

    @staticmethod
    async def assistant(store: Store, name: str = "helper", owner: str = "alice"):
        return (await store.create_or_load_assistant(owner, name, "offline-model", f"You are {name}."))[0]

    @staticmethod
    async def thread(store: Store, owner: str = "alice", members=("bob",)) -> str:
        return (await store.create_thread(owner, list(members), None)).id


@contextlib.asynccontextmanager
async def rigged(database_url: str):
    """The offline model on a real socket, and whatever stores, engines and SDK clients the test makes."""
    model = OfflineModel(token_delay=0.0)
    paths = PathLog(model.app)
    async with serve_on_loopback(paths) as url:
        rig = Rig(model, url, database_url, paths.paths)
        try:
            yield rig
        finally:
            for engine in rig.engines:
                await engine.stop(grace_seconds=TIMEOUT)
            for client in rig.clients:
                await client.close()
            for store in rig.stores:
                await store.close()


@pytest.fixture
async def rig(tmp_path):
    """SQLite only: for what does not depend on the database engine."""
    async with rigged(f"sqlite:///{tmp_path}/engine.db") as made:
        yield made


@pytest.fixture
async def db_rig(database_url):
    """On SQLite and on PostgreSQL."""
    async with rigged(database_url) as made:
        yield made


@dataclass
class Setup:
    store: Store
    events: Recorder
    engine: Engine
    assistant: object
    thread_id: str


async def set_up(rig: Rig, **engine_options) -> Setup:
    store = await rig.store()
    events = Recorder(rig.model)
    engine = rig.engine(store, events, **engine_options)
    return Setup(store, events, engine, await rig.assistant(store), await rig.thread(store))


async def expire_lease(store: Store, thread_id: str) -> None:
    """As if the runner holding the thread had died: its lease ran out."""
    await store.db.transaction(lambda tx: tx.run("UPDATE threads SET runner_until = ? WHERE id = ?",
                                                 time.time() - 1, thread_id))


async def stored_run(store: Store, run_id: str):
    (run,) = await store.runs([run_id])
    return run


async def replies(store: Store, thread_id: str) -> list[Message]:
    return [m for m in (await store.recent_messages(thread_id, 1000))[::-1] if m.role == "assistant"]


# ---------------------------------------------------------------- the history sent as input

async def test_the_history_goes_out_as_input_in_order_and_says_who_wrote_what(db_rig):
    store = await db_rig.store()
    events = Recorder(db_rig.model)
    engine = db_rig.engine(store, events)
    poet, critic = await db_rig.assistant(store, "poet"), await db_rig.assistant(store, "critic")
    thread_id = await db_rig.thread(store)
    for sub, content, assistant in [("alice", "write me a haiku", poet), ("bob", "is it any good?", critic),
                                    ("alice", "poet, try again", poet)]:
        submission = await engine.submit(thread_id, sub, content, [assistant])
        await events.ended(submission.runs[0].id)
    first, second = [hook.payload["message"].content for hook in events.of("run_completed")][:2]
    poet_again, critic_before = db_rig.model.received[-1], db_rig.model.received[-2]
    assert poet_again["input"] == [
        {"type": "message", "role": "user", "content": "[alice] write me a haiku"},
        {"type": "message", "role": "assistant", "content": first},  # its own reply: no label
        {"type": "message", "role": "user", "content": "[bob] is it any good?"},
        {"type": "message", "role": "user", "content": f"[assistant critic] {second}"},
        {"type": "message", "role": "user", "content": "[alice] poet, try again"},
    ]
    assert critic_before["input"][1] == {"type": "message", "role": "user", "content": f"[assistant poet] {first}"}
    assert poet_again["instructions"] == f"You are poet.\n\n{ATTRIBUTION_NOTE}"
    assert critic_before["instructions"] == f"You are critic.\n\n{ATTRIBUTION_NOTE}"
    assert poet_again["model"] == "offline-model"
    assert poet_again["store"] is False
    assert poet_again["stream"] is True
    assert poet_again["metadata"] == {"run_id": submission.runs[0].id, "assistant_id": poet.id,
                                      "assistant_name": "poet"}
    assert db_rig.paths == ["/v1/responses"] * 3  # nothing to /v1/conversations or anywhere else


async def test_the_oldest_messages_are_left_out_to_fit_the_context_and_the_newest_always_goes(db_rig):
    s = await set_up(db_rig, context_chars=32_000)
    old = [f"old {n} " + "x" * 9_990 for n in range(6)]
    for content in old:
        await s.engine.submit(s.thread_id, "alice", content, [])  # stored, nothing run
    submission = await s.engine.submit(s.thread_id, "alice", "the newest", [s.assistant])
    await s.events.ended(submission.runs[0].id)
    sent = texts(db_rig.model.received[-1])
    kept = len(sent) - 1
    assert sent[-1] == "[alice] the newest"
    assert 0 < kept < len(old)
    assert sent[:-1] == [f"[alice] {content}" for content in old[-kept:]]  # the latest ones, in order
    assert sum(map(len, sent)) <= 32_000
    assert sum(map(len, sent)) + len(f"[alice] {old[-kept - 1]}") > 32_000  # as many as fit
    # A newest message over the budget by itself (its label makes it so) still goes, alone.
    huge = "y" * 32_000
    submission = await s.engine.submit(s.thread_id, "bob", huge, [s.assistant])
    await s.events.ended(submission.runs[0].id)
    assert texts(db_rig.model.received[-1]) == [f"[bob] {huge}"]
    assert s.events.of("run_completed", submission.runs[0].id)


# ---------------------------------------------------------------- streaming and several assistants

async def test_deltas_stream_while_the_model_is_still_writing(rig):
    rig.model.token_delay = 0.01
    s = await set_up(rig)
    submission = await s.engine.submit(s.thread_id, "alice", "please repeat " + "word " * 40, [s.assistant])
    run_id = submission.runs[0].id
    await s.events.ended(run_id)
    deltas = s.events.of("text_delta", run_id)
    (completed,) = s.events.of("run_completed", run_id)
    assert len(deltas) == rig.model.deltas_sent > 40
    assert deltas[0].streams_open == 1  # the model had not finished its reply
    assert deltas[0].deltas_sent < len(deltas)
    assert deltas[0].at < completed.at
    assert s.events.names(run_id) == ["run_started", "deltas", "run_completed"]
    assert "".join(hook.payload for hook in deltas) == completed.payload["message"].content
    assert completed.payload["message"].content == expected_reply(rig.model.received[-1])
    (stored,) = await replies(s.store, s.thread_id)
    assert stored == completed.payload["message"]
    assert stored.assistant.model_dump() == {"id": s.assistant.id, "name": "helper"}
    assert stored.run_id == run_id


async def test_two_assistants_answer_in_order_and_the_second_sees_the_first(rig):
    s = await set_up(rig)
    first, second = await rig.assistant(s.store, "first"), await rig.assistant(s.store, "second")
    submission = await s.engine.submit(s.thread_id, "alice", "compare notes", [first, second])
    await s.events.ended(*(run.id for run in submission.runs))
    assert [hook.name for hook in s.events.hooks if hook.name != "text_delta"] == [
        "message_created", "run_started", "run_completed", "run_started", "run_completed"]
    assert [hook.payload.name for hook in s.events.of("run_started")] == ["first", "second"]
    first_reply, second_reply = [hook.payload["message"] for hook in s.events.of("run_completed")]
    assert first_reply.assistant.name == "first"
    assert second_reply.assistant.name == "second"
    assert texts(rig.model.received[-1]) == ["[alice] compare notes", f"[assistant first] {first_reply.content}"]
    assert second_reply.content.endswith("(2 messages in its context)")
    stored = (await s.store.list_messages(s.thread_id, Page())).data
    assert [m.author or m.assistant.name for m in stored] == ["alice", "first", "second"]


# ---------------------------------------------------------------- upstream failures

FAULT_ERRORS = {  # fault -> (the error's exact type, its code)
    "server_error": (UpstreamError, "upstream_error"),
    "unauthorized": (UpstreamError, "upstream_auth"),
    "rate_limited": (UpstreamRateLimited, "rate_limited"),
    "hang": (UpstreamTimeout, "timeout"),
    "response_failed": (UpstreamError, "server_error"),
    "incomplete": (UpstreamError, "incomplete"),
    "error_event": (UpstreamError, "server_error"),  # nested, as the live API sends it: the SDK raises APIError
    "flat_error_event": (UpstreamError, "server_error"),  # flat, as the spec defines it: the SDK yields it
    "disconnect": (UpstreamError, "connection_error"),
    "malformed": (UpstreamError, "invalid_stream"),
}


def test_every_failing_fault_of_the_offline_model_is_covered():
    assert set(FAULT_ERRORS) == set(FAULTS) - {"refusal", "commentary"}


@pytest.mark.parametrize("fault", FAULT_ERRORS)
async def test_each_upstream_failure_is_typed_reported_and_recoverable(rig, fault):
    s = await set_up(rig, timeout=1.0)  # "hang" never answers: the client gives up after a second
    rig.model.fail_next(fault)
    submission = await s.engine.submit(s.thread_id, "alice", "will this survive?", [s.assistant])
    run_id = submission.runs[0].id
    await s.events.ended(run_id)
    kind, code = FAULT_ERRORS[fault]
    (failed,) = s.events.ends(run_id)
    error = failed.payload
    assert failed.name == "run_failed"
    assert type(error) is kind
    assert error.code == code
    assert error.retry_after == (1.0 if fault == "rate_limited" else None)
    assert s.events.names(run_id)[0] == "run_started"
    for secret in ("sk-proj", "offline model"):  # the upstream's own text stays in the log
        assert secret not in error.message
        assert secret not in repr([hook.payload for hook in s.events.hooks if hook.name != "message_created"])
    run = await stored_run(s.store, run_id)
    assert run.status == "failed"
    assert run.error["code"] == code
    assert run.error["message"] == error.message
    recorded = stored_failure(run.error)  # as a request waiting for the run reports it
    assert type(recorded) is kind
    assert recorded.retry_after == error.retry_after
    # What streamed before the failure is kept, marked, and is what run.failed carries.
    shown, kept = "".join(s.events.deltas(run_id)), s.events.failed_replies[run_id]
    if fault in FAULTS_AFTER_TEXT:
        assert shown
    if shown:
        assert kept is not None and kept.content == shown and kept.failed is True
        assert kept.run_id == run_id and run.reply_id == kept.id
        assert await replies(s.store, s.thread_id) == [kept]
    else:
        assert kept is None and await replies(s.store, s.thread_id) == []
    again = await s.engine.submit(s.thread_id, "alice", None, [s.assistant])
    await s.events.ended(again.runs[0].id)
    (completed,) = s.events.of("run_completed", again.runs[0].id)
    assert "heard: [alice] will this survive?" in completed.payload["message"].content


async def test_a_refusal_streams_as_the_reply(rig):
    s = await set_up(rig)
    rig.model.fail_next("refusal")
    submission = await s.engine.submit(s.thread_id, "alice", "something you will not do", [s.assistant])
    run_id = submission.runs[0].id
    await s.events.ended(run_id)
    (completed,) = s.events.of("run_completed", run_id)
    assert s.events.names(run_id) == ["run_started", "deltas", "run_completed"]
    assert "".join(s.events.deltas(run_id)) == completed.payload["message"].content
    assert completed.payload["message"].content == expected_reply(rig.model.received[-1])


async def test_commentary_is_not_part_of_the_reply_and_usage_is_reported_and_stored(rig):
    s = await set_up(rig)
    rig.model.fail_next("commentary")
    submission = await s.engine.submit(s.thread_id, "alice", "think first", [s.assistant])
    run_id = submission.runs[0].id
    await s.events.ended(run_id)
    (completed,) = s.events.of("run_completed", run_id)
    reply = completed.payload["message"].content
    assert reply == expected_reply(rig.model.received[-1])
    assert "".join(s.events.deltas(run_id)) == reply
    assert "Let me think" not in reply
    usage = completed.payload["usage"]
    assert usage == {"input_tokens": len(["[alice]", "think", "first"]), "output_tokens": len(reply.split())}
    assert (await stored_run(s.store, run_id)).usage == usage


# ---------------------------------------------------------------- order on a thread

async def test_runs_submitted_together_on_a_thread_never_overlap_and_run_in_submission_order(db_rig):
    db_rig.model.token_delay = 0.005
    s = await set_up(db_rig)
    other = await db_rig.assistant(s.store, "other")
    runs = []
    for n in range(4):
        submission = await s.engine.submit(s.thread_id, "alice", f"message {n}", [[s.assistant, other][n % 2]])
        runs.append(submission.runs[0].id)
    await s.events.ended(*runs)
    assert [request["metadata"]["run_id"] for request in db_rig.model.received] == runs
    marks = [(hook.name, hook.run_id) for hook in s.events.hooks if hook.name in ("run_started", *ENDS)]
    assert marks == [mark for run_id in runs for mark in (("run_started", run_id), ("run_completed", run_id))]


async def test_a_run_sees_every_message_stored_before_it_starts(rig):
    rig.model.token_delay = 0.02
    s = await set_up(rig)
    first = await s.engine.submit(s.thread_id, "alice", "a long one " + "word " * 30, [s.assistant])
    await s.events.until(lambda: s.events.deltas(first.runs[0].id))
    second = await s.engine.submit(s.thread_id, "bob", "my question", [s.assistant])
    await s.engine.submit(s.thread_id, "alice", "an afterthought", [])
    await s.events.ended(second.runs[0].id)
    created = s.events.of("message_created")[-1]
    (started,) = s.events.of("run_started", second.runs[0].id)
    assert created.at < started.at  # stored after the run was asked for, before it started
    first_reply = s.events.of("run_completed", first.runs[0].id)[0].payload["message"].content
    # Stored in arrival order: both messages came while the first reply was still streaming.
    assert texts(rig.model.received[-1])[1:] == ["[bob] my question", "[alice] an afterthought", first_reply]


async def test_two_engines_on_one_database_never_run_one_thread_at_once(db_rig):
    """Two 'processes': each with its own runner id, store connection and SDK client, on one database."""
    db_rig.model.token_delay = 0.002
    events = Recorder(db_rig.model)
    stores = [await db_rig.store(), await db_rig.store()]
    engines = [db_rig.engine(store, events.view(tag), runner_id=f"runner-{tag}") for store, tag in zip(stores, "ab")]
    assistant = await db_rig.assistant(stores[0])
    threads = [await db_rig.thread(stores[0]) for _ in range(3)]
    order: dict[str, list[str]] = {thread_id: [] for thread_id in threads}

    async def submit(engine: Engine, thread_id: str, content: str, sub: str = "alice") -> str:
        run_id = (await engine.submit(thread_id, sub, content, [assistant])).runs[0].id
        order[thread_id].append(run_id)
        return run_id

    # Each engine first takes a thread of its own, so both are sure to run some, then both take turns.
    for engine, thread_id in zip(engines, threads):
        run_id = await submit(engine, thread_id, "first")
        await events.until(lambda run_id=run_id: events.of("run_started", run_id))
    # Spread over users: one user's 16-run limit is not what this test is about, and a slow machine would hit it.
    for n in range(18):
        await submit(engines[n % 2], threads[n % 3], f"message {n}", sub=f"user-{n % 4}")
    every_run = [run_id for runs in order.values() for run_id in runs]
    await events.ended(*every_run, timeout=60)

    assert Counter(hook.run_id for hook in events.ends()) == Counter(every_run)  # each ended exactly once
    assert {hook.name for hook in events.ends()} == {"run_completed"}
    assert {hook.tag for hook in events.of("run_started")} == {"a", "b"}
    for thread_id, runs in order.items():
        marks = [(hook.name, hook.run_id) for hook in events.hooks
                 if hook.thread_id == thread_id and hook.name in ("run_started", *ENDS)]
        assert marks == [mark for run_id in runs for mark in (("run_started", run_id), ("run_completed", run_id))]
        assert [m.run_id for m in await replies(stores[1], thread_id)] == runs


# ---------------------------------------------------------------- recovery

async def cut_off(store: Store, thread_id: str, runner_id: str) -> None:
    """A runner takes the thread, starts its next run, and dies: its lease runs out."""
    assert await store.start_next_run(thread_id, runner_id, 60) is not None
    await expire_lease(store, thread_id)


async def test_a_run_left_active_by_a_runner_that_died_is_picked_up_and_ends_with_one_reply(db_rig):
    store = await db_rig.store()
    assistant, thread_id = await db_rig.assistant(store), await db_rig.thread(store)
    submission = await store.submit(thread_id, "alice", "survive a crash", [assistant])
    run_id = submission.runs[0].id
    await cut_off(store, thread_id, "runner-that-died")
    assert (await stored_run(store, run_id)).status == "active"
    events = Recorder(db_rig.model)
    engine = db_rig.engine(await db_rig.store(), events, runner_id="runner-new")
    await engine.start()
    await events.ended(run_id)
    assert events.names(run_id) == ["run_started", "deltas", "run_completed"]
    run = await stored_run(store, run_id)
    assert run.status == "completed"
    assert run.attempts == 2
    assert [m.run_id for m in await replies(store, thread_id)] == [run_id]
    assert "heard: [alice] survive a crash" in (await replies(store, thread_id))[0].content


async def test_a_run_cut_off_more_than_max_attempts_times_fails_as_interrupted(db_rig):
    store = await db_rig.store()
    assistant, thread_id = await db_rig.assistant(store), await db_rig.thread(store)
    run_id = (await store.submit(thread_id, "alice", "a run that keeps killing its runner", [assistant])).runs[0].id
    for attempt in range(3):
        await cut_off(store, thread_id, f"runner-{attempt}")
    events = Recorder(db_rig.model)
    engine = db_rig.engine(store, events, runner_id="runner-new", max_attempts=3)
    await engine.start()
    await events.ended(run_id)
    assert events.names(run_id) == ["run_started", "run_failed"]
    assert events.of("run_failed", run_id)[0].payload.code == "interrupted"
    run = await stored_run(store, run_id)
    assert run.status == "failed"
    assert run.error["code"] == "interrupted"
    assert run.attempts == 4
    assert list(db_rig.model.received) == []  # not tried once more
    assert await replies(store, thread_id) == []


# ---------------------------------------------------------------- cancelling

async def test_stopping_the_active_run_closes_the_upstream_and_keeps_the_partial_reply(db_rig):
    db_rig.model.token_delay = 0.02
    s = await set_up(db_rig)
    run_id = (await s.engine.submit(s.thread_id, "alice", "a long story " + "word " * 60, [s.assistant])).runs[0].id
    await s.events.until(lambda: len(s.events.deltas(run_id)) >= 3)
    run = await s.engine.cancel(s.thread_id, run_id, "bob")
    assert run.status == "active"  # stopped by whoever runs it: this engine, told by a signal
    s.engine.stop_run(run_id, "bob")
    s.engine.stop_run(run_id, "bob")  # the same signal twice changes nothing
    await s.events.ended(run_id)
    assert await eventually(lambda: db_rig.model.streams_open == 0, timeout=1)
    assert s.events.names(run_id) == ["run_started", "deltas", "run_cancelled"]
    (cancelled,) = s.events.of("run_cancelled", run_id)
    partial = cancelled.payload["message"]
    assert cancelled.payload["by"] == "bob"
    assert partial.content == "".join(s.events.deltas(run_id))
    assert partial.cancelled is True
    assert len(s.events.deltas(run_id)) < len(tokens(expected_reply(db_rig.model.received[-1])))  # cut short
    stored = await stored_run(s.store, run_id)
    assert stored.status == "cancelled"
    assert stored.cancelled_by == "bob"
    assert stored.reply_id == partial.id
    assert await replies(s.store, s.thread_id) == [partial]


async def test_a_cancelled_queued_run_never_starts_and_after_a_cancel_the_next_run_starts_at_once(rig):
    rig.model.token_delay = 0.02
    s = await set_up(rig)
    slow, skipped, last = [(await s.engine.submit(s.thread_id, "alice", content, [s.assistant])).runs[0].id
                           for content in ("a slow one " + "word " * 80, "skip me", "then me")]
    await s.events.until(lambda: len(s.events.deltas(slow)) >= 3)
    run = await s.engine.cancel(s.thread_id, skipped, "alice")
    assert run.status == "cancelled"
    assert s.events.names(skipped) == ["run_cancelled"]
    assert s.events.of("run_cancelled", skipped)[0].payload == {"by": "alice", "message": None}
    assert (await s.engine.cancel(s.thread_id, slow, "alice")).status == "active"
    s.engine.stop_run(slow, "alice")
    await s.events.ended(last)
    assert s.events.names(slow) == ["run_started", "deltas", "run_cancelled"]
    assert s.events.names(last) == ["run_started", "deltas", "run_completed"]
    assert [request["metadata"]["run_id"] for request in rig.model.received] == [slow, last]
    (slow_cancelled,) = s.events.of("run_cancelled", slow)
    (last_started,) = s.events.of("run_started", last)
    # At once: not when a lease renewal or the sweeper would notice (seconds), nor when the slow one would end.
    assert last_started.at - slow_cancelled.at < 2
    assert len(s.events.deltas(slow)) < len(tokens("a slow one " + "word " * 80))
    assert (await stored_run(s.store, skipped)).status == "cancelled"


async def test_a_cancel_whose_signal_never_arrived_is_found_when_the_lease_is_renewed(rig):
    rig.model.token_delay = 0.02
    s = await set_up(rig, lease_seconds=0.6)  # renewed every 0.2 s
    run_id = (await s.engine.submit(s.thread_id, "alice", "a long story " + "word " * 80, [s.assistant])).runs[0].id
    await s.events.until(lambda: s.events.deltas(run_id))
    await s.engine.cancel(s.thread_id, run_id, "bob")  # and no stop_run: the signal was lost
    await s.events.ended(run_id)
    (cancelled,) = s.events.ends(run_id)
    assert cancelled.name == "run_cancelled"
    assert cancelled.payload["by"] == "bob"
    assert (await stored_run(s.store, run_id)).status == "cancelled"


# ---------------------------------------------------------------- a deleted assistant

async def test_a_queued_run_whose_assistant_was_deleted_fails_as_assistant_deleted(rig):
    s = await set_up(rig)
    doomed = await rig.assistant(s.store, "doomed")
    submission = await s.store.submit(s.thread_id, "alice", "first the helper, then doomed", [s.assistant, doomed])
    await s.store.delete_assistant("alice", "doomed")
    s.engine.kick(s.thread_id)
    helper_run, doomed_run = (run.id for run in submission.runs)
    await s.events.ended(helper_run, doomed_run)
    assert s.events.names(helper_run) == ["run_started", "deltas", "run_completed"]
    assert s.events.names(doomed_run) == ["run_started", "run_failed"]
    assert s.events.of("run_failed", doomed_run)[0].payload.code == "assistant_deleted"
    assert [request["metadata"]["run_id"] for request in rig.model.received] == [helper_run]
    assert (await stored_run(s.store, doomed_run)).error["code"] == "assistant_deleted"


# ---------------------------------------------------------------- stopping the engine

async def test_a_stopping_engine_takes_no_more_and_lets_an_active_run_finish_within_the_grace(db_rig):
    db_rig.model.token_delay = 0.01
    s = await set_up(db_rig)
    active = (await s.engine.submit(s.thread_id, "alice", "finish me " + "word " * 20, [s.assistant])).runs[0].id
    waiting = (await s.engine.submit(s.thread_id, "alice", "wait for the next start", [s.assistant])).runs[0].id
    await s.events.until(lambda: s.events.deltas(active))
    stopping = asyncio.create_task(s.engine.stop(grace_seconds=30))
    await s.events.ended(active)
    with pytest.raises(ServiceStopping):
        await s.engine.submit(s.thread_id, "alice", "too late", [s.assistant])
    await stopping
    assert s.events.names(active) == ["run_started", "deltas", "run_completed"]
    assert s.events.names(waiting) == []  # not started: it waits in the store
    assert (await stored_run(s.store, waiting)).status == "queued"
    assert "[alice] too late" not in texts(db_rig.model.received[-1])
    assert [m.content for m in await s.store.recent_messages(s.thread_id, 10)][-1] != "too late"
    events = Recorder(db_rig.model)
    restarted = db_rig.engine(await db_rig.store(), events, runner_id="runner-b")
    await restarted.start()
    await events.ended(waiting)
    assert events.names(waiting) == ["run_started", "deltas", "run_completed"]


async def test_a_run_beyond_the_grace_is_cut_off_and_runs_again_at_the_next_start(db_rig):
    db_rig.model.token_delay = 0.05
    s = await set_up(db_rig)
    run_id = (await s.engine.submit(s.thread_id, "alice", "a long one " + "word " * 60, [s.assistant])).runs[0].id
    await s.events.until(lambda: s.events.deltas(run_id))
    await s.engine.stop(grace_seconds=0.1)
    assert s.events.ends(run_id) == []
    assert await eventually(lambda: db_rig.model.streams_open == 0, timeout=2)
    run = await stored_run(s.store, run_id)
    assert run.status == "active"  # pending: cut off, not ended
    assert run.attempts == 1
    assert await replies(s.store, s.thread_id) == []
    db_rig.model.token_delay = 0.0
    events = Recorder(db_rig.model)
    restarted = db_rig.engine(await db_rig.store(), events, runner_id="runner-b")
    await restarted.start()
    await events.ended(run_id)
    assert events.names(run_id) == ["run_started", "deltas", "run_completed"]
    run = await stored_run(s.store, run_id)
    assert run.status == "completed"
    assert run.attempts == 2
    assert [m.run_id for m in await replies(s.store, s.thread_id)] == [run_id]


class BeginWatch:
    """The store's SQLite connection, noting (from the database thread) when a BEGIN is under way."""

    def __init__(self, connection):
        self.connection, self.began = connection, threading.Event()

    def execute(self, sql, *params):
        if sql.startswith("BEGIN"):
            self.began.set()
        return self.connection.execute(sql, *params)

    def __getattr__(self, name):
        return getattr(self.connection, name)


async def test_a_store_call_cut_off_while_it_begins_leaves_the_store_usable(tmp_path):
    """The engine cancels its drains at any await (stop past the grace, a deleted thread, a lost lease),
    store calls included; so does a socket's reader when the socket goes."""
    path = tmp_path / "cut.db"
    store = Store(database_for(f"sqlite:///{path}"))
    await store.open()
    other_process = sqlite3.connect(path, isolation_level=None)
    try:
        other_process.execute("BEGIN IMMEDIATE")  # holds the write lock: the store's BEGIN waits for it
        store.db.connection = watch = BeginWatch(store.db.connection)
        cut = asyncio.create_task(store.setting("cut", lambda: "never"))
        assert await eventually(watch.began.is_set)
        cut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cut
        other_process.execute("COMMIT")  # the BEGIN goes through, for a transaction the store must end
        assert await store.setting("after", lambda: "written") == ("written", True)
        assert await store.setting("cut", lambda: "now") == ("now", True)
    finally:
        other_process.close()
        await store.close()


async def test_when_stop_returns_the_engine_has_let_go_of_every_thread(rig):
    """The lifespan closes the store right after stop(): a release still in flight then fails on a closed
    database, and the thread stays leased, so its queued runs wait for the lease to expire after a restart."""
    looking_again = asyncio.Event()

    class SlowToLookAgain(Store):
        async def start_next_run(self, thread_id, runner, lease_seconds):
            if looking_again.is_set():  # after the first run: the look that would find none and let go
                await asyncio.sleep(0.2)  # a slow database, not a synchronisation
            looking_again.set()
            return await super().start_next_run(thread_id, runner, lease_seconds)

    store = SlowToLookAgain(database_for(rig.database_url))
    await store.open()
    rig.stores.append(store)
    events = Recorder(rig.model)
    engine = rig.engine(store, events)
    assistant, thread_id = await rig.assistant(store), await rig.thread(store)
    run_id = (await engine.submit(thread_id, "alice", "hello", [assistant])).runs[0].id
    await events.ended(run_id)
    await engine.stop(grace_seconds=0)  # cuts the drain off while it still holds the thread
    thread = await store.db.reading(lambda tx: tx.one("SELECT runner FROM threads WHERE id = ?", thread_id))
    assert thread == {"runner": None}


# ---------------------------------------------------------------- text from the upstream

def test_clean_text_replaces_lone_surrogates_and_keeps_everything_else():
    assert clean_text("lone \ud800 and \udfff") == "lone ? and ?"
    assert clean_text("pair \U0001F4AA é") == "pair \U0001F4AA é"


async def test_text_with_lone_surrogates_from_the_upstream_is_cleaned_where_it_comes_in(rig):
    # Valid JSON ("\ud800" escapes) that no UTF-8 encoder takes: the store, the hub and sockets all would fail.
    rig.model.reply_text = lambda metadata, seen: "lone \ud800 surrogate and \udfff more"
    s = await set_up(rig)
    run_id = (await s.engine.submit(s.thread_id, "alice", "say something odd", [s.assistant])).runs[0].id
    await s.events.ended(run_id)
    (completed,) = s.events.of("run_completed", run_id)
    assert completed.payload["message"].content == "lone ? surrogate and ? more"
    assert "".join(s.events.deltas(run_id)) == "lone ? surrogate and ? more"
    assert [m.content for m in await replies(s.store, s.thread_id)] == ["lone ? surrogate and ? more"]
