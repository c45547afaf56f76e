"""The fast path for text deltas (assistants.stream_events) against the SDK's own parsing of the same bytes:
the SDK's `responses.create(stream=True)` as it reads by default (events built, not validated), event by
event and error by error. The offline model's streams are also held to the SDK's strict validation: what the
service sends must be exact; what it accepts is as lenient as the SDK.

The offline model's streams, every fault included, go over real HTTP. Byte-level cases (events split across
network reads at every size, CRLF and CR line ends, U+2028 inside a delta, multi-line data, comments) need
exact chunks, so those are served from memory by an httpx2 transport, the SDK's own HTTP layer."""

import asyncio
import json

import httpx2
import openai
import pytest

from api import Assistant
from assistants import DELTA_TYPES, READ_TYPES, Engine, Fields, RunEventHandler, TextDelta, request_body, stream_events
from offline_model import FAULTS, OfflineModel, serve_on_loopback
from store import Run, Store, database_for
from tools import tool_spec

pytestmark = pytest.mark.anyio
REQUEST = {"model": "gpt-test", "input": [{"type": "message", "role": "user", "content": "[alice] say something"}]}


def seen(event) -> tuple:
    """What an event says, whichever path produced it: a delta by its fields, any other event whole (the SDK's
    type as the JSON it was built from)."""
    if event.type in DELTA_TYPES:
        return ("delta", event.type, event.item_id, event.delta)
    return (event.type, dict(event) if isinstance(event, Fields) else event.to_dict())


def without_ids(value):
    """Over real HTTP the two readings are two requests, and the model gives each response new ids and times."""
    if isinstance(value, dict):
        return {key: "-" if key in ("id", "item_id", "created_at") else without_ids(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if value and value[0] == "delta":
            return value[:2] + value[3:]
        return [without_ids(item) for item in value]
    return value


def raised(error: BaseException | None) -> tuple | None:
    if error is None:
        return None
    if isinstance(error, openai.APIError):
        return type(error), error.message, error.code, getattr(error, "body", None)
    return type(error), str(error)


async def through_sdk(client: openai.AsyncOpenAI) -> tuple[list, tuple | None]:
    events, error = [], None
    try:
        async with await client.responses.create(**REQUEST, stream=True) as stream:
            async for event in stream:
                if event.type in READ_TYPES:  # the events a run reads
                    events.append(seen(event))
    except Exception as failure:  # what the engine would catch
        error = failure
    return events, raised(error)


async def through_fast_path(client: openai.AsyncOpenAI) -> tuple[list, tuple | None]:
    events, error = [], None
    try:
        async for event in stream_events(client, **REQUEST):
            events.append(seen(event))
    except Exception as failure:
        error = failure
    return events, raised(error)


# ---------------------------------------------------------------- the offline model, over real HTTP

@pytest.fixture
async def model_url():
    model = OfflineModel(token_delay=0)
    async with serve_on_loopback(model.app) as url:
        yield model, url + "/v1"


@pytest.mark.parametrize("fault", [None, *FAULTS])
async def test_every_stream_of_the_offline_model_reads_the_same_both_ways_and_passes_strict_validation(
        model_url, fault):
    model, url = model_url
    strict, lenient = (openai.AsyncOpenAI(base_url=url, api_key="offline", max_retries=0, timeout=2,
                                          _strict_response_validation=validate) for validate in (True, False))
    results = []
    for read, client in ((through_sdk, strict), (through_sdk, lenient), (through_fast_path, lenient)):
        if fault:
            model.fail_next(fault)
        results.append(await read(client))
    await strict.close()
    await lenient.close()
    (strict_events, strict_error), (sdk_events, sdk_error), (fast_events, fast_error) = results
    assert without_ids(strict_events) == without_ids(sdk_events)
    assert strict_error == sdk_error  # no APIResponseValidationError: the stand-in's wire is exact
    assert without_ids(fast_events) == without_ids(sdk_events)
    assert fast_error == sdk_error
    assert sdk_events or sdk_error  # the case is not empty


# ---------------------------------------------------------------- exact bytes

MESSAGE = "msg_1"


def response(status: str, **extra) -> dict:
    return {"id": "resp_1", "object": "response", "created_at": 1700000000, "model": "gpt-test", "output": [],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "status": status, "temperature": 1.0,
            "top_p": 1.0, "error": None, "incomplete_details": None} | extra


def numbered(events: list[dict]) -> list[dict]:
    return [event | {"sequence_number": number} for number, event in enumerate(events)]


def text_reply(deltas=("Hel", "lo", " wor\u2028ld", " é 😀")) -> list[dict]:
    where = {"item_id": MESSAGE, "output_index": 0, "content_index": 0}
    text = "".join(deltas)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": MESSAGE, "type": "message", "status": "completed", "role": "assistant", "content": [part],
            "phase": "final_answer"}
    usage = {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7,
             "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}
    return numbered([
        {"type": "response.created", "response": response("in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": item | {"status": "in_progress",
                                                                                    "content": []}},
        {"type": "response.content_part.added", **where, "part": part | {"text": ""}},
        *({"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []} for delta in deltas),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": response("completed", output=[item], usage=usage)},
    ])


def sse(events: list[dict], line_end: str = "\n", multiline: bool = False, comments: bool = False) -> bytes:
    frames = []
    for event in events:
        encoded = json.dumps(event, indent=1 if multiline else None, ensure_ascii=False)
        lines = ([": keep-alive"] if comments else []) + [f"event: {event['type']}"]
        lines += [f"data: {line}" for line in encoded.split("\n")]
        frames.append(line_end.join(lines) + line_end + line_end)
    return "".join(frames).encode()


def in_chunks(body: bytes, size: int) -> list[bytes]:
    return [body[start:start + size] for start in range(0, len(body), size)]


def served(chunks: list[bytes], then: Exception | None = None) -> openai.AsyncOpenAI:
    """A client whose upstream answers every request with `chunks`, read by read (then raises `then`). It reads
    as the SDK does by default, and as the service must: without validating events."""
    async def body():
        for chunk in chunks:
            yield chunk
        if then is not None:
            raise then

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return openai.AsyncOpenAI(api_key="sk-test", base_url="http://upstream.test/v1", max_retries=0,
                              http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)))


async def both_ways(chunks: list[bytes], then: Exception | None = None):
    return [await read(served(chunks, then)) for read in (through_sdk, through_fast_path)]


flat_error = text_reply(["a", "b"])[:4] + [{"type": "error", "code": "server_error", "message": "flat",
                                            "param": None, "sequence_number": 4}]
nested_error = text_reply(["a", "b"])[:4] + [{"type": "error", "sequence_number": 4, "error": {
    "type": "server_error", "code": "server_error", "message": "nested", "param": None}}]
bad_delta = text_reply()
bad_delta[3] = bad_delta[3] | {"delta": 5}
refusal = [event | {"type": "response.refusal.delta"} if event["type"] == "response.output_text.delta" else event
           for event in text_reply()]
for event in refusal:
    event.pop("logprobs", None) if event["type"] == "response.refusal.delta" else None


def without(events: list[dict], *fields: str, where=lambda event: True) -> list[dict]:
    return [{key: value for key, value in event.items() if key not in fields} if where(event) else event
            for event in events]


def bridged(events: list[dict]) -> list[dict]:
    """As the LiteLLM proxy's Responses bridge sends it (seen 2026-12): no logprobs on the done events, no
    usage details."""
    events = without(events, "logprobs", where=lambda event: event["type"] != "response.output_text.delta")
    for event in events:
        if usage := event.get("response", {}).get("usage"):
            for details in ("input_tokens_details", "output_tokens_details"):
                usage.pop(details)
    return events


def sparse(events: list[dict]) -> list[dict]:
    """As other bridges send it: no sequence_number, no content_index, no item_id on deltas."""
    events = without(events, "sequence_number", "content_index")
    return without(events, "item_id", where=lambda event: event["type"] == "response.output_text.delta")


def with_extras(events: list[dict]) -> list[dict]:
    return [event | {"x_vendor": {"trace": "abc"}} for event in events]


unknown_event = text_reply()
unknown_event.insert(3, {"type": "response.something_new", "sequence_number": 99, "detail": "from the future"})
no_usage = text_reply()
no_usage[-1] = no_usage[-1] | {"response": response("completed")}
BODIES = {
    "text": sse(text_reply()),
    "refusal deltas": sse(refusal),
    "flat error event": sse(flat_error),
    "nested error event": sse(nested_error),
    "a delta of the wrong shape": sse(bad_delta),
    "CRLF line ends": sse(text_reply(), line_end="\r\n"),
    "CR line ends": sse(text_reply(), line_end="\r"),
    "data over several lines": sse(text_reply(), multiline=True),
    "comments between events": sse(text_reply(), comments=True),
    "not JSON": sse(text_reply())[:200] + b'\n\ndata: {"type": "response.output_text.del\n\n',
    "cut short in an event": sse(text_reply())[:-40],
    "[DONE]": sse(text_reply()[:3]) + b"data: [DONE]\n\n" + sse(text_reply()[3:]),
    "no logprobs, no usage details (a bridge)": sse(bridged(text_reply())),
    "no sequence_number, content_index or item_id": sse(sparse(text_reply())),
    "fields of a vendor's own": sse(with_extras(text_reply())),
    "an event newer than the SDK": sse(unknown_event),
    "no usage": sse(no_usage),
}


@pytest.mark.parametrize("size", [1, 3, 7, 64, 100_000])
@pytest.mark.parametrize("name", BODIES)
async def test_the_same_bytes_read_the_same_both_ways_however_they_are_cut(name, size):
    (sdk_events, sdk_error), (fast_events, fast_error) = await both_ways(in_chunks(BODIES[name], size))
    assert fast_events == sdk_events
    assert fast_error == sdk_error


@pytest.mark.parametrize("failure", [httpx2.ReadError("reset"), httpx2.RemoteProtocolError("cut"),
                                     httpx2.ReadTimeout("slow")])
async def test_a_body_broken_midway_raises_the_same_error_both_ways(failure):
    (sdk_events, sdk_error), (fast_events, fast_error) = await both_ways(in_chunks(sse(text_reply()), 50), failure)
    assert fast_events == sdk_events
    assert fast_error == sdk_error
    assert sdk_error[0] in (openai.APIConnectionError, openai.APITimeoutError)


async def test_deltas_skip_pydantic_and_other_events_are_their_json_objects_read_by_attribute():
    events = [event async for event in stream_events(served([sse(text_reply())]), **REQUEST)]
    assert [type(event).__name__ for event in events if isinstance(event, TextDelta)] == ["TextDelta"] * 4
    others = [event for event in events if not isinstance(event, TextDelta)]
    assert {type(event) for event in others} == {Fields}
    completed = others[-1]
    assert (completed.type, completed.response.usage.output_tokens, completed.response.no_such_field) == (
        "response.completed", completed["response"]["usage"]["output_tokens"], None)


async def test_streams_that_strict_validation_refuses_are_read_without_error():
    """What failed every run behind real bridges: the service's own validation was stricter than the SDK's."""
    strict = openai.AsyncOpenAI(api_key="sk-test", base_url="http://upstream.test/v1", max_retries=0,
                                http_client=served([])._client, _strict_response_validation=True)
    for body in (sse(bridged(text_reply())), sse(sparse(text_reply())), sse(unknown_event)):
        strict._client = served([body])._client
        assert (await through_sdk(strict))[1][0] is openai.APIResponseValidationError
        events, error = await through_fast_path(served([body]))
        assert error is None
        assert "".join(event[3] for event in events if event[0] == "delta") == "Hello wor\u2028ld é 😀"


async def test_an_event_that_is_not_an_object_is_skipped():
    """The SDK would hand it on as it is (a list), and the code reading events would fail on it."""
    body = sse(text_reply()[:3]) + b"data: [1, 2]\n\n" + b'data: "text"\n\n' + sse(text_reply()[3:])
    assert await through_fast_path(served([body])) == await through_fast_path(served([sse(text_reply())]))


async def test_closing_the_fast_path_early_closes_the_upstream_response():
    closed = asyncio.Event()

    async def body():
        try:
            for chunk in in_chunks(sse(text_reply()), 40):
                yield chunk
                await asyncio.sleep(0)
            await asyncio.Event().wait()  # an upstream still writing
        finally:
            closed.set()

    client = openai.AsyncOpenAI(api_key="sk-test", base_url="http://upstream.test/v1", max_retries=0,
                                http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(
                                    lambda request: httpx2.Response(200, content=body(), headers={
                                        "content-type": "text/event-stream"}))))
    events = stream_events(client, **REQUEST)
    async for event in events:
        if isinstance(event, TextDelta):
            break
    await events.aclose()
    await asyncio.wait_for(closed.wait(), 1)


async def test_the_request_sent_as_it_is_is_what_the_sdks_own_transform_would_send():
    """The engine passes its request in the body as it is (the SDK's transform costs 0.7 ms an input item, 80 µs
    for the model's name): that is exactly what the transform gives back, for every kind of item a history holds
    and with tools."""
    from openai._utils import async_maybe_transform
    from openai.types.responses import response_create_params

    history = [{"type": "message", "role": "user", "content": "[alice] hello \u2028 é 😀"},
               {"type": "message", "role": "assistant", "content": "my own earlier reply"},
               {"type": "message", "role": "user", "content": "[assistant poet] roses are red"},
               {"type": "message", "role": "user", "content": ""},
               {"type": "function_call", "call_id": "call_1", "name": "current_time", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]
    tools = [tool_spec("current_time")]
    run = Run.model_validate({"id": "run_1", "thread_id": "thread_1", "message_id": None, "requested_by": "alice",
                              "assistant": {"id": "asst_1", "name": "poet"}, "status": "active", "attempts": 1,
                              "cancelled_by": None, "error": None, "reply_id": None, "usage": None})
    assistant = Assistant(id="asst_1", name="poet", model="gpt-test", instructions="Rhyme.", owner=None,
                          created_at=0, tools=["current_time"])
    for body in (request_body(run, assistant, history, tools), request_body(run, assistant, history[:4], [])):
        transformed = await async_maybe_transform(body | {"stream": True},
                                                  response_create_params.ResponseCreateParamsStreaming)
        assert transformed == body | {"stream": True}


class Ends(RunEventHandler):
    def __init__(self):
        self.deltas, self.ended = [], asyncio.Event()

    async def on_text_delta(self, thread_id, run_id, delta):
        self.deltas.append(delta)

    async def on_run_completed(self, thread_id, run_id, message, usage):
        self.outcome = ("completed", message, usage)
        self.ended.set()

    async def on_run_failed(self, thread_id, run_id, error, message):
        self.outcome = ("failed", error.code, message)
        self.ended.set()


@pytest.mark.parametrize("body", [sse(bridged(text_reply())), sse(sparse(text_reply())), sse(with_extras(text_reply())),
                                  sse(unknown_event)], ids=["bridged", "sparse", "extras", "newer event"])
async def test_a_run_on_a_lenient_stream_completes_with_its_reply_and_usage_stored(tmp_path, body):
    store = Store(database_for(f"sqlite:///{tmp_path}/gainz.db"))
    await store.open()
    assistant, _ = await store.create_or_load_assistant("alice", "helper", "m", "")
    thread = await store.create_thread("alice", [], None)
    events = Ends()
    engine = Engine(served([body]), store, events, "runner-a")
    try:
        submission = await engine.submit(thread.id, "alice", "hello", [assistant])
        await asyncio.wait_for(events.ended.wait(), 10)
    finally:
        await engine.stop(grace_seconds=1)
        await store.close()
    status, message, usage = events.outcome
    assert status == "completed"
    assert message.content == "".join(events.deltas) == "Hello wor\u2028ld é 😀"
    assert usage == {"input_tokens": 3, "output_tokens": 4}
    (run,) = await reopened_runs(tmp_path, submission.runs[0].id)
    assert run.usage == usage and run.reply_id == message.id


async def test_a_delta_or_usage_that_cannot_be_read_is_logged_by_name_and_left_out(tmp_path, caplog):
    events = text_reply()
    events[3] = events[3] | {"delta": 5}
    events[-1]["response"]["usage"] |= {"input_tokens": "many"}
    store = Store(database_for(f"sqlite:///{tmp_path}/gainz.db"))
    await store.open()
    assistant, _ = await store.create_or_load_assistant("alice", "helper", "m", "")
    thread = await store.create_thread("alice", [], None)
    handler = Ends()
    engine = Engine(served([sse(events)]), store, handler, "runner-a")
    try:
        await engine.submit(thread.id, "alice", "hello", [assistant])
        await asyncio.wait_for(handler.ended.wait(), 10)
    finally:
        await engine.stop(grace_seconds=1)
        await store.close()
    assert handler.outcome[0] == "completed"
    assert handler.outcome[1].content == "lo wor\u2028ld é 😀"
    assert handler.outcome[2] == {"input_tokens": None, "output_tokens": 4}
    logged = caplog.text
    assert "response.output_text.delta: field delta cannot be read" in logged
    assert "response.completed: field usage.input_tokens cannot be read" in logged


async def reopened_runs(tmp_path, *run_ids):
    store = Store(database_for(f"sqlite:///{tmp_path}/gainz.db"))
    await store.open()
    try:
        return await store.runs(list(run_ids))
    finally:
        await store.close()
