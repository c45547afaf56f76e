"""Break it on purpose: arbitrary bodies and frames, oversized, deep and undecodable input, upstream faults
on every transport, and a thousand socket lifetimes that must leave nothing behind."""

import asyncio
import itertools
import json
import os
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.exceptions import HTTPException
from starlette.testclient import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import eventually, next_frame, writer_tasks
from main import MAX_BODY_BYTES, MAX_FRAME_CHARS, parse_object
from offline_model import FAULTS

pytestmark = pytest.mark.anyio

TIMEOUT = 10
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CONTRACT_STATUSES = {200, 201, 400, 404, 413}
RUN_EVENTS = {"message.created", "run.started", "text.delta", "run.completed", "run.failed"}


@pytest.fixture
def app(make_app, request):
    """No SDK retries, so a fault reaches the service at once; tokens as fast as the test allows."""
    return make_app(openai_max_retries=0, offline_token_delay=getattr(request, "param", 0.0))


@pytest.fixture
def hostile_client(app):
    """A 500 shows up as a status to assert on, not as the server's exception re-raised in the test."""
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def thread_id(hostile_client, auth):
    return hostile_client.post("/threads", headers=auth("alice")).json()["id"]


def assert_still_serving(client, auth, thread: str) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/assistants", headers=auth("alice")).status_code == 200
    normal = client.post(f"/threads/{thread}/messages", json={"content": "normal", "run": False}, headers=auth("alice"))
    assert normal.status_code == 201


# ---------------------------------------------------------------- arbitrary bodies and frames

# Hypothesis leaves lone surrogates out of text; JSON carries them as "\ud800" escapes, so add them back.
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=10)
ASSISTANT = st.sampled_from(["assistant", "nobody"]) | TEXT
FIELDS = {"content": TEXT | st.just("hello"), "run": st.booleans(), "assistant": ASSISTANT,
          "assistants": st.lists(ASSISTANT, max_size=9), "type": st.sampled_from(["message", "run"]) | TEXT,
          "name": TEXT, "model": TEXT, "instructions": TEXT, "members": st.lists(TEXT | st.just("bob"), max_size=12)}


def objects(*names: str):
    """JSON objects made of the route's own fields (any subset), each with a plausible or an arbitrary value."""
    return st.fixed_dictionaries({}, optional={name: FIELDS[name] | JSON for name in names})


def bodies(*names: str):
    raw = st.binary(max_size=64) | st.builds(lambda junk: b'{"content": "' + junk + b'"}', st.binary(max_size=16))
    return (JSON | objects(*names)).map(lambda value: json.dumps(value).encode()) | raw


BODY_ROUTES = {
    "/assistants": bodies("name", "model", "instructions"),
    "/threads": bodies("members"),
    "/threads/{thread}/messages": bodies("content", "run", "assistant", "assistants"),
    "/threads/{thread}/runs": bodies("assistant", "assistants"),
}


@pytest.mark.parametrize("route", BODY_ROUTES)
def test_any_body_gets_a_contract_status_with_a_detail_and_never_a_5xx(hostile_client, thread_id, auth, route):
    @HYPOTHESIS
    @given(body=BODY_ROUTES[route])
    def answered_by_the_contract(body: bytes):
        response = hostile_client.post(route.format(thread=thread_id), content=body, headers=auth("alice"))
        assert response.status_code in CONTRACT_STATUSES, (response.status_code, response.text)
        assert response.status_code < 400 or isinstance(response.json()["detail"], str)

    answered_by_the_contract()
    assert_still_serving(hostile_client, auth, thread_id)


@pytest.fixture
def open_socket(hostile_client, thread_id, auth):
    with hostile_client.websocket_connect(f"/threads/{thread_id}/ws", headers=auth("alice")) as ws:
        assert ws.receive_json()["type"] == "thread.joined"
        yield ws


PROBES = itertools.count()
FRAMES = ((objects("type", "content", "run", "assistant", "assistants") | JSON).map(json.dumps)
          | st.text(max_size=40) | st.binary(max_size=40))


def answers_before_probe(ws) -> list[dict]:
    """Sends a valid run-less message after the frame under test; the frames that came before its echo.
    Work on a thread is queued in order, so the frame's own answer (error or run events) comes first."""
    probe = f"probe {next(PROBES)}"
    ws.send_text(json.dumps({"type": "message", "content": probe, "run": False}))
    answers = []
    while (frame := ws.receive_json()).get("message", {}).get("content") != probe:
        answers.append(frame)
    return answers


@HYPOTHESIS
@given(frame=FRAMES)
def test_any_frame_gets_an_error_frame_or_its_run_events_and_the_socket_stays_open(open_socket, frame):
    open_socket.send_bytes(frame) if isinstance(frame, bytes) else open_socket.send_text(frame)
    kinds = [answer["type"] for answer in answers_before_probe(open_socket)]
    assert kinds == ["error"] or (kinds and set(kinds) <= RUN_EVENTS), (frame, kinds)


# ---------------------------------------------------------------- specific hostile input

HOSTILE_BODIES = {  # sent to every route; each status is what the contract gives on all of them
    "over the limit with content-length": (b" " * (MAX_BODY_BYTES + 1), 413),
    "over the limit, chunked (generator)": (lambda: (b" " * 1024 for _ in range(MAX_BODY_BYTES // 1024 + 1)), 413),
    "deep nesting, unclosed": (b"[" * 100_000, 400),
    "deep nesting, well formed": (b"[" * 100_000 + b"]" * 100_000, 400),
    "deep objects": (b'{"a":' * 40_000 + b"1" + b"}" * 40_000, 400),  # under the size limit
    "invalid utf-8": (b'{"content": "\xff\xfe\xc3\x28"}', 400),
    "a 5000-digit number": (b'{"content": ' + b"1" * 5000 + b"}", 400),  # over Python's int-parsing limit
    # Valid JSON escapes that decode to strings no UTF-8 encoder (SDK, JSONResponse, socket) accepts:
    "lone surrogate in a key": (b'{"\\udc00": 1}', 400),
    "lone surrogate name": (b'{"name": "\\ud800"}', 400),
    "lone surrogate member": (b'{"members": ["\\ud800"]}', 400),
    "lone surrogate content": (b'{"content": "\\ud800", "run": false}', 400),
}


def test_oversized_deep_undecodable_and_unencodable_bodies_get_413_or_400_on_every_route(
        hostile_client, thread_id, auth):
    wrong = {}
    for route, (case, (body, status_code)) in itertools.product(BODY_ROUTES, HOSTILE_BODIES.items()):
        content = body() if callable(body) else body
        response = hostile_client.post(route.format(thread=thread_id), content=content, headers=auth("alice"))
        if (response.status_code, type(response.json().get("detail"))) != (status_code, str):
            wrong[route, case] = response.status_code, response.text[:80]
    assert wrong == {}
    assert_still_serving(hostile_client, auth, thread_id)  # also: no unencodable assistant poisons the listing


def test_deep_nesting_is_refused_before_the_parser_recurses():
    """json.loads recurses once per level down to the interpreter's recursion limit, where a finalizer that
    the garbage collector happens to run has no stack left; the depth is checked before parsing."""
    with pytest.raises(HTTPException, match="nested deeper"):
        parse_object(b"[" * 2 * sys.getrecursionlimit())
    assert parse_object(b'{"a": ' * 5 + b"1" + b"}" * 5) == {"a": {"a": {"a": {"a": {"a": 1}}}}}
    assert parse_object('{"quoted": "[[[[' + "[" * 100 + '"}') == {"quoted": "[[[[" + "[" * 100}


async def new_thread(live, auth, owner: str = "alice") -> str:
    response = await live.http.post("/threads", headers=auth(owner))
    assert response.status_code == 201
    return response.json()["id"]


async def join(live, thread: str, headers: dict):
    ws = await connect(f"{live.ws_url}/threads/{thread}/ws", additional_headers=headers, open_timeout=TIMEOUT)
    assert (await next_frame(ws))["type"] == "thread.joined"
    return ws


async def frames_until_run_ends(ws) -> list[dict]:
    frames = [await next_frame(ws)]
    while frames[-1]["type"] not in ("run.completed", "run.failed"):
        frames.append(await next_frame(ws))
    return frames


async def test_hostile_frames_and_a_flood_over_a_real_socket_get_answers_and_the_socket_stays_open(
        live, auth):
    """TestClient hands frames over as Python strings; only a real socket has to encode the answer."""
    thread = await new_thread(live, auth)
    ws = await join(live, thread, auth("alice"))
    for frame in ['{"type": "message", "content": "\\ud800"}', '{"type": "run", "\\ud800": 1}',
                  "[" * (MAX_FRAME_CHARS - 1), '{"type": "message", "content": "' + "x" * MAX_FRAME_CHARS + '"}',
                  b"\xff\xfe not text"]:
        await ws.send(frame)
        assert (await next_frame(ws, timeout=2))["type"] == "error", frame[:40]  # an answer takes milliseconds
    # json.dumps escapes the emoji as a surrogate pair ("\\ud83d\\udcaa"): that is valid and must stay accepted.
    await ws.send(json.dumps({"type": "message", "content": "\U0001F4AA", "run": False}))
    assert (await next_frame(ws))["message"]["content"] == "\U0001F4AA"
    flood = [json.dumps({"type": "message", "content": f"flood {n}", "run": False}) for n in range(100)]
    for frame in flood:
        await ws.send(frame)
    answers = Counter(frame["error"]["code"] if frame["type"] == "error" else frame["type"]
                      for frame in [await next_frame(ws) for _ in flood])
    assert set(answers) <= {"message.created", "queue_full"} and answers["queue_full"], answers
    stored = (await live.http.get(f"/threads/{thread}/messages", headers=auth("alice"))).json()
    assert sum(m["content"].startswith("flood") for m in stored) == answers["message.created"]  # none lost
    await ws.send(json.dumps({"type": "message", "content": "still here"}))
    assert (await frames_until_run_ends(ws))[-1]["type"] == "run.completed"
    await ws.close()


async def raw_exchange(live, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*live.url.removeprefix("http://").split(":"))
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


async def test_huge_headers_get_a_4xx_and_the_server_keeps_serving(live, auth):
    huge = b"a" * 100 * 1024
    # A complete request is parsed and reaches the app, which refuses the junk token.
    complete = await raw_exchange(live, b"GET /assistants HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                        b"Authorization: Bearer " + huge + b"\r\n\r\n")
    assert complete.startswith(b"HTTP/1.1 401 ") and complete.endswith(b'{"detail":"invalid token"}'), complete[:200]
    # A header block still open past h11's 16 KiB limit is refused by uvicorn itself (plain uvicorn: h11).
    unfinished = await raw_exchange(live, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + huge)
    assert unfinished.startswith(b"HTTP/1.1 4"), unfinished[:200]
    assert (await live.http.get("/health")).status_code == 200
    assert (await live.http.get("/assistants", headers=auth("alice"))).status_code == 200


# ---------------------------------------------------------------- upstream faults on every transport

FAULT_OUTCOMES = {  # fault -> (status of POST /runs, last event of the run); a lock is retried until it frees
    "server_error": (502, "run.failed"), "rate_limited": (503, "run.failed"), "response_failed": (502, "run.failed"),
    "error_event": (502, "run.failed"), "disconnect": (502, "run.failed"), "locked": (200, "run.completed"),
    "malformed": (502, "run.failed"), "unauthorized": (502, "run.failed"),
}


async def sse_events(live, path: str, body: dict, headers: dict) -> list[dict]:
    async with live.http.stream("POST", path, json=body, headers=headers | {"Accept": "text/event-stream"}) as response:
        return [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]


def run_shape(frames: list[dict]) -> tuple[list[str], str]:
    """Frame kinds without the deltas, and the deltas' text: a socket may get its pending deltas merged."""
    return [f["type"] for f in frames if f["type"] != "text.delta"], "".join(f.get("delta", "") for f in frames)


def ending(frames: list[dict]) -> str:
    last = frames[-1]  # a failure must say what failed: error {code, message}
    return last["type"] if last["type"] == "run.completed" or all(last["error"].values()) else "unexplained"


async def fault_outcome(live, auth, fault: str) -> tuple:
    """The fault hits a run over the socket, then one over SSE, then one over REST; then a normal run."""
    thread = await new_thread(live, auth)
    watcher, alice = await join(live, thread, auth("alice")), auth("alice")
    live.offline_model.fail_next(fault)
    await watcher.send(json.dumps({"type": "message", "content": "over the socket"}))
    over_socket = ending(await frames_until_run_ends(watcher))
    live.offline_model.fail_next(fault)
    over_sse = await sse_events(live, f"/threads/{thread}/messages", {"content": "over sse"}, alice)
    sse_reached_the_socket = run_shape(await frames_until_run_ends(watcher)) == run_shape(over_sse)
    live.offline_model.fail_next(fault)
    over_rest = (await live.http.post(f"/threads/{thread}/runs", headers=alice)).status_code
    rest_on_the_socket = ending(await frames_until_run_ends(watcher))
    after = (await live.http.post(f"/threads/{thread}/messages", json={"content": "after"}, headers=alice)).json()
    await frames_until_run_ends(watcher)
    await watcher.close()
    kept = [m["content"] for m in (await live.http.get(f"/threads/{thread}/messages", headers=alice)).json()
            if m["role"] == "user"]
    return (over_socket, ending(over_sse), sse_reached_the_socket, over_rest, rest_on_the_socket,
            (len(after["replies"]), after["errors"]), kept)


async def test_a_fault_fails_the_run_on_every_transport_keeps_the_message_and_the_next_run_works(live, auth):
    assert set(FAULT_OUTCOMES) == set(FAULTS)
    outcomes = {fault: await fault_outcome(live, auth, fault) for fault in FAULT_OUTCOMES}
    assert outcomes == {fault: (ends, ends, True, status, ends, (1, []), ["over the socket", "over sse", "after"])
                        for fault, (status, ends) in FAULT_OUTCOMES.items()}


# ---------------------------------------------------------------- a thousand socket lifetimes

SOAK_CYCLES, SOAK_BATCH, SOAK_THREADS = 1000, 50, 10


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def refused_status(live, thread: str, headers: dict) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{live.ws_url}/threads/{thread}/ws", additional_headers=headers, open_timeout=TIMEOUT)
    return refused.value.response.status_code


async def socket_lifetime(live, auth, cycle: int, threads: list[str], foreign: str) -> str:
    """One of five lifetimes, by cycle number; says which, and how it ended."""
    kind, thread = cycle % 10, threads[cycle // 10 % len(threads)]
    if kind == 0:
        return f"refused {await refused_status(live, thread, {'Authorization': 'Bearer not-a-token'})}"
    if kind == 1:
        return f"refused {await refused_status(live, foreign, auth('alice'))}"
    ws = await join(live, thread, auth("alice"))
    if kind in (2, 3):
        await ws.send(json.dumps({"type": "message", "content": f"cycle {cycle}"}))
        while (await next_frame(ws))["type"] != "text.delta":
            pass
        if kind == 3:
            ws.transport.abort()  # gone without a close frame, as when a phone loses its network
            return "aborted mid-run"
    await ws.close()
    return "closed mid-run" if kind == 2 else "joined and left"


@pytest.mark.parametrize("app", [0.001], indirect=True)  # token delay: slow enough to leave mid-run
async def test_a_thousand_socket_lifetimes_leave_no_socket_task_worker_or_descriptor_behind(live, auth):
    threads = list(await asyncio.gather(*(new_thread(live, auth) for _ in range(SOAK_THREADS))))
    foreign = await new_thread(live, auth, owner="bob")
    # The SDK pools up to one connection to the offline model per busy thread, 2 fds each (both ends are in
    # this process): count from a warmed pool, allow what all threads busy at once may still add, plus a few
    # for the test's own HTTP client. A leak per socket lifetime would be hundreds over.
    await asyncio.gather(*(live.http.post(f"/threads/{t}/messages", json={"content": "warm up"},
                                          headers=auth("alice")) for t in threads))
    baseline, slack = open_fds(), 2 * SOAK_THREADS + 4

    outcomes = Counter()
    for first in range(0, SOAK_CYCLES, SOAK_BATCH):
        outcomes.update(await asyncio.gather(
            *(socket_lifetime(live, auth, cycle, threads, foreign) for cycle in range(first, first + SOAK_BATCH))))
    assert outcomes == {"refused 401": 100, "refused 404": 100, "closed mid-run": 100, "aborted mid-run": 100,
                        "joined and left": 600}

    def leftovers() -> dict:
        return {"busy threads": live.engine.queue.busy_threads(), "hub": live.hub.threads,
                "writer tasks": list(writer_tasks()), "fds over slack": max(0, open_fds() - baseline - slack)}

    nothing_left = {"busy threads": 0, "hub": {}, "writer tasks": [], "fds over slack": 0}
    await eventually(lambda: leftovers() == nothing_left)
    assert leftovers() == nothing_left
    after = await live.http.post(f"/threads/{threads[0]}/messages", json={"content": "after"}, headers=auth("alice"))
    assert after.status_code == 201 and len(after.json()["replies"]) == 1
