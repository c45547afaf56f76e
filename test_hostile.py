"""Break it on purpose: arbitrary bodies, queries, ids and frames at every route and at the socket (each
gets a contract 4xx with a detail, or an error frame on a socket that stays open, never a 5xx); junk resume
points; oversized, deep, undecodable and unencodable input; huge headers; every upstream fault on every
transport (REST, SSE, WebSocket); and a thousand socket lifetimes that must leave nothing behind."""

import asyncio
import itertools
import json
import os
import tracemalloc
from collections import Counter
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from starlette.testclient import TestClient, WebSocketDenialResponse
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from auth import JWTSettings
from conftest import TEST_SECRET, config_for, eventually, frames_until, next_frame, serve_live, sse_events, writer_tasks
from main import MAX_BODY_BYTES, MAX_FRAME_CHARS, create_app
from offline_model import FAULTS, FAULTS_AFTER_TEXT
from redis_broker import RedisBroker

pytestmark = pytest.mark.anyio

TIMEOUT = 10
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RUN_EVENTS = {"message.created", "run.started", "text.delta", "run.completed"}
ERROR_CODES = {"invalid_frame", "not_found", "conflict", "limit_reached", "unavailable"}


@pytest.fixture
def app(make_app):
    """No SDK retries, so a fault reaches the service at once; tokens as fast as they come."""
    return make_app(openai_max_retries=0, offline_token_delay=0.0)


@pytest.fixture
def hostile_client(app):
    """A 500 shows up as a status to assert on, not as the server's exception re-raised in the test."""
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def thread_id(hostile_client, auth):
    response = hostile_client.post("/threads", json={"members": ["bob"]}, headers=auth("alice"))
    assert response.status_code == 201
    return response.json()["id"]


def assert_contract_answer(response, allowed: set[int]) -> None:
    assert response.status_code in allowed, (response.status_code, response.text[:200])
    if response.status_code >= 400:
        assert isinstance(response.json()["detail"], str)
        assert response.json()["detail"]


def assert_still_serving(client, auth, thread: str) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/assistants", headers=auth("alice")).status_code == 200
    assert client.get("/threads", headers=auth("alice")).status_code == 200
    normal = client.post(f"/threads/{thread}/messages", json={"content": "normal", "run": False}, headers=auth("alice"))
    assert normal.status_code == 201


# ---------------------------------------------------------------- arbitrary bodies, queries and ids

# Hypothesis leaves lone surrogates out of text; JSON carries them as "\ud800" escapes, so add them back.
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=10)
ASSISTANT = st.sampled_from(["assistant", "nobody"]) | TEXT
FIELDS = {"content": TEXT | st.just("hello"), "run": st.booleans(), "assistant": ASSISTANT,
          "assistants": st.lists(ASSISTANT, max_size=9), "type": st.sampled_from(["message", "run", "cancel"]) | TEXT,
          "run_id": TEXT | st.just("run_0"), "name": TEXT, "model": TEXT, "instructions": TEXT,
          "members": st.lists(TEXT | st.just("bob"), max_size=12), "title": TEXT | st.just("a title")}


def objects(*names: str):
    """JSON objects made of the route's own fields (any subset), each with a plausible or an arbitrary value."""
    return st.fixed_dictionaries({}, optional={name: FIELDS[name] | JSON for name in names})


def bodies(*names: str):
    raw = st.binary(max_size=64) | st.builds(lambda junk: b'{"content": "' + junk + b'"}', st.binary(max_size=16))
    return (JSON | objects(*names)).map(lambda value: json.dumps(value).encode()) | raw


BODY_ROUTES = {  # (method, path): the bodies to throw, the statuses the contract allows
    ("POST", "/assistants"): (bodies("name", "model", "instructions"), {200, 201, 400, 429}),
    ("POST", "/threads"): (bodies("members", "title"), {201, 400, 429}),
    ("PATCH", "/threads/{thread}"): (bodies("members", "title"), {200, 400}),
    ("POST", "/threads/{thread}/messages"): (bodies("content", "run", "assistant", "assistants"), {201, 400, 404, 429}),
    ("POST", "/threads/{thread}/runs"): (bodies("assistant", "assistants"), {200, 400, 404, 429}),
}


@pytest.mark.parametrize("method, route", BODY_ROUTES)
def test_any_body_gets_a_contract_status_with_a_detail_and_never_a_5xx(hostile_client, thread_id, auth, method, route):
    strategy, allowed = BODY_ROUTES[method, route]

    @HYPOTHESIS
    @given(body=strategy)
    def answered_by_the_contract(body: bytes):
        response = hostile_client.request(method, route.format(thread=thread_id), content=body, headers=auth("alice"))
        assert_contract_answer(response, allowed)

    answered_by_the_contract()
    assert_still_serving(hostile_client, auth, thread_id)


QUERY_VALUE = TEXT | st.integers().map(str) | st.sampled_from(
    ["0", "1", "1000", "1001", "-1", "asc", "desc", "", "1e3"])
QUERIES = st.dictionaries(st.sampled_from(["limit", "after", "before", "order", "zz"]), QUERY_VALUE, max_size=4)


def query_string(query: dict) -> str:
    return "&".join(f"{quote(name)}={quote(value, safe='', errors='surrogatepass')}" for name, value in query.items())


@HYPOTHESIS
@given(route=st.sampled_from(["/threads", "/assistants", "/threads/{thread}/messages"]), query=QUERIES)
def test_any_list_query_gets_a_page_or_a_contract_4xx(hostile_client, thread_id, auth, route, query):
    response = hostile_client.get(f"{route.format(thread=thread_id)}?{query_string(query)}", headers=auth("alice"))
    assert_contract_answer(response, {200, 400, 404})
    if response.status_code == 200:
        assert set(response.json()) == {"data", "has_more"}


ID = TEXT.filter(lambda text: text.strip("./") and "/" not in text)
ID_ROUTES = {  # (method, path with {id}): statuses (400: a NUL in the id); the ids are never the thread's own
    ("GET", "/threads/{id}"): {400, 404},
    ("GET", "/threads/{id}/messages"): {400, 404},
    ("PATCH", "/threads/{id}"): {400, 404},
    ("DELETE", "/threads/{id}"): {400, 404},
    ("GET", "/assistants/{id}"): {200, 400, 404},  # an id that names the shared "assistant" is found
    ("DELETE", "/assistants/{id}"): {400, 404},  # alice owns none here
    ("POST", "/threads/{id}/runs"): {400, 404},
    ("POST", "/threads/{thread}/runs/{id}/cancel"): {400, 404},
    ("POST", "/threads/{id}/runs/run_0/cancel"): {400, 404},
}


@HYPOTHESIS
@given(route=st.sampled_from(sorted(ID_ROUTES)), item=ID)
def test_any_id_in_a_path_gets_a_contract_4xx(hostile_client, thread_id, auth, route, item):
    method, path = route
    url = path.format(thread=thread_id, id=quote(item, safe="", errors="surrogatepass"))
    response = hostile_client.request(method, url, json={"title": "x"} if method == "PATCH" else None,
                                      headers=auth("alice"))
    assert_contract_answer(response, ID_ROUTES[route])


# ---------------------------------------------------------------- NUL, which PostgreSQL cannot store

NUL = "nul\u0000here"
NUL_BODIES = {  # (method, path, body) -> the field the 400 names
    ("POST", "/threads", json.dumps({"title": NUL})): "title",
    ("POST", "/threads", json.dumps({"members": ["bob", NUL]})): "members[1]",
    ("PATCH", "/threads/{thread}", json.dumps({"title": NUL})): "title",
    ("PATCH", "/threads/{thread}", json.dumps({"members": [NUL]})): "members[0]",
    ("POST", "/assistants", json.dumps({"name": NUL})): "name",
    ("POST", "/assistants", json.dumps({"name": "poet", "model": NUL})): "model",
    ("POST", "/assistants", json.dumps({"name": "poet", "instructions": NUL})): "instructions",
    ("POST", "/threads/{thread}/messages", json.dumps({"content": NUL})): "content",
    ("POST", "/threads/{thread}/messages", json.dumps({"content": "hi", "assistant": NUL})): "assistant",
    ("POST", "/threads/{thread}/runs", json.dumps({"assistants": ["assistant", NUL]})): "assistants[1]",
    ("GET", "/threads/%00", None): "thread_id",
    ("GET", "/threads/{thread}%00/messages", None): "thread_id",
    ("GET", "/assistants/assistant%00", None): "assistant",
    ("DELETE", "/assistants/x%00", None): "assistant",
    ("POST", "/threads/{thread}/runs/run%00/cancel", None): "run_id",
    ("GET", "/threads/{thread}/messages?after=msg%00", None): "after",
    ("GET", "/threads?before=%00", None): "before",
    ("GET", "/assistants?after=a%00b", None): "after",
}
NUL_FRAMES = {json.dumps({"type": "message", "content": NUL}): "content",
              json.dumps({"type": "run", "assistant": NUL}): "assistant",
              json.dumps({"type": "cancel", "run_id": NUL}): "run_id"}


def test_nul_in_any_text_is_refused_naming_the_field_and_nothing_is_stored_on_either_database(
        make_app, database_url, auth):
    with TestClient(make_app(database_url=database_url), raise_server_exceptions=False) as client:
        thread = client.post("/threads", json={"members": ["bob"]}, headers=auth("alice")).json()["id"]
        for (method, path, body), field in NUL_BODIES.items():
            response = client.request(method, path.format(thread=thread), content=body, headers=auth("alice"))
            assert response.status_code == 400, (path, body, response.status_code, response.text[:200])
            assert response.json()["detail"].startswith(f"{field}: must not contain NUL"), (path, body)
        with client.websocket_connect(f"/threads/{thread}/ws", headers=auth("alice")) as ws:
            assert ws.receive_json()["type"] == "thread.joined"
            for frame, field in NUL_FRAMES.items():
                ws.send_text(frame)
                error = ws.receive_json()
                assert error["type"] == "error" and error["error"]["code"] == "invalid_frame"
                assert error["error"]["message"].startswith(f"{field}: must not contain NUL"), frame
        assert denial_status(client, "/threads/%00/ws", auth("alice")) == 400
        assert client.get(f"/threads/{thread}/messages", headers=auth("alice")).json()["data"] == []
        assert [t["title"] for t in client.get("/threads", headers=auth("alice")).json()["data"]] == [None]
        assert [a["name"] for a in client.get("/assistants", headers=auth("alice")).json()["data"]] == ["assistant"]
        assert_still_serving(client, auth, thread)


# ---------------------------------------------------------------- junk resume points

def not_a_seq(value: str) -> bool:
    return not (value.isascii() and value.isdigit() and len(value) <= 20)


ASCII_JUNK = (st.text(st.characters(codec="ascii", exclude_characters="\r\n\x00"), max_size=24)
              | st.text("0123456789", min_size=21, max_size=30)
              | st.integers(max_value=-1).map(str) | st.floats(allow_nan=True).map(str)).filter(not_a_seq)


def denial_status(client, url: str, headers: dict) -> int:
    try:
        with client.websocket_connect(url, headers=headers):
            return 101
    except WebSocketDenialResponse as denial:
        assert isinstance(denial.json()["detail"], str)
        return denial.status_code


@HYPOTHESIS
@given(after=ASCII_JUNK)
def test_a_junk_resume_point_is_a_400_on_the_socket_and_the_event_stream(hostile_client, thread_id, auth, after):
    query = f"?after={quote(after, safe='')}"
    assert denial_status(hostile_client, f"/threads/{thread_id}/ws{query}", auth("alice")) == 400
    with hostile_client.stream("GET", f"/threads/{thread_id}/events{query}", headers=auth("alice")) as response:
        assert response.status_code == 400
        assert "detail" in json.loads(response.read())
    if after.strip():  # an empty Last-Event-ID means "none", as for EventSource
        header = auth("alice") | {"Last-Event-ID": after}
        with hostile_client.stream("GET", f"/threads/{thread_id}/events", headers=header) as response:
            assert response.status_code == 400


@pytest.mark.parametrize("after", ["²", "1³", "١٢"])
def test_a_resume_point_in_other_digits_is_a_400_too(hostile_client, thread_id, auth, after):
    statuses = [denial_status(hostile_client, f"/threads/{thread_id}/ws?after={quote(after)}", auth("alice"))]
    with hostile_client.stream("GET", f"/threads/{thread_id}/events?after={quote(after)}",
                               headers=auth("alice")) as response:
        statuses.append(response.status_code)
    if after.isascii() or all(ord(char) < 256 for char in after):  # a header value is latin-1
        header = auth("alice") | {"Last-Event-ID": after.encode("latin-1")}
        with hostile_client.stream("GET", f"/threads/{thread_id}/events", headers=header) as response:
            statuses.append(response.status_code)
    assert set(statuses) == {400}


# ---------------------------------------------------------------- arbitrary frames

@pytest.fixture
def prober(hostile_client, auth):
    """An assistant only the probe runs: runs on a thread go in order, so its run ends after every earlier one."""
    response = hostile_client.post("/assistants", json={"name": "prober"}, headers=auth("alice"))
    assert response.status_code == 201
    return "prober"


@pytest.fixture
def open_socket(hostile_client, thread_id, auth, prober):
    with hostile_client.websocket_connect(f"/threads/{thread_id}/ws", headers=auth("alice")) as ws:
        assert ws.receive_json()["type"] == "thread.joined"
        yield ws


FRAMES = ((objects("type", "content", "run", "assistant", "assistants", "run_id") | JSON).map(json.dumps)
          | st.text(max_size=40) | st.binary(max_size=40))


def answers_before_probe(ws) -> list[dict]:
    """Runs the prober after the frame under test; the frames that came before the probe's own run. The
    frame's answer (an error, or its message and runs) comes first: frames are read in order, runs run in order."""
    ws.send_text(json.dumps({"type": "run", "assistant": "prober"}))
    answers = []
    while not ((frame := ws.receive_json())["type"] == "run.started" and frame["assistant"]["name"] == "prober"):
        answers.append(frame)
    while frame["type"] != "run.completed":
        frame = ws.receive_json()
    return answers


@HYPOTHESIS
@given(frame=FRAMES)
def test_any_frame_gets_an_error_frame_or_its_run_events_and_the_socket_stays_open(open_socket, frame):
    open_socket.send_bytes(frame) if isinstance(frame, bytes) else open_socket.send_text(frame)
    answers = answers_before_probe(open_socket)
    kinds = [answer["type"] for answer in answers]
    if "error" in kinds:
        assert kinds == ["error"], (frame, kinds)
        assert answers[0]["error"]["code"] in ERROR_CODES
        assert isinstance(answers[0]["error"]["message"], str)
    else:
        assert kinds, frame
        assert set(kinds) <= RUN_EVENTS, (frame, kinds)


# ---------------------------------------------------------------- specific hostile input

HOSTILE_BODIES = {  # sent to every body route; each status is what the contract gives on all of them
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
    "lone surrogate title": (b'{"title": "\\ud800"}', 400),
    "lone surrogate content": (b'{"content": "\\ud800", "run": false}', 400),
}


def test_oversized_deep_undecodable_and_unencodable_bodies_get_413_or_400_on_every_route(
        hostile_client, thread_id, auth):
    wrong = {}
    for (method, route), (case, (body, status_code)) in itertools.product(BODY_ROUTES, HOSTILE_BODIES.items()):
        content = body() if callable(body) else body
        response = hostile_client.request(method, route.format(thread=thread_id), content=content,
                                          headers=auth("alice"))
        if (response.status_code, type(response.json().get("detail"))) != (status_code, str):
            wrong[route, case] = response.status_code, response.text[:80]
    assert wrong == {}
    assert_still_serving(hostile_client, auth, thread_id)  # also: no unencodable assistant poisons the listing


# ---------------------------------------------------------------- one live server for the rest

@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def shared(tmp_path_factory):
    """A real uvicorn for this module's live tests, each on threads of its own. No SDK retries, and a
    client that gives up on a silent upstream after a second (the "hang" fault)."""
    config = config_for(tmp_path_factory.mktemp("hostile"), openai_max_retries=0,
                                  openai_timeout_seconds=1.0, max_runs_per_user=4)
    async with serve_live(create_app(config, JWTSettings(secret=TEST_SECRET))) as service:
        yield service


@pytest.mark.parametrize(("reached", "peer", "header", "signed_in"), [
    ("127.0.0.1", "127.0.0.1", None, True),
    ("[::1]", "::1", None, True),
    # What a proxy-headers middleware leaves when it took the peer from X-Forwarded-For: the header is there.
    ("127.0.0.1", "127.0.0.1", ("X-Forwarded-For", "127.0.0.1"), False),
    ("127.0.0.1", "127.0.0.1", ("Forwarded", "for=127.0.0.1"), False),
    # A peer that reached this machine on an address of its network: never from this machine alone.
    ("192.0.2.10", "127.0.0.1", None, False),
    ("127.0.0.1", "192.0.2.20", None, False),
], ids=["loopback", "loopback v6", "x-forwarded-for", "forwarded", "reached from the network", "remote peer"])
def test_demo_tokens_go_only_to_a_connection_between_two_loopback_addresses_with_no_proxy(
        tmp_path, reached, peer, header, signed_in):
    app = create_app(config_for(tmp_path))  # no JWT_SECRET_KEY: dev mode
    with TestClient(app, base_url=f"http://{reached}", client=(peer, 50000)) as client:
        page = client.get("/", headers=dict([header]) if header else {}).text
    assert ('type="application/json">null</script>' not in page) is signed_in
    assert ("eyJ" in page) is signed_in


async def joined_socket(live, thread: str, headers: dict, query: str = ""):
    """A real socket on the thread, past its thread.joined (the `join` fixture keeps every socket it opens
    until the test ends: too many for the soak)."""
    ws = await connect(live.socket_url(thread, query), additional_headers=headers, open_timeout=TIMEOUT)
    assert (await next_frame(ws))["type"] == "thread.joined"
    return ws


async def until_run_ends(ws) -> list[dict]:
    frames = [await next_frame(ws)]
    while frames[-1]["type"] not in ("run.completed", "run.failed", "run.cancelled"):
        frames.append(await next_frame(ws))
    return frames


async def test_hostile_frames_and_a_flood_over_a_real_socket_get_answers_and_the_socket_stays_open(shared, auth):
    """TestClient hands frames over as Python strings; only a real socket has to encode the answer."""
    thread = await shared.new_thread(auth, "flooder")
    ws = await joined_socket(shared, thread, auth("flooder"))
    try:
        for frame, code in [('{"type": "message", "content": "\\ud800"}', "invalid_frame"),
                            ('{"type": "run", "\\ud800": 1}', "invalid_frame"),
                            ("[" * (MAX_FRAME_CHARS - 1), "invalid_frame"),
                            ('{"type": "message", "content": "' + "x" * MAX_FRAME_CHARS + '"}', "invalid_frame"),
                            (b"\xff\xfe not text", "invalid_frame"),
                            ('{"type": "cancel", "run_id": "run_nope"}', "not_found"),
                            ('{"type": "message", "content": "hi", "assistant": "nobody"}', "not_found")]:
            await ws.send(frame)
            answer = await next_frame(ws, timeout=2)  # an answer takes milliseconds
            assert answer["type"] == "error", frame[:40]
            assert answer["error"]["code"] == code, frame[:40]
        # json.dumps escapes the emoji as a surrogate pair ("\\ud83d\\udcaa"): that is valid and must stay accepted.
        await ws.send(json.dumps({"type": "message", "content": "\U0001F4AA", "run": False}))
        assert (await next_frame(ws))["message"]["content"] == "\U0001F4AA"
        # A flood of runs: past the user's limit (4 waiting or active here) each gets limit_reached; none is lost.
        flood = [json.dumps({"type": "message", "content": f"flood {n}"}) for n in range(40)]
        for frame in flood:
            await ws.send(frame)
        answers = Counter()
        while sum(answers[kind] for kind in ("message.created", "limit_reached")) < len(flood) or (
                answers["run.completed"] < answers["message.created"]):
            frame = await next_frame(ws)
            answers[frame["error"]["code"] if frame["type"] == "error" else frame["type"]] += 1
        assert set(answers) <= {"message.created", "limit_reached", "run.started", "text.delta", "run.completed"}
        assert answers["limit_reached"], answers
        assert answers["run.started"] == answers["message.created"]
        stored = await shared.messages(auth, thread, "flooder")
        flooded = [m for m in stored if m["role"] == "user" and m["content"].startswith("flood")]
        assert len(flooded) == answers["message.created"]
        await ws.send(json.dumps({"type": "message", "content": "still here"}))
        frames = await frames_until(ws, "run.completed")
        assert frames[0]["message"]["content"] == "still here"
        # Cancelling a run that has ended: 409 over REST, a conflict error frame over the socket.
        ended = frames[-1]["run_id"]
        refused = await shared.http.post(f"/threads/{thread}/runs/{ended}/cancel", headers=auth("flooder"))
        assert refused.status_code == 409
        assert isinstance(refused.json()["detail"], str)
        await ws.send(json.dumps({"type": "cancel", "run_id": ended}))
        answer = await next_frame(ws)
        assert answer["type"] == "error"
        assert answer["error"]["code"] == "conflict"
    finally:
        await ws.close()


async def raw_exchange(live, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*live.url.removeprefix("http://").split(":"))
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


async def test_huge_headers_get_a_4xx_and_the_server_keeps_serving(shared, auth):
    huge = b"a" * 100 * 1024
    # A complete request is parsed and reaches the app, which refuses the junk token without echoing it.
    complete = await raw_exchange(shared, b"GET /assistants HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                          b"Authorization: Bearer " + huge + b"\r\n\r\n")
    assert complete.startswith(b"HTTP/1.1 401 "), complete[:200]
    assert complete.endswith(b'{"detail":"invalid token"}'), complete[-200:]
    # A header block still open past h11's 16 KiB limit is refused by uvicorn itself (plain uvicorn: h11).
    unfinished = await raw_exchange(shared, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + huge)
    assert unfinished.startswith(b"HTTP/1.1 4"), unfinished[:200]
    # As many headers as fit, on a real route.
    many = b"".join(b"X-H%d: v\r\n" % n for n in range(1000))
    crowded = await raw_exchange(shared, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + many + b"\r\n")
    assert crowded.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 4")), crowded[:200]
    assert (await shared.http.get("/health")).status_code == 200
    assert (await shared.http.get("/assistants", headers=auth("alice"))).status_code == 200


# ---------------------------------------------------------------- upstream faults on every transport

FAULT_OUTCOMES = {  # fault -> (how the run ends, the status of POST /runs when its one run failed)
    "server_error": ("run.failed upstream_error", 502), "unauthorized": ("run.failed upstream_auth", 502),
    "rate_limited": ("run.failed rate_limited", 503), "hang": ("run.failed timeout", 504),
    "response_failed": ("run.failed server_error", 502), "incomplete": ("run.failed incomplete", 502),
    "error_event": ("run.failed server_error", 502), "flat_error_event": ("run.failed server_error", 502),
    "disconnect": ("run.failed connection_error", 502), "malformed": ("run.failed invalid_stream", 502),
    "refusal": ("run.completed", 200), "commentary": ("run.completed", 200),
}


def ending(frames: list[dict]) -> str:
    """How the run ended; a failure must say what failed: error {code, message}."""
    last = frames[-1]
    if last["type"] == "run.failed":
        return f"run.failed {last['error']['code']}" if all(last["error"].values()) else "unexplained"
    return last["type"]


def run_shape(frames: list[dict]) -> tuple[list[str], str]:
    """Frame kinds without the deltas, and the deltas' text: a socket may get its pending deltas merged."""
    return [f["type"] for f in frames if f["type"] != "text.delta"], "".join(f.get("delta", "") for f in frames)


async def post_streamed(live, path: str, body: dict, headers: dict) -> list[dict]:
    async with live.http.stream("POST", path, json=body, headers=headers | {"Accept": "text/event-stream"}) as response:
        assert response.status_code == (201 if path.endswith("/messages") else 200)  # as its JSON answer
        assert response.headers["content-type"].startswith("text/event-stream")
        return await sse_events(response)


async def fault_outcome(live, auth, fault: str) -> tuple:
    """The fault hits a run asked for over the socket, then over SSE, then over REST (a message, then a
    run without one); then a normal run. A socket on the thread watches all of it."""
    thread, alice = await live.new_thread(auth), auth("alice")
    watcher = await joined_socket(live, thread, alice)
    seen = []  # everything a client got: none of the upstream's own text may be in it

    async def watched() -> list[dict]:
        seen.extend(frames := await until_run_ends(watcher))
        return frames

    try:
        live.services.offline_model.fail_next(fault)
        await watcher.send(json.dumps({"type": "message", "content": "over the socket"}))
        over_socket = ending(await watched())
        live.services.offline_model.fail_next(fault)
        over_sse = await post_streamed(live, f"/threads/{thread}/messages", {"content": "over sse"}, alice)
        seen.extend(over_sse)
        sse_reached_the_socket = run_shape(await watched()) == run_shape(over_sse)
        live.services.offline_model.fail_next(fault)
        message = await live.http.post(f"/threads/{thread}/messages", json={"content": "over rest"}, headers=alice)
        await watched()
        over_rest = (message.status_code, len(message.json()["replies"]),
                     [error["code"] for error in message.json()["errors"]])
        live.services.offline_model.fail_next(fault)
        runs = await live.http.post(f"/threads/{thread}/runs", headers=alice)
        runs_on_the_socket = ending(await watched())
        assert runs.status_code >= 400 or runs.json()["replies"]
        assert runs.status_code < 400 or isinstance(runs.json()["detail"], str)
        after = (await live.http.post(f"/threads/{thread}/messages", json={"content": "after"}, headers=alice)).json()
        await watched()
    finally:
        await watcher.close()
    seen += [message.json(), runs.json(), after]
    for upstream_text in ("sk-proj", "told to fail", "mid-stream", "Rate limit reached"):
        assert upstream_text not in json.dumps(seen), (fault, upstream_text)
    kept = [m["content"] for m in await live.messages(auth, thread) if m["role"] == "user"]
    return (over_socket, ending(over_sse), sse_reached_the_socket, over_rest, runs.status_code, runs_on_the_socket,
            (len(after["replies"]), after["errors"]), kept)


async def test_a_fault_fails_the_run_on_every_transport_keeps_the_message_and_the_next_run_works(shared, auth):
    assert set(FAULT_OUTCOMES) == set(FAULTS)
    outcomes = {fault: await fault_outcome(shared, auth, fault) for fault in FAULT_OUTCOMES}
    expected = {}
    for fault, (ends, status_code) in FAULT_OUTCOMES.items():
        failed = ends.startswith("run.failed")
        # A run that fails after text streamed answers with that text among the replies, marked failed.
        over_rest = (201, int(fault in FAULTS_AFTER_TEXT), [ends.split()[1]]) if failed else (201, 1, [])
        expected[fault] = (ends, ends, True, over_rest, status_code, ends, (1, []),
                           ["over the socket", "over sse", "over rest", "after"])
    assert outcomes == expected


# ---------------------------------------------------------------- a thousand socket lifetimes

SOAK_CYCLES, SOAK_BATCH, SOAK_THREADS = 1000, 50, 10
LIFETIMES = {0: "refused 401", 1: "refused 404", 2: "closed mid-run", 3: "aborted mid-run", 4: "resynced and left",
             5: "event stream dropped"}  # the other kinds: "joined and left"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def refused_status(live, thread: str, headers: dict) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await connect(live.socket_url(thread), additional_headers=headers, open_timeout=TIMEOUT)
    return refused.value.response.status_code


async def socket_lifetime(live, auth, cycle: int, threads: list[str], foreign: str) -> str:
    """One of seven lifetimes, by cycle number; says which, and how it ended."""
    kind, thread = cycle % 10, threads[cycle // 10 % len(threads)]
    if kind == 0:
        return f"refused {await refused_status(live, thread, {'Authorization': 'Bearer not-a-token'})}"
    if kind == 1:
        return f"refused {await refused_status(live, foreign, auth('alice'))}"
    if kind == 5:
        async with live.http.stream("GET", f"/threads/{thread}/events", headers=auth("alice")) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    assert json.loads(line[5:])["type"] == "thread.joined"
                    break
        return "event stream dropped"
    ws = await joined_socket(live, thread, auth("alice"), "?after=1" if kind == 4 else "")
    if kind == 4:
        assert (await next_frame(ws))["type"] == "resync"
    if kind in (2, 3):
        await ws.send(json.dumps({"type": "message", "content": f"cycle {cycle}"}))
        while (await next_frame(ws))["type"] != "text.delta":
            pass
        if kind == 3:
            ws.transport.abort()  # gone without a close frame, as when a phone loses its network
            return "aborted mid-run"
    await ws.close()
    return LIFETIMES.get(kind, "joined and left")


@pytest.fixture
def soak_app(make_app):
    """Slow enough tokens to leave mid-run; the default socket limit (20 a user: one batch); runs unbounded."""
    return make_app(offline_token_delay=0.001, max_runs_per_user=1000, max_waiting_runs=1000,
                    max_sockets_per_user=SOAK_BATCH)


async def test_a_thousand_socket_lifetimes_leave_no_socket_task_listener_slot_or_descriptor_behind(soak_app, auth):
    async with serve_live(soak_app) as live:
        threads = list(await asyncio.gather(*(live.new_thread(auth) for _ in range(SOAK_THREADS))))
        foreign = await live.new_thread(auth, owner="bob")
        # The SDK pools up to one connection to the offline model per busy thread, 2 fds each (both ends are in
        # this process): count from a warmed pool, allow what all threads busy at once may still add, plus a few
        # for the test's own HTTP client. A leak per socket lifetime would be hundreds over.
        await asyncio.gather(*(live.http.post(f"/threads/{t}/messages", json={"content": "warm up"},
                                              headers=auth("alice")) for t in threads))
        baseline, slack = open_fds(), 2 * SOAK_THREADS + 4
        state = live.services

        outcomes = Counter()
        for first in range(0, SOAK_CYCLES, SOAK_BATCH):
            outcomes.update(await asyncio.gather(
                *(socket_lifetime(live, auth, cycle, threads, foreign) for cycle in range(first, first + SOAK_BATCH))))
            # Every slot of the batch comes back, or the next batch meets the 20-socket limit.
            assert await eventually(lambda: not state.broker.slots), state.broker.slots
        assert outcomes == {"refused 401": 100, "refused 404": 100, "closed mid-run": 100, "aborted mid-run": 100,
                            "resynced and left": 100, "event stream dropped": 100, "joined and left": 400}

        def leftovers() -> dict:
            return {"active runs": state.engine.active_runs(), "listeners": state.hub.threads,
                    "slots": state.broker.slots, "writer tasks": list(writer_tasks()),
                    "fds over slack": max(0, open_fds() - baseline - slack)}

        nothing_left = {"active runs": 0, "listeners": {}, "slots": {}, "writer tasks": [], "fds over slack": 0}
        await eventually(lambda: leftovers() == nothing_left, timeout=30)
        assert leftovers() == nothing_left
        after = await live.http.post(f"/threads/{threads[0]}/messages", json={"content": "after"},
                                     headers=auth("alice"))
        assert after.status_code == 201
        assert len(after.json()["replies"]) == 1


# ---------------------------------------------------------------- numbers from Redis

async def test_an_event_far_ahead_of_the_one_expected_costs_a_resync_not_memory(redis_url):
    """A restarted Redis counts a thread's seq on from the clock: the next event seen may come millions
    after the last. What lies between cannot be in the log; asking for it must cost nothing."""
    url, prefix = redis_url
    broker = RedisBroker(url, prefix=prefix)
    delivered, resyncs = [], []
    await broker.open(lambda thread_id, events: delivered.extend(events), lambda message: None,
                      lambda thread_id, seq: resyncs.append(seq))
    try:
        await broker.watch("far")
        latest = (await broker.catch_up("far", None)).seq
        async with Redis.from_url(url) as redis:
            await redis.incrby(f"{prefix}t:far:seq", 5_000_000)
        tracemalloc.start()
        broker.publish("far", {"type": "message.created", "thread_id": "far", "message": {}})
        assert await eventually(lambda: delivered, timeout=TIMEOUT)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        await broker.close()
    assert resyncs == [latest + 5_000_000]
    assert [event.seq for event in delivered] == [latest + 5_000_001]
    assert peak < 2**20
