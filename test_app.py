"""Tests for the REST half of main.py (CONTRACT.md): routes, errors, authorization, upstream failures,
Server-Sent Events, run ordering under concurrency, the bounded run queue and departing clients."""

import asyncio
import base64
import contextlib
import json
import time

import jwt
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from auth import JWTSettings
from conftest import TEST_SECRET, serve_live
import main
from main import MAX_BODY_BYTES, MAX_CONTENT_CHARS, MAX_MEMBERS, Config, create_app

MISSING_THREAD = "conv_" + "0" * 48  # well formed, but the upstream has no such conversation
SETTINGS = JWTSettings(secret=TEST_SECRET)  # the secret of conftest's `auth` fixture
THREAD_ROUTES = [("GET", "", None), ("GET", "/messages", None), ("POST", "/messages", {"content": "hi"}),
                 ("POST", "/runs", None)]  # (method, path after /threads/{id}, JSON body)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One app for the module (start-up costs a few tenths of a second); every test makes its own threads.
    No SDK retries, so one injected fault fails one run."""
    config = Config(assistants_file=tmp_path_factory.mktemp("app") / "assistants.json",
                    offline_token_delay=0.0, openai_max_retries=0)
    with TestClient(create_app(config, SETTINGS)) as test_client:
        yield test_client


def assert_error(response, status_code: int, *words: str) -> str:
    """An error answer: the status, a JSON `detail` for a person that names `words`, nothing internal."""
    assert response.status_code == status_code, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert all(word in detail for word in words), detail
    assert "Traceback" not in response.text and "eyJ" not in response.text  # every JWT starts with eyJ
    assert "sk-" not in response.text  # OpenAI keys start with sk-; the upstream may quote one
    return detail


def new_thread(client, auth, owner: str = "alice", **body) -> dict:
    response = client.post("/threads", json=body, headers=auth(owner))
    assert response.status_code == 201, response.text
    return response.json()


def post_message(client, auth, thread_id: str, sub: str = "alice", **body):
    return client.post(f"/threads/{thread_id}/messages", json=body, headers=auth(sub))


def messages(client, auth, thread_id: str, sub: str = "alice") -> list[dict]:
    response = client.get(f"/threads/{thread_id}/messages", headers=auth(sub))
    assert response.status_code == 200, response.text
    return response.json()


def b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def sse_events(response) -> list[dict]:
    """The `data:` payloads of a Server-Sent Events body, each checked against its `event:` line."""
    events, event_type = [], None
    async for line in response.aiter_lines():
        field, _, value = line.partition(":")
        if field == "event":
            event_type = value.strip()
        elif field == "data":
            events.append(json.loads(value))
            assert events[-1]["type"] == event_type
    return events


def assert_turns_alternate(stored: list[dict]) -> None:
    """user, assistant, user, assistant...: each reply answers the user message just before it."""
    assert [m["role"] for m in stored] == ["user", "assistant"] * (len(stored) // 2)
    for question, reply in zip(stored[0::2], stored[1::2]):
        assert f"heard: {question['content']} (" in reply["content"]


# ---------- authentication on the real app ----------

def in_an_hour() -> int:
    return int(time.time()) + 3600


REFUSED = {  # Authorization header -> the detail the client gets
    "missing header": (lambda: None, "missing bearer token"),
    "not bearer": (lambda: "Basic YWxpY2U6cHc=", "missing bearer token"),
    "garbage": (lambda: "Bearer garbage", "invalid token"),
    "bad signature": (lambda: "Bearer " + jwt.encode({"sub": "alice", "exp": in_an_hour()}, "x" * 64), "invalid token"),
    "alg none": (lambda: f"Bearer {b64url({'alg': 'none'})}.{b64url({'sub': 'alice', 'exp': in_an_hour()})}.",
                 "invalid token"),
    "expired": (lambda: "Bearer " + jwt.encode({"sub": "alice", "exp": in_an_hour() - 7200}, TEST_SECRET),
                "token expired"),
}


@pytest.mark.parametrize("route", ["GET /assistants", "POST /threads", f"POST /threads/{MISSING_THREAD}/messages"])
@pytest.mark.parametrize(("make_authorization", "detail"), REFUSED.values(), ids=REFUSED.keys())
def test_every_route_but_health_needs_a_valid_token(client, route, make_authorization, detail):
    authorization = make_authorization()
    method, path = route.split()
    response = client.request(method, path, json={"content": "hi"} if method == "POST" else None,
                              headers={"Authorization": authorization} if authorization else {})
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert assert_error(response, 401) == detail


def test_health_is_open(client):
    response = client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


# ---------- assistants ----------


def test_assistants_are_created_once_and_never_modified(client, auth):
    created = client.post("/assistants", json={"name": "coach", "instructions": "Be brief."}, headers=auth("alice"))
    assert created.status_code == 201
    coach = created.json()
    assert coach["name"] == "coach" and coach["instructions"] == "Be brief." and coach["id"] and coach["model"]
    again = client.post("/assistants", json={"name": "coach", "instructions": "Be long.", "model": "other"},
                        headers=auth("bob"))
    assert (again.status_code, again.json()) == (200, coach)
    assert client.get(f"/assistants/{coach['id']}", headers=auth("bob")).json() == coach
    assert client.get("/assistants/coach", headers=auth("bob")).json() == coach
    listed = client.get("/assistants", headers=auth("alice")).json()
    assert coach in listed and "assistant" in [a["name"] for a in listed]
    assert_error(client.get("/assistants/nobody", headers=auth("alice")), 404, "nobody")


@pytest.mark.parametrize(("body", "words"), [
    ({}, ["name"]), ({"name": ""}, ["name"]), ({"name": "  "}, ["name"]), ({"name": 7}, ["name"]),
    ({"name": "x", "colour": "red"}, ["colour"]), ({"name": "x", "model": ["m"]}, ["model"]),
    ({"name": "x" * 65}, ["name"]), ("{not json", ["JSON"]), ("[1, 2]", ["object"]), ("", ["JSON"]),
], ids=["no name", "empty name", "blank name", "number name", "unknown field", "list model", "long name",
        "malformed", "array", "empty body"])
def test_bad_assistant_bodies_get_400_naming_the_field(client, auth, body, words):
    content = body if isinstance(body, str) else json.dumps(body)
    before = client.get("/assistants", headers=auth("alice")).json()
    assert_error(client.post("/assistants", content=content, headers=auth("alice")), 400, *words)
    assert client.get("/assistants", headers=auth("alice")).json() == before


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_256_kib_gets_413(client, auth, chunked):
    body = json.dumps({"name": "big", "instructions": "x" * MAX_BODY_BYTES}).encode()
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    assert_error(client.post("/assistants", content=content, headers=auth("alice")), 413)
    assert client.get("/assistants/big", headers=auth("alice")).status_code == 404
    thread = new_thread(client, auth)
    assert_error(post_message(client, auth, thread["id"], content="x" * MAX_BODY_BYTES), 413)


# ---------- threads ----------


def test_threads_have_an_owner_and_members_and_the_body_is_optional(client, auth):
    thread = new_thread(client, auth, members=["bob", "alice", "bob"])
    assert thread["owner"] == "alice" and thread["members"] == ["bob"] and thread["id"]
    assert isinstance(thread["created_at"], int)
    assert client.get(f"/threads/{thread['id']}", headers=auth("alice")).json() == thread
    bare = client.post("/threads", headers=auth("carol"))
    assert bare.status_code == 201 and bare.json()["owner"] == "carol" and bare.json()["members"] == []


@pytest.mark.parametrize(("body", "word"), [
    *[({"members": members}, "members") for members in (
        "bob", {"bob": True}, {}, [""], ["  "], [7], [["bob"]], [f"user{i}" for i in range(MAX_MEMBERS + 1)])],
    ({"owner": "bob"}, "owner"), ("{", "JSON"), ("[]", "object"),
], ids=["string", "object", "empty object", "empty string", "blank", "number", "nested list", "too many members",
        "unknown field", "malformed", "array"])
def test_bad_thread_bodies_get_400(client, auth, body, word):
    content = body if isinstance(body, str) else json.dumps(body)
    assert_error(client.post("/threads", content=content, headers=auth("alice")), 400, word)


def test_a_user_id_too_long_for_the_upstream_cannot_own_a_thread(client, auth):
    assert_error(client.post("/threads", headers=auth("u" * 513)), 400, "sub")
    assert client.post("/threads", headers=auth("u" * 512)).status_code == 201


@pytest.mark.parametrize("setting", [{"max_waiting_runs": 0}, {"openai_timeout_seconds": 0},
                                     {"openai_max_retries": -1}, {"offline_token_delay": -1}])
def test_impossible_settings_are_refused_at_start_up(setting):
    with pytest.raises(ValueError):
        Config(**setting)


# ---------- messages and runs ----------


def test_a_message_is_stored_and_answered(client, auth):
    thread = new_thread(client, auth)
    response = post_message(client, auth, thread["id"], content="hello there")
    assert response.status_code == 201
    turn = response.json()
    assert set(turn) == {"message", "replies", "errors"} and turn["errors"] == []
    assert turn["message"] | {"id": None, "created_at": None} == {
        "id": None, "created_at": None, "role": "user", "content": "hello there", "author": "alice"}
    [reply] = turn["replies"]
    assert reply["role"] == "assistant" and reply["assistant"]["name"] == "assistant"
    assert "assistant heard: hello there" in reply["content"]
    stored = messages(client, auth, thread["id"])
    assert [(m["id"], m["content"]) for m in stored] == [(m["id"], m["content"]) for m in (turn["message"], reply)]
    assert stored[0]["author"] == "alice" and stored[1]["assistant"] == reply["assistant"]


def test_run_false_stores_without_a_reply_and_runs_answer_later(client, auth):
    thread = new_thread(client, auth)
    quiet = post_message(client, auth, thread["id"], content="note this", run=False)
    assert quiet.status_code == 201 and quiet.json()["replies"] == [] and quiet.json()["errors"] == []
    assert [m["content"] for m in messages(client, auth, thread["id"])] == ["note this"]
    run = client.post(f"/threads/{thread['id']}/runs", headers=auth("alice"))
    assert run.status_code == 200 and set(run.json()) == {"replies", "errors"} and run.json()["errors"] == []
    assert "heard: note this" in run.json()["replies"][0]["content"]
    longest = post_message(client, auth, thread["id"], content="x" * MAX_CONTENT_CHARS, run=False)
    assert longest.status_code == 201
    assert [m["role"] for m in messages(client, auth, thread["id"])] == ["user", "assistant", "user"]


def test_several_assistants_answer_in_order(client, auth):
    first, second = (client.post("/assistants", json={"name": name}, headers=auth("alice")).json()
                     for name in ("first", "second"))
    thread = new_thread(client, auth)
    turn = post_message(client, auth, thread["id"], content="both of you", assistants=["first", second["id"]]).json()
    assert [r["assistant"] for r in turn["replies"]] == [
        {"id": first["id"], "name": "first"}, {"id": second["id"], "name": "second"}]
    stored = messages(client, auth, thread["id"])
    assert [m["content"].split(" heard:")[0] for m in stored] == ["both of you", "[offline model] first",
                                                                  "[offline model] second"]
    runs = client.post(f"/threads/{thread['id']}/runs", json={"assistant": "second"}, headers=auth("alice"))
    assert [r["assistant"]["name"] for r in runs.json()["replies"]] == ["second"]


@pytest.fixture(scope="module")
def untouched_thread(client) -> str:
    """A thread only refused requests go to: it must stay empty."""
    return client.post("/threads", headers={"Authorization": f"Bearer {SETTINGS.mint('alice')}"}).json()["id"]


@pytest.mark.parametrize(("body", "status_code", "words"), [
    ({"content": "hi", "assistant": "nobody"}, 404, ["nobody"]),
    ({"content": "hi", "assistants": ["assistant", "nobody"]}, 404, ["nobody"]),
    ({}, 400, ["content"]), ({"content": ""}, 400, ["content"]), ({"content": " \n"}, 400, ["content"]),
    ({"content": 5}, 400, ["content"]), ({"content": "x" * (MAX_CONTENT_CHARS + 1)}, 400, ["content"]),
    ({"content": "hi", "run": "yes"}, 400, ["run"]), ({"content": "hi", "assistants": []}, 400, ["assistants"]),
    ({"content": "hi", "assistant": "a", "assistants": ["b"]}, 400, ["assistant"]),
    ({"content": "hi", "colour": "red"}, 400, ["colour"]),
    ({"content": "hi", "type": "message"}, 400, ["type"]),
], ids=["unknown assistant", "one unknown of two", "no content", "empty", "blank", "number", "too long",
        "run not bool", "no assistants", "both", "unknown field", "a frame's type field"])
def test_bad_messages_are_refused_and_not_stored(client, auth, untouched_thread, body, status_code, words):
    assert_error(post_message(client, auth, untouched_thread, **body), status_code, *words)
    assert messages(client, auth, untouched_thread) == []


@pytest.mark.parametrize("thread_id", [MISSING_THREAD, "..%2Fx", "..", "x.y", "a" * 300, "%00", "conv_%20x"])
def test_unknown_or_weird_thread_ids_get_404(client, auth, thread_id):
    for method, suffix, body in THREAD_ROUTES:
        response = client.request(method, f"/threads/{thread_id}{suffix}", json=body, headers=auth("alice"))
        assert_error(response, 404)


# ---------- authorization ----------


def test_a_foreign_thread_looks_exactly_like_a_missing_one(client, auth):
    thread = new_thread(client, auth)
    runs_before = client.app.state.offline_model.responses_started
    for method, suffix, body in [*THREAD_ROUTES, ("POST", "/messages", {"content": ""})]:
        foreign = client.request(method, f"/threads/{thread['id']}{suffix}", json=body, headers=auth("bob"))
        missing = client.request(method, f"/threads/{MISSING_THREAD}{suffix}", json=body, headers=auth("bob"))
        assert_error(foreign, 404)
        assert (foreign.status_code, foreign.json()) == (missing.status_code, missing.json())
    denials = []
    for thread_id in (thread["id"], MISSING_THREAD):
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(f"/threads/{thread_id}/ws", headers=auth("bob")):
                pass
        denials.append((denied.value.status_code, denied.value.json()))
    assert denials[0] == denials[1] and denials[0][0] == 404
    assert messages(client, auth, thread["id"]) == []
    assert client.app.state.offline_model.responses_started == runs_before


def test_members_share_the_thread_fully(client, auth):
    thread = new_thread(client, auth, members=["bob"])
    assert client.get(f"/threads/{thread['id']}", headers=auth("bob")).json() == thread
    assert post_message(client, auth, thread["id"], "bob", content="from bob").json()["message"]["author"] == "bob"
    assert post_message(client, auth, thread["id"], "alice", content="from alice", run=False).status_code == 201
    assert client.post(f"/threads/{thread['id']}/runs", headers=auth("bob")).status_code == 200
    with client.websocket_connect(f"/threads/{thread['id']}/ws", headers=auth("bob")) as socket:
        assert socket.receive_json()["type"] == "thread.joined"
    seen_by_bob = messages(client, auth, thread["id"], "bob")
    assert seen_by_bob == messages(client, auth, thread["id"], "alice")
    assert [(m["role"], m.get("author")) for m in seen_by_bob] == [
        ("user", "bob"), ("assistant", None), ("user", "alice"), ("assistant", None)]
    assert_error(client.get(f"/threads/{thread['id']}", headers=auth("carol")), 404)


# ---------- upstream failures ----------


@pytest.mark.parametrize(("fault", "status_code"), [
    ("server_error", 502), ("response_failed", 502), ("error_event", 502), ("disconnect", 502), ("rate_limited", 503),
    ("malformed", 502), ("unauthorized", 502),
])
def test_runs_that_all_fail_map_to_the_upstream_status(client, auth, fault, status_code):
    thread = new_thread(client, auth)
    client.app.state.offline_model.fail_next(fault)
    response = client.post(f"/threads/{thread['id']}/runs", headers=auth("alice"))
    assert_error(response, status_code)
    assert ("retry-after" in response.headers) == (fault == "rate_limited")
    assert int(response.headers.get("retry-after", 1)) >= 1
    assert client.post(f"/threads/{thread['id']}/runs", headers=auth("alice")).status_code == 200


def test_a_message_whose_runs_all_fail_is_still_stored_with_the_errors(client, auth):
    thread = new_thread(client, auth)
    client.app.state.offline_model.fail_next("rate_limited")
    response = post_message(client, auth, thread["id"], content="keep me")
    assert response.status_code == 201 and "Traceback" not in response.text and "eyJ" not in response.text
    turn = response.json()
    assert turn["message"]["content"] == "keep me" and turn["replies"] == []
    [error] = turn["errors"]
    assert set(error) == {"assistant", "code", "message"} and error["message"]
    assert error["assistant"]["name"] == "assistant" and error["code"] == "rate_limited"
    assert [m["content"] for m in messages(client, auth, thread["id"])] == ["keep me"]
    rerun = client.post(f"/threads/{thread['id']}/runs", headers=auth("alice")).json()
    assert rerun["errors"] == [] and "heard: keep me" in rerun["replies"][0]["content"]


# ---------- over a real socket ----------

async def live_thread(http, auth) -> str:
    return (await http.post("/threads", headers=auth("alice"))).json()["id"]


async def live_messages(http, auth, thread_id: str) -> list[dict]:
    return (await http.get(f"/threads/{thread_id}/messages", headers=auth("alice"))).json()


@pytest.mark.anyio
async def test_events_stream_in_contract_order(live, auth):
    await live.http.post("/assistants", json={"name": "second"}, headers=auth("alice"))
    thread_id = await live_thread(live.http, auth)
    headers = {"Accept": "text/event-stream", **auth("alice")}
    body = {"content": "stream it", "assistants": ["assistant", "second"]}
    async with live.http.stream("POST", f"/threads/{thread_id}/messages", json=body, headers=headers) as response:
        assert response.status_code in (200, 201)
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await sse_events(response)
    assert all(event["thread_id"] == thread_id for event in events)
    assert events[0]["type"] == "message.created" and events[0]["message"]["author"] == "alice"
    runs, replies = [], []
    for event in events[1:]:
        if event["type"] == "run.started":
            runs.append({"id": event["run_id"], "name": event["assistant"]["name"], "deltas": [], "done": None})
            continue
        run = runs[-1]
        assert event["run_id"] == run["id"] and run["done"] is None
        if event["type"] == "text.delta":
            run["deltas"].append(event["delta"])
        else:
            assert event["type"] == "run.completed"
            run["done"] = event["message"]
            replies.append(event["message"]["content"])
    assert [run["name"] for run in runs] == ["assistant", "second"]
    for run in runs:
        assert len(run["deltas"]) > 1 and "".join(run["deltas"]) == run["done"]["content"]
    stored = await live_messages(live.http, auth, thread_id)
    assert [m["content"] for m in stored] == ["stream it", *replies]


@pytest.mark.anyio
async def test_concurrent_messages_never_overlap(live, auth):
    thread_id = await live_thread(live.http, auth)

    async def post(index: int):
        return await live.http.post(f"/threads/{thread_id}/messages", json={"content": f"m{index:02d}"},
                                    headers=auth("alice"))

    responses = await asyncio.gather(*(post(i) for i in range(20)))
    assert [r.status_code for r in responses] == [201] * 20
    stored = await live_messages(live.http, auth, thread_id)
    assert sorted(m["content"] for m in stored if m["role"] == "user") == [f"m{i:02d}" for i in range(20)]
    assert_turns_alternate(stored)
    assert live.offline_model.locked_refusals == 0


@contextlib.asynccontextmanager
async def serving(app):
    """The app under a real uvicorn with its lifespan, and an HTTP client for it."""
    async with serve_live(app) as service:
        yield service.http


@pytest.mark.anyio
async def test_a_full_queue_answers_429_and_loses_none_it_accepted(make_app, auth):
    async with serving(make_app(max_waiting_runs=1, offline_token_delay=0.02)) as http:
        thread_id = await live_thread(http, auth)
        contents = [f"q{i}" for i in range(5)]
        responses = await asyncio.gather(*(
            http.post(f"/threads/{thread_id}/messages", json={"content": c}, headers=auth("alice")) for c in contents))
        assert sorted({r.status_code for r in responses}) == [201, 429]
        for response in responses:
            if response.status_code == 429:
                assert_error(response, 429)
                assert int(response.headers["retry-after"]) >= 1
        accepted = [c for c, r in zip(contents, responses) if r.status_code == 201]
        stored = await live_messages(http, auth, thread_id)
        assert sorted(m["content"] for m in stored if m["role"] == "user") == accepted
        assert_turns_alternate(stored)


@pytest.mark.anyio
async def test_a_run_goes_on_when_its_client_leaves(make_app, auth):
    app = make_app(offline_token_delay=0.02)  # slow enough that most of the reply is still to come
    async with serving(app) as http:
        thread_id = await live_thread(http, auth)
        headers = {"Accept": "text/event-stream", **auth("alice")}
        async with http.stream("POST", f"/threads/{thread_id}/messages", json={"content": "bye"},
                               headers=headers) as response:
            async for line in response.aiter_lines():
                if line == "event: text.delta":
                    break
        deltas_when_left = app.state.offline_model.deltas_sent
        # Queued behind the abandoned run on the same thread, so it returns only once that run has ended.
        later = await http.post(f"/threads/{thread_id}/messages", json={"content": "later", "run": False},
                                headers=auth("alice"))
        assert later.status_code == 201
        stored = await live_messages(http, auth, thread_id)
    assert [m["role"] for m in stored] == ["user", "assistant", "user"]
    assert "heard: bye (" in stored[1]["content"] and deltas_when_left < app.state.offline_model.deltas_sent


@pytest.mark.anyio
async def test_an_event_stream_waiting_its_turn_sends_keep_alives(make_app, auth, monkeypatch):
    monkeypatch.setattr(main, "SSE_KEEPALIVE_SECONDS", 0.01)
    headers = {"Accept": "text/event-stream", **auth("alice")}
    async with serving(make_app(offline_token_delay=0.02)) as http:
        thread_id = await live_thread(http, auth)
        async with http.stream("POST", f"/threads/{thread_id}/messages", json={"content": "first"},
                               headers=headers) as ahead:
            async for line in ahead.aiter_lines():
                if line == "event: run.started":
                    break
            async with http.stream("POST", f"/threads/{thread_id}/runs", headers=headers) as waiting:
                lines = [line async for line in waiting.aiter_lines() if line]
    first_event = next(index for index, line in enumerate(lines) if line.startswith("event:"))
    assert first_event > 0 and set(lines[:first_event]) == {": keep-alive"}
    assert lines[first_event] == "event: run.started" and lines[-2] == "event: run.completed"
