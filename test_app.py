"""The REST half of the service (CONTRACT.md, v2), on the real app.

Through Starlette's TestClient: the token matrix over every route; assistants (create or load, per-owner
names, a shared one hidden by a user's own, delete, the per-user cap, bad bodies, paging); threads
(members, titles, listing and paging, owner-only PATCH and DELETE, the per-user cap); a foreign thread
answering exactly as a missing one; messages and runs (storage, attribution, what the model is sent,
several assistants in turn, bad bodies, 413, paging); upstream failures mapped to 502/503/504; CORS.

Over a live uvicorn, where streaming or concurrency matters: a POST's own Server-Sent Events; twenty
concurrent posts on one thread; the per-thread and per-user run limits; a run that outlives the client
that asked for it; cancelling a run over REST. Runs are held still, where a test needs them to be, with
the offline model's "hang" fault and released with a cancel: no sleeps, no races.
"""

import asyncio
import base64
import gc
import json
import time

import jwt
import pytest
from starlette.routing import Mount
from starlette.testclient import TestClient, WebSocketDenialResponse

from api import MAX_ASSISTANTS_PER_RUN, MAX_CONTENT_CHARS, MAX_MEMBERS, MAX_NAME_CHARS
from assistants import ATTRIBUTION_NOTE
from auth import JWTSettings
from conftest import (
    TEST_SECRET,
    assert_seq_grows_by_one,
    check_run,
    config_for,
    eventually,
    frames_until,
    next_frame,
    serve_live,
    services_of,
    sse_events,
)
from main import DEFAULT_INSTRUCTIONS, MAX_BODY_BYTES, create_app
from offline_model import FAULTS_AFTER_TEXT

SETTINGS = JWTSettings(secret=TEST_SECRET)  # the secret of conftest's `auth` fixture
MISSING_THREAD = "thread_" + "0" * 24  # well formed, but no such thread
PUBLIC_ROUTES = {"GET /health", "GET /ready", "GET /metrics", "GET /", "GET /openapi.json", "GET /docs",
                 "GET /docs/*"}  # the contract's; the others need a token
SSE = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One app for the module (each test makes threads of its own, and users of its own where it counts
    per user). No SDK retries, so one injected fault fails one run."""
    config = config_for(tmp_path_factory.mktemp("app"), offline_token_delay=0.0, openai_max_retries=0)
    with TestClient(create_app(config, SETTINGS)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
async def live(tmp_path_factory):
    """One live server for the module's streaming and concurrency tests, each on threads of its own."""
    config = config_for(tmp_path_factory.mktemp("live"), openai_max_retries=0)
    async with serve_live(create_app(config, SETTINGS)) as service:
        yield service


# ---------------------------------------------------------------- helpers

def assert_error(response, status_code: int, *words: str, field: str | None = None) -> str:
    """An error answer: the status, a JSON `detail` for a person naming `words` (and starting with `field`),
    and nothing internal: no traceback, no token, no key."""
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail
    for word in words:
        assert word in detail, detail
    if field is not None:
        assert detail.startswith(f"{field}:") or detail.startswith(f"{field}["), detail
    assert "Traceback" not in response.text
    assert "eyJ" not in response.text  # every JWT starts with eyJ
    assert "sk-" not in response.text  # OpenAI keys start with sk-; the upstream may quote one
    return detail


def new_thread(client, auth, owner: str = "alice", **body) -> dict:
    response = client.post("/threads", json=body, headers=auth(owner))
    assert response.status_code == 201, response.text
    return response.json()


def post_message(client, auth, thread_id: str, sub: str = "alice", **body):
    return client.post(f"/threads/{thread_id}/messages", json=body, headers=auth(sub))


def listing(client, auth, path: str, sub: str = "alice", **query) -> dict:
    response = client.get(path, params=query, headers=auth(sub))
    assert response.status_code == 200, response.text
    page = response.json()
    assert set(page) == {"data", "has_more"}
    return page


def messages(client, auth, thread_id: str, sub: str = "alice") -> list[dict]:
    return listing(client, auth, f"/threads/{thread_id}/messages", sub)["data"]


def create_assistant(client, auth, sub: str, name: str, **body) -> dict:
    response = client.post("/assistants", json={"name": name, **body}, headers=auth(sub))
    assert response.status_code == 201, response.text
    return response.json()


def b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def live_post(service, auth, thread_id: str, sub: str = "alice", path: str = "messages", **body):
    return await service.http.post(f"/threads/{thread_id}/{path}", json=body, headers=auth(sub))


async def until(ws, predicate, seen: list | None = None, timeout: float = 20) -> dict:
    """Reads frames (keeping them in `seen`) up to the first one `predicate` accepts; returns it."""
    while True:
        frame = await next_frame(ws, timeout)
        if seen is not None:
            seen.append(frame)
        if predicate(frame):
            return frame


def of_type(kind: str, **fields):
    return lambda frame: frame["type"] == kind and all(frame.get(key) == value for key, value in fields.items())


def message_created(content: str):
    return lambda frame: frame["type"] == "message.created" and frame["message"]["content"] == content


async def hanging_run(service, ws, seen: list | None = None) -> str:
    """The next run.started on `ws`, once its upstream request (told to hang) has arrived: the run is
    active and stays so until cancelled. Returns its run id."""
    started = await until(ws, of_type("run.started"), seen)
    received = service.services.offline_model.received
    assert await eventually(lambda: any((body.get("metadata") or {}).get("run_id") == started["run_id"]
                                        for body in received), timeout=10)
    return started["run_id"]


async def cancel(service, auth, thread_id: str, run_id: str, sub: str = "alice"):
    return await service.http.post(f"/threads/{thread_id}/runs/{run_id}/cancel", headers=auth(sub))


def runs_of(events: list[dict]) -> list[list[dict]]:
    """Events from run.started on, cut into one list per run."""
    runs = []
    for event in events:
        if event["type"] == "run.started":
            runs.append([])
        runs[-1].append(event)
    return runs


# ---------------------------------------------------------------- authentication

def in_an_hour() -> int:
    return int(time.time()) + 3600


REFUSED = {  # how the request is authorized -> the detail it gets
    "missing header": (lambda: None, "missing bearer token"),
    "not bearer": (lambda: "Basic YWxpY2U6cHc=", "missing bearer token"),
    "garbage": (lambda: "Bearer garbage.garbage.garbage", "invalid token"),
    "bad signature": (lambda: "Bearer " + jwt.encode({"sub": "alice", "exp": in_an_hour()}, "x" * 64),
                      "invalid token"),
    "alg none": (lambda: f"Bearer {b64url({'alg': 'none', 'typ': 'JWT'})}."
                         f"{b64url({'sub': 'alice', 'exp': in_an_hour()})}.", "invalid token"),
    "expired": (lambda: "Bearer " + jwt.encode({"sub": "alice", "exp": in_an_hour() - 7200}, TEST_SECRET),
                "token expired"),
}
PROTECTED = {  # every route but the public ones -> the JSON body a valid request would carry
    "GET /assistants": None, "POST /assistants": {"name": "intruder"}, "GET /assistants/assistant": None,
    "DELETE /assistants/assistant": None, "GET /threads": None, "POST /threads": {"title": "intruder"},
    "GET /threads/{thread}": None, "PATCH /threads/{thread}": {"title": "taken"}, "DELETE /threads/{thread}": None,
    "GET /threads/{thread}/messages": None, "POST /threads/{thread}/messages": {"content": "hi"},
    "POST /threads/{thread}/runs": None, "POST /threads/{thread}/runs/{run}/cancel": None,
    "GET /threads/{thread}/events": None, "GET /threads/{thread}/presence": None, "WS /threads/{thread}/ws": None,
    "GET /tools": None,
    "POST /threads/{thread}/runs/{run}/tool_outputs": {"outputs": [{"call_id": "call_1", "output": "x"}]},
}


@pytest.fixture(scope="module")
def guarded(client) -> dict:
    """A thread only refused requests go to: it must stay as it was."""
    response = client.post("/threads", headers={"Authorization": f"Bearer {SETTINGS.mint('alice')}"})
    assert response.status_code == 201
    return response.json()


def assert_untouched(client, auth, thread: dict) -> None:
    assert client.get(f"/threads/{thread['id']}", headers=auth("alice")).json() == thread
    assert messages(client, auth, thread["id"]) == []


def test_the_token_matrix_covers_every_route_of_the_app(client):
    routes = set()
    for route in client.app.routes:
        path = route.path.replace("{thread_id}", "{thread}").replace("{run_id}", "{run}").replace(
            "{assistant}", "assistant")
        if isinstance(route, Mount):  # a folder of files
            routes.add(f"GET {path}/*")
            continue
        routes |= {f"{method} {path}" for method in (getattr(route, "methods", None) or {"WS"}) - {"HEAD"}}
    assert routes - PUBLIC_ROUTES == set(PROTECTED)


@pytest.mark.parametrize("route", PROTECTED)
@pytest.mark.parametrize(("make_authorization", "detail"), REFUSED.values(), ids=REFUSED.keys())
def test_every_route_but_the_public_ones_needs_a_valid_token(client, auth, guarded, route, make_authorization,
                                                             detail):
    authorization = make_authorization()
    headers = {"Authorization": authorization} if authorization else {}
    method, path = route.split()
    path = path.format(thread=guarded["id"], run="run_" + "0" * 24)
    if method == "WS":
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(path, headers=headers):
                pass
        response = denied.value
    else:
        response = client.request(method, path, json=PROTECTED[route], headers=headers)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert assert_error(response, 401) == detail
    if authorization:
        assert authorization.split()[-1] not in response.text
    assert_untouched(client, auth, guarded)


def test_start_up_leaves_what_it_made_out_of_the_collectors_sight(app):
    gc.unfreeze()  # whatever an earlier app in this process froze
    with TestClient(app):
        assert gc.get_freeze_count() > 0


def test_health_is_open(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_the_demo_page_and_the_openapi_document_need_no_token(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    document = client.get("/openapi.json")
    assert document.status_code == 200
    assert document.json()["openapi"].startswith("3.1")


def test_a_token_in_the_query_is_refused_over_http(client, auth, guarded):
    token = SETTINGS.mint("alice")
    for method, path, body in [("GET", "/threads", None),
                               ("POST", f"/threads/{guarded['id']}/messages", {"content": "hi"})]:
        response = client.request(method, f"{path}?token={token}", json=body)
        assert assert_error(response, 401) == "missing bearer token"
        assert token not in response.text
    assert_untouched(client, auth, guarded)


# ---------------------------------------------------------------- assistants

def test_an_assistant_is_created_once_then_loaded_unchanged(client, auth):
    created = client.post("/assistants", json={"name": "coach", "instructions": "Be brief."}, headers=auth("alice"))
    assert created.status_code == 201
    coach = created.json()
    assert set(coach) == {"id", "name", "model", "instructions", "owner", "created_at", "tools"}
    assert coach["name"] == "coach"
    assert coach["instructions"] == "Be brief."
    assert coach["owner"] == "alice"
    assert coach["model"] == services_of(client).config.openai_model
    assert isinstance(coach["created_at"], int)
    again = client.post("/assistants", json={"name": "coach", "instructions": "Be long.", "model": "other"},
                        headers=auth("alice"))
    assert again.status_code == 200
    assert again.json() == coach
    assert client.get(f"/assistants/{coach['id']}", headers=auth("alice")).json() == coach
    assert client.get("/assistants/coach", headers=auth("alice")).json() == coach


def test_names_are_per_owner_and_someone_elses_assistant_is_404(client, auth):
    bobs = create_assistant(client, auth, "bob", "poet", instructions="Rhyme.")
    alices = create_assistant(client, auth, "alice", "poet", instructions="Free verse.")
    assert bobs["id"] != alices["id"]
    assert client.get("/assistants/poet", headers=auth("bob")).json() == bobs
    assert client.get("/assistants/poet", headers=auth("alice")).json() == alices
    diary = create_assistant(client, auth, "alice", "diary")
    assert_error(client.get(f"/assistants/{diary['id']}", headers=auth("bob")), 404)
    assert_error(client.get("/assistants/diary", headers=auth("bob")), 404)
    assert diary not in listing(client, auth, "/assistants", "bob")["data"]
    thread = new_thread(client, auth, "bob")
    assert_error(post_message(client, auth, thread["id"], "bob", content="hi", assistant=diary["id"]), 404)
    assert messages(client, auth, thread["id"], "bob") == []


def test_a_users_own_assistant_hides_the_shared_one_of_the_same_name_for_that_user_only(client, auth):
    shared = client.get("/assistants/assistant", headers=auth("bystander")).json()
    assert shared["owner"] is None
    own = client.post("/assistants", json={"name": "assistant", "instructions": "Mine."}, headers=auth("hider"))
    assert own.status_code == 201
    own = own.json()
    assert own["owner"] == "hider"
    assert own["id"] != shared["id"]
    assert client.get("/assistants/assistant", headers=auth("hider")).json() == own
    assert client.get("/assistants/assistant", headers=auth("bystander")).json() == shared
    listed = client.get("/assistants", headers=auth("hider")).json()["data"]
    assert [assistant["id"] for assistant in listed if assistant["name"] == "assistant"] == [own["id"]]
    # The default assistant of a message is looked up by name, so it is the user's own too.
    hiders = new_thread(client, auth, "hider")
    [reply] = post_message(client, auth, hiders["id"], "hider", content="who answers?").json()["replies"]
    assert reply["assistant"] == {"id": own["id"], "name": "assistant"}
    bystanders = new_thread(client, auth, "bystander")
    [reply] = post_message(client, auth, bystanders["id"], "bystander", content="who answers?").json()["replies"]
    assert reply["assistant"] == {"id": shared["id"], "name": "assistant"}
    # Deleting one's own brings the shared one back.
    assert client.delete("/assistants/assistant", headers=auth("hider")).status_code == 204
    assert client.get("/assistants/assistant", headers=auth("hider")).json() == shared


def test_only_ones_own_assistant_can_be_deleted(client, auth):
    mine = create_assistant(client, auth, "deleter", "scratch")
    response = client.delete(f"/assistants/{mine['id']}", headers=auth("deleter"))
    assert response.status_code == 204
    assert response.content == b""
    assert_error(client.get(f"/assistants/{mine['id']}", headers=auth("deleter")), 404)
    assert_error(client.delete(f"/assistants/{mine['id']}", headers=auth("deleter")), 404)
    by_name = create_assistant(client, auth, "deleter", "scratch")
    assert client.delete("/assistants/scratch", headers=auth("deleter")).status_code == 204
    assert_error(client.get(f"/assistants/{by_name['id']}", headers=auth("deleter")), 404)

    shared = client.get("/assistants/assistant", headers=auth("deleter")).json()
    for ref in ("assistant", shared["id"]):
        assert_error(client.delete(f"/assistants/{ref}", headers=auth("deleter")), 404)
    assert client.get("/assistants/assistant", headers=auth("deleter")).json() == shared

    theirs = create_assistant(client, auth, "keeper", "precious")
    for ref in ("precious", theirs["id"]):
        assert_error(client.delete(f"/assistants/{ref}", headers=auth("deleter")), 404)
    assert client.get("/assistants/precious", headers=auth("keeper")).json() == theirs


def test_an_id_means_its_assistant_and_a_name_the_callers_own_to_get_delete_and_runs_alike(client, auth):
    shared = client.get("/assistants/assistant", headers=auth("namesake")).json()
    decoy = create_assistant(client, auth, "namesake", shared["id"], instructions="Named like the shared one's id.")
    assert client.get(f"/assistants/{shared['id']}", headers=auth("namesake")).json() == shared
    thread = new_thread(client, auth, "namesake")
    answer = post_message(client, auth, thread["id"], "namesake", content="who?", assistant=shared["id"])
    [reply] = answer.json()["replies"]
    assert reply["assistant"]["id"] == shared["id"]
    # The same reference, deleted: the shared assistant, which no user may delete; the decoy stays.
    assert_error(client.delete(f"/assistants/{shared['id']}", headers=auth("namesake")), 404)
    assert client.get(f"/assistants/{decoy['id']}", headers=auth("namesake")).json() == decoy
    assert client.delete(f"/assistants/{decoy['id']}", headers=auth("namesake")).status_code == 204
    assert client.get(f"/assistants/{shared['id']}", headers=auth("namesake")).json() == shared


@pytest.mark.parametrize("ref", ["nobody", "<img src=x onerror=alert(1)>", "asst_" + "0" * 24, "x" * 120])
def test_a_404_for_an_assistant_never_quotes_the_reference(client, auth, ref):
    thread = new_thread(client, auth, "quoter")
    for response in (client.get(f"/assistants/{ref}", headers=auth("quoter")),
                     client.delete(f"/assistants/{ref}", headers=auth("quoter")),
                     post_message(client, auth, thread["id"], "quoter", content="hi", assistant=ref),
                     client.post(f"/threads/{thread['id']}/runs", json={"assistants": ["assistant", ref]},
                                 headers=auth("quoter"))):
        assert assert_error(response, 404) == "assistant not found"
        assert ref not in response.text


def test_a_user_may_own_only_so_many_assistants(make_app, auth):
    with TestClient(make_app(max_assistants_per_user=2)) as capped:
        first = create_assistant(capped, auth, "alice", "one")
        create_assistant(capped, auth, "alice", "two")
        assert_error(capped.post("/assistants", json={"name": "three"}, headers=auth("alice")), 429, "2")
        assert_error(capped.get("/assistants/three", headers=auth("alice")), 404)
        loaded = capped.post("/assistants", json={"name": "one"}, headers=auth("alice"))
        assert loaded.status_code == 200  # loading an existing one is no new assistant
        assert loaded.json() == first
        create_assistant(capped, auth, "bob", "three")  # the cap is per user
        assert capped.delete("/assistants/one", headers=auth("alice")).status_code == 204
        create_assistant(capped, auth, "alice", "three")


@pytest.mark.parametrize(("body", "words", "field"), [
    ({}, ["required"], "name"),
    ({"name": ""}, [], "name"),
    ({"name": " \n\t"}, ["blank"], "name"),
    ({"name": "x" * (MAX_NAME_CHARS + 1)}, [str(MAX_NAME_CHARS)], "name"),
    ({"name": 7}, [], "name"),
    ({"name": ["poet"]}, [], "name"),
    ({"name": "x", "instructions": 5}, [], "instructions"),
    ({"name": "x", "instructions": None}, [], "instructions"),
    ({"name": "x", "model": ["m"]}, [], "model"),
    ({"name": "x", "colour": "red"}, ["unknown field"], "colour"),
    ("[1, 2]", ["object"], None),
    ('"poet"', ["object"], None),
    ("{not json", ["malformed JSON"], None),
    ("", ["malformed JSON"], None),
], ids=["no name", "empty name", "blank name", "name too long", "number name", "list name",
        "number instructions", "null instructions", "list model", "unknown field", "array", "string", "malformed",
        "empty body"])
def test_bad_assistant_bodies_get_400_naming_the_field(client, auth, body, words, field):
    before = listing(client, auth, "/assistants", "shaper")
    content = body if isinstance(body, str) else json.dumps(body)
    headers = auth("shaper") | {"Content-Type": "application/json"}
    response = client.post("/assistants", content=content, headers=headers)
    assert_error(response, 400, *words, field=field)
    assert listing(client, auth, "/assistants", "shaper") == before


def test_assistants_list_the_shared_ones_then_the_callers_own_in_pages(client, auth):
    shared = client.get("/assistants/assistant", headers=auth("collector")).json()
    own = [create_assistant(client, auth, "collector", name) for name in ("a1", "a2", "a3")]
    everything = listing(client, auth, "/assistants", "collector")
    assert everything == {"data": [shared, *own], "has_more": False}  # bob's and alice's are not there
    first = listing(client, auth, "/assistants", "collector", limit=2)
    assert first == {"data": [shared, own[0]], "has_more": True}
    rest = listing(client, auth, "/assistants", "collector", limit=2, after=own[0]["id"])
    assert rest == {"data": own[1:], "has_more": False}
    newest = listing(client, auth, "/assistants", "collector", limit=2, order="desc")
    assert newest == {"data": [own[2], own[1]], "has_more": True}
    before = listing(client, auth, "/assistants", "collector", before=own[2]["id"])
    assert before == {"data": [shared, own[0], own[1]], "has_more": False}


# ---------------------------------------------------------------- threads

def test_a_thread_has_an_owner_distinct_members_and_a_title_and_the_body_is_optional(client, auth):
    thread = new_thread(client, auth, members=["bob", "alice", "bob", "carol"], title="Plans")
    assert set(thread) == {"id", "owner", "members", "title", "created_at", "updated_at"}
    assert thread["owner"] == "alice"
    assert thread["members"] == ["bob", "carol"]
    assert thread["title"] == "Plans"
    assert isinstance(thread["created_at"], int)
    assert isinstance(thread["updated_at"], int)
    assert client.get(f"/threads/{thread['id']}", headers=auth("alice")).json() == thread
    assert client.get(f"/threads/{thread['id']}", headers=auth("carol")).json() == thread
    bare = client.post("/threads", headers=auth("carol"))
    assert bare.status_code == 201
    assert bare.json()["owner"] == "carol"
    assert bare.json()["members"] == []
    assert bare.json()["title"] is None
    empty = client.post("/threads", json={}, headers=auth("carol"))
    assert empty.status_code == 201


@pytest.mark.parametrize(("body", "words", "field"), [
    ({"members": "bob"}, [], "members"),
    ({"members": {"bob": True}}, [], "members"),
    ({"members": [""]}, [], "members[0]"),
    ({"members": ["bob", "  "]}, ["blank"], "members[1]"),
    ({"members": [7]}, [], "members[0]"),
    ({"members": [f"user{i}" for i in range(MAX_MEMBERS + 1)]}, [str(MAX_MEMBERS)], "members"),
    ({"title": ""}, [], "title"),
    ({"title": "t" * 201}, [], "title"),
    ({"owner": "bob"}, ["unknown field"], "owner"),
    ("[]", ["object"], None),
    ("{", ["malformed JSON"], None),
], ids=["members a string", "members an object", "empty member", "blank member", "number member",
        "too many members", "empty title", "title too long", "unknown field", "array", "malformed"])
def test_bad_thread_bodies_get_400_naming_the_field(client, auth, body, words, field):
    before = listing(client, auth, "/threads", "shaper")
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/threads", content=content, headers=auth("shaper") | {"Content-Type": "application/json"})
    assert_error(response, 400, *words, field=field)
    assert listing(client, auth, "/threads", "shaper") == before


def test_threads_list_the_callers_own_and_shared_most_recently_updated_first_in_pages(client, auth):
    t1 = new_thread(client, auth, "lister")
    t2 = new_thread(client, auth, "lister")
    t3 = new_thread(client, auth, "friend", members=["lister"])
    new_thread(client, auth, "outsider")
    new_thread(client, auth, "outsider", members=["friend"])
    assert post_message(client, auth, t1["id"], "lister", content="First  words\nof t1", run=False).status_code == 201
    t1 = client.get(f"/threads/{t1['id']}", headers=auth("lister")).json()
    assert t1["title"] == "First words of t1"  # a thread without a title takes the start of its first message
    ids = lambda page: [thread["id"] for thread in page["data"]]
    assert ids(listing(client, auth, "/threads", "lister")) == [t1["id"], t3["id"], t2["id"]]
    assert listing(client, auth, "/threads", "lister")["data"][0] == t1
    assert listing(client, auth, "/threads", "lister")["has_more"] is False
    first = listing(client, auth, "/threads", "lister", limit=1)
    assert ids(first) == [t1["id"]]
    assert first["has_more"] is True
    second = listing(client, auth, "/threads", "lister", limit=1, after=t1["id"])
    assert ids(second) == [t3["id"]]
    assert second["has_more"] is True
    last = listing(client, auth, "/threads", "lister", limit=5, after=t3["id"])
    assert ids(last) == [t2["id"]]
    assert last["has_more"] is False
    assert ids(listing(client, auth, "/threads", "lister", limit=1, before=t2["id"])) == [t3["id"]]
    assert ids(listing(client, auth, "/threads", "lister", order="asc")) == [t2["id"], t3["id"], t1["id"]]


@pytest.mark.parametrize(("query", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "ten"}, "limit"), ({"order": "up"}, "order"),
])
def test_bad_list_queries_get_400_naming_the_parameter(client, auth, query, field):
    for path in ("/threads", "/assistants", f"/threads/{new_thread(client, auth)['id']}/messages"):
        assert_error(client.get(path, params=query, headers=auth("alice")), 400, field=field)
    assert client.get("/threads", params={"limit": 1000}, headers=auth("alice")).status_code == 200


def test_only_the_owner_changes_a_thread_and_removed_members_lose_it_at_once(client, auth):
    thread = new_thread(client, auth, members=["bob"])
    assert_error(client.patch(f"/threads/{thread['id']}", json={"members": []}, headers=auth("bob")), 403)
    stranger = client.patch(f"/threads/{thread['id']}", json={"members": ["carol"]}, headers=auth("carol"))
    missing = client.patch(f"/threads/{MISSING_THREAD}", json={"members": ["carol"]}, headers=auth("carol"))
    assert_error(stranger, 404)
    assert stranger.json() == missing.json()
    assert client.get(f"/threads/{thread['id']}", headers=auth("alice")).json() == thread
    assert_error(client.patch(f"/threads/{thread['id']}", json={"owner": "bob"}, headers=auth("alice")), 400,
                 field="owner")

    changed = client.patch(f"/threads/{thread['id']}", json={"members": ["carol", "alice", "carol"],
                                                              "title": "Renamed"}, headers=auth("alice"))
    assert changed.status_code == 200
    assert changed.json() == thread | {"members": ["carol"], "title": "Renamed"}
    assert client.get(f"/threads/{thread['id']}", headers=auth("carol")).json() == changed.json()
    assert post_message(client, auth, thread["id"], "carol", content="I'm in", run=False).status_code == 201
    for route in (f"/threads/{thread['id']}", f"/threads/{thread['id']}/messages"):
        assert_error(client.get(route, headers=auth("bob")), 404)
    assert_error(post_message(client, auth, thread["id"], "bob", content="still here?"), 404)
    assert thread["id"] not in [t["id"] for t in listing(client, auth, "/threads", "bob", limit=1000)["data"]]
    title_only = client.patch(f"/threads/{thread['id']}", json={"title": "Again"}, headers=auth("alice"))
    assert title_only.json()["members"] == ["carol"]  # what a PATCH leaves out stays as it was


def test_only_the_owner_deletes_a_thread_and_then_it_is_gone_for_everyone(client, auth):
    thread = new_thread(client, auth, members=["bob"])
    assert post_message(client, auth, thread["id"], content="soon gone").status_code == 201
    assert_error(client.delete(f"/threads/{thread['id']}", headers=auth("bob")), 403)
    stranger = client.delete(f"/threads/{thread['id']}", headers=auth("carol"))
    assert_error(stranger, 404)
    assert stranger.json() == client.delete(f"/threads/{MISSING_THREAD}", headers=auth("carol")).json()
    assert len(messages(client, auth, thread["id"], "bob")) == 2
    deleted = client.delete(f"/threads/{thread['id']}", headers=auth("alice"))
    assert deleted.status_code == 204
    assert deleted.content == b""
    for sub in ("alice", "bob"):
        assert_error(client.get(f"/threads/{thread['id']}", headers=auth(sub)), 404)
        assert_error(client.get(f"/threads/{thread['id']}/messages", headers=auth(sub)), 404)
        assert_error(post_message(client, auth, thread["id"], sub, content="hello?"), 404)
    assert_error(client.delete(f"/threads/{thread['id']}", headers=auth("alice")), 404)


def test_a_user_may_own_only_so_many_threads(make_app, auth):
    with TestClient(make_app(max_threads_per_user=2)) as capped:
        first = new_thread(capped, auth)
        new_thread(capped, auth)
        assert_error(capped.post("/threads", headers=auth("alice")), 429, "2")
        assert len(listing(capped, auth, "/threads")["data"]) == 2
        new_thread(capped, auth, "bob", members=["alice"])  # the cap is per owner
        assert capped.delete(f"/threads/{first['id']}", headers=auth("alice")).status_code == 204
        new_thread(capped, auth)


# ---------------------------------------------------------------- a foreign thread is a missing one

THREAD_ROUTES = [  # (method, path after /threads/{id}, JSON body): every thread route, some with bad bodies
    ("GET", "", None), ("PATCH", "", {"title": "mine now"}), ("PATCH", "", {"colour": "red"}), ("DELETE", "", None),
    ("GET", "/messages", None), ("POST", "/messages", {"content": "hi"}), ("POST", "/messages", {"content": ""}),
    ("POST", "/runs", None), ("POST", "/runs", {"assistant": "nobody"}), ("POST", f"/runs/run_{'0' * 24}/cancel", None),
    ("GET", "/events", None),
]


# An id with a NUL in it is refused as bad input (400) before any lookup: test_hostile.py.
@pytest.mark.parametrize("missing", [MISSING_THREAD, "%2E%2E", "a" * 300, "x.y", "%20", "%C3%A9t%C3%A9",
                                     "null", "thread_%27%20OR%20%271%27%3D%271"],
                         ids=["well formed", "dot dot", "300 chars", "dotted", "space", "non-ascii", "null", "sql"])
def test_a_foreign_thread_looks_exactly_like_a_missing_one(client, auth, missing):
    thread = new_thread(client, auth, members=["bob"])
    model = services_of(client).offline_model
    runs_before = model.responses_started
    for method, suffix, body in THREAD_ROUTES:
        foreign = client.request(method, f"/threads/{thread['id']}{suffix}", json=body, headers=auth("carol"))
        absent = client.request(method, f"/threads/{missing}{suffix}", json=body, headers=auth("carol"))
        assert_error(foreign, 404)
        assert foreign.status_code == absent.status_code, (method, suffix)
        assert foreign.json() == absent.json(), (method, suffix)
        assert foreign.headers.get("content-type") == absent.headers.get("content-type")
    denials = []
    for thread_id in (thread["id"], missing):
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(f"/threads/{thread_id}/ws", headers=auth("carol")):
                pass
        denials.append((denied.value.status_code, denied.value.json()))
    assert denials[0] == denials[1]
    assert denials[0][0] == 404
    assert client.get(f"/threads/{thread['id']}", headers=auth("alice")).json() == thread
    assert messages(client, auth, thread["id"], "bob") == []
    assert model.responses_started == runs_before


# ---------------------------------------------------------------- messages and runs

def test_a_message_is_stored_and_answered_with_its_authors(client, auth):
    thread = new_thread(client, auth, members=["bob"])
    response = post_message(client, auth, thread["id"], content="hello there")
    assert response.status_code == 201
    turn = response.json()
    assert set(turn) == {"message", "replies", "errors"}
    assert turn["errors"] == []
    message = turn["message"]
    assert set(message) == {"id", "thread_id", "role", "content", "created_at", "author"}
    assert message["thread_id"] == thread["id"]
    assert message["role"] == "user"
    assert message["content"] == "hello there"
    assert message["author"] == "alice"
    assert isinstance(message["created_at"], int)
    [reply] = turn["replies"]
    assert set(reply) == {"id", "thread_id", "role", "content", "created_at", "assistant", "run_id"}
    assert reply["role"] == "assistant"
    assert reply["thread_id"] == thread["id"]
    shared = client.get("/assistants/assistant", headers=auth("alice")).json()
    assert reply["assistant"] == {"id": shared["id"], "name": "assistant"}
    assert reply["run_id"].startswith("run_")
    assert "heard: [alice] hello there (1 message in its context)" in reply["content"]
    # Another member sees the same, with who wrote what.
    assert messages(client, auth, thread["id"], "bob") == [message, reply]


def test_the_model_is_sent_the_history_with_authors_and_the_attribution_note(client, auth):
    thread = new_thread(client, auth, members=["bob"])
    model = services_of(client).offline_model
    assert post_message(client, auth, thread["id"], "bob", content="from bob", run=False).status_code == 201
    [reply] = post_message(client, auth, thread["id"], content="from alice").json()["replies"]
    sent = model.received[-1]
    assert sent["input"] == [{"type": "message", "role": "user", "content": "[bob] from bob"},
                             {"type": "message", "role": "user", "content": "[alice] from alice"}]
    assert sent["instructions"] == f"{DEFAULT_INSTRUCTIONS}\n\n{ATTRIBUTION_NOTE}"
    assert sent["store"] is False
    assert sent["stream"] is True
    assert sent["model"] == services_of(client).config.openai_model
    assert sent["metadata"] == {"run_id": reply["run_id"], "assistant_id": reply["assistant"]["id"],
                                "assistant_name": reply["assistant"]["name"]}


def test_run_false_stores_without_a_reply_and_a_run_answers_later(client, auth):
    thread = new_thread(client, auth)
    model = services_of(client).offline_model
    runs_before = model.responses_started
    quiet = post_message(client, auth, thread["id"], content="note this", run=False)
    assert quiet.status_code == 201
    assert quiet.json()["replies"] == []
    assert quiet.json()["errors"] == []
    assert messages(client, auth, thread["id"]) == [quiet.json()["message"]]
    assert model.responses_started == runs_before
    run = client.post(f"/threads/{thread['id']}/runs", headers=auth("alice"))
    assert run.status_code == 200
    assert set(run.json()) == {"replies", "errors"}
    assert run.json()["errors"] == []
    [reply] = run.json()["replies"]
    assert "heard: [alice] note this" in reply["content"]
    assert messages(client, auth, thread["id"]) == [quiet.json()["message"], reply]
    longest = post_message(client, auth, thread["id"], content="x" * MAX_CONTENT_CHARS, run=False)
    assert longest.status_code == 201


def test_several_assistants_answer_in_order_and_each_sees_the_replies_before_it(client, auth):
    first = create_assistant(client, auth, "duo", "first", instructions="First.")
    second = create_assistant(client, auth, "duo", "second", instructions="Second.")
    thread = new_thread(client, auth, "duo")
    model = services_of(client).offline_model
    turn = post_message(client, auth, thread["id"], "duo", content="both of you",
                        assistants=["first", second["id"]]).json()
    assert turn["errors"] == []
    one, two = turn["replies"]
    assert one["assistant"] == {"id": first["id"], "name": "first"}
    assert two["assistant"] == {"id": second["id"], "name": "second"}
    to_first, to_second = list(model.received)[-2:]
    assert to_first["instructions"].startswith("First.\n\n")
    assert to_first["input"] == [{"type": "message", "role": "user", "content": "[duo] both of you"}]
    assert to_second["instructions"].startswith("Second.\n\n")
    assert to_second["input"] == [{"type": "message", "role": "user", "content": "[duo] both of you"},
                                  {"type": "message", "role": "user", "content": f"[assistant first] {one['content']}"}]
    assert messages(client, auth, thread["id"], "duo") == [turn["message"], one, two]
    # An assistant reads its own earlier reply as its own, the other's as the other's.
    again = client.post(f"/threads/{thread['id']}/runs", json={"assistant": "first"}, headers=auth("duo"))
    assert [reply["assistant"]["name"] for reply in again.json()["replies"]] == ["first"]
    assert model.received[-1]["input"][1:] == [
        {"type": "message", "role": "assistant", "content": one["content"]},
        {"type": "message", "role": "user", "content": f"[assistant second] {two['content']}"}]


@pytest.fixture(scope="module")
def untouched(client) -> str:
    """A thread only refused messages go to: it must stay empty."""
    return client.post("/threads", headers={"Authorization": f"Bearer {SETTINGS.mint('alice')}"}).json()["id"]


@pytest.mark.parametrize(("body", "status_code", "words", "field"), [
    ({"content": "hi", "assistant": "nobody"}, 404, ["assistant not found"], None),
    ({"content": "hi", "assistants": ["assistant", "nobody"]}, 404, ["assistant not found"], None),
    ({}, 400, ["required"], "content"),
    ({"content": ""}, 400, [], "content"),
    ({"content": " \n\t"}, 400, ["blank"], "content"),
    ({"content": 5}, 400, [], "content"),
    ({"content": "x" * (MAX_CONTENT_CHARS + 1)}, 400, [str(MAX_CONTENT_CHARS)], "content"),
    ({"content": "hi", "assistant": "assistant", "assistants": ["assistant"]}, 400, ["assistant", "not both"], None),
    ({"content": "hi", "assistants": []}, 400, [], "assistants"),
    ({"content": "hi", "assistants": ["assistant"] * (MAX_ASSISTANTS_PER_RUN + 1)}, 400,
     [str(MAX_ASSISTANTS_PER_RUN)], "assistants"),
    ({"content": "hi", "assistants": "assistant"}, 400, [], "assistants"),
    pytest.param({"content": "hi", "run": "yes"}, 400, [], "run"),
    pytest.param({"content": "hi", "run": 0}, 400, [], "run"),
    ({"content": "hi", "colour": "red"}, 400, ["unknown field"], "colour"),
    ({"content": "hi", "type": "message"}, 400, ["unknown field"], "type"),
], ids=["unknown assistant", "one unknown of two", "no content", "empty content", "blank content", "number content",
        "content too long", "assistant and assistants", "empty assistants", "too many assistants",
        "assistants a string", "run a string", "run a number", "unknown field", "a frame's type field"])
def test_bad_messages_are_refused_and_nothing_is_stored(client, auth, untouched, body, status_code, words, field):
    model = services_of(client).offline_model
    runs_before = model.responses_started
    assert_error(post_message(client, auth, untouched, **body), status_code, *words, field=field)
    assert messages(client, auth, untouched) == []
    assert model.responses_started == runs_before


@pytest.mark.parametrize("body", ["{", "[]", "null", ""], ids=["malformed", "array", "null", "empty"])
def test_a_message_body_that_is_no_json_object_gets_400(client, auth, untouched, body):
    response = client.post(f"/threads/{untouched}/messages", content=body,
                           headers=auth("alice") | {"Content-Type": "application/json"})
    assert_error(response, 400)
    assert messages(client, auth, untouched) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_256_kib_gets_413_and_nothing_is_stored(client, auth, untouched, chunked):
    def sent(body: dict):
        encoded = json.dumps(body).encode()
        assert len(encoded) > MAX_BODY_BYTES
        return iter([encoded[i:i + 65536] for i in range(0, len(encoded), 65536)]) if chunked else encoded

    headers = auth("alice") | {"Content-Type": "application/json"}
    big = {"content": "x" * MAX_BODY_BYTES}
    assert_error(client.post(f"/threads/{untouched}/messages", content=sent(big), headers=headers), 413)
    assert messages(client, auth, untouched) == []
    huge_assistant = {"name": "big", "instructions": "x" * MAX_BODY_BYTES}
    assert_error(client.post("/assistants", content=sent(huge_assistant), headers=headers), 413)
    assert_error(client.get("/assistants/big", headers=auth("alice")), 404)
    assert_error(client.post("/threads", content=sent({"title": "x" * MAX_BODY_BYTES}), headers=headers), 413)


def test_messages_list_oldest_first_in_pages(client, auth):
    thread = new_thread(client, auth)
    stored = [post_message(client, auth, thread["id"], content=f"m{i}", run=False).json()["message"]
              for i in range(5)]
    path = f"/threads/{thread['id']}/messages"
    assert listing(client, auth, path) == {"data": stored, "has_more": False}
    assert listing(client, auth, path, limit=2) == {"data": stored[:2], "has_more": True}
    assert listing(client, auth, path, limit=2, after=stored[1]["id"]) == {"data": stored[2:4], "has_more": True}
    assert listing(client, auth, path, limit=2, after=stored[3]["id"]) == {"data": stored[4:], "has_more": False}
    assert listing(client, auth, path, before=stored[2]["id"]) == {"data": stored[:2], "has_more": False}
    assert listing(client, auth, path, order="desc") == {"data": stored[::-1], "has_more": False}
    assert listing(client, auth, path, order="desc", after=stored[3]["id"], limit=2) == {
        "data": [stored[2], stored[1]], "has_more": True}


def test_a_page_of_long_messages_ends_at_a_mebibyte_of_content_with_has_more(make_app, auth, database_url):
    """The attack: 2,368 messages of 32 KB, read back with limit=1000, was a 31 MB answer."""
    long = "x" * MAX_CONTENT_CHARS
    with TestClient(make_app(database_url=database_url)) as fresh:
        thread = new_thread(fresh, auth)
        stored = [post_message(fresh, auth, thread["id"], content=f"{n:02d}{long[2:]}", run=False).json()["message"]
                  for n in range(40)]
        path = f"/threads/{thread['id']}/messages"
        # The page stops after the message that reaches 1 MiB: 33 of 32,000 characters.
        response = fresh.get(path, params={"limit": 1000}, headers=auth("alice"))
        assert len(response.content) < 1.1 * 1024 * 1024
        assert response.json() == {"data": stored[:33], "has_more": True}
        assert listing(fresh, auth, path, limit=1000, after=stored[32]["id"]) == {"data": stored[33:],
                                                                                   "has_more": False}
        assert listing(fresh, auth, path, limit=1000, order="desc") == {"data": stored[:6:-1], "has_more": True}
        assert listing(fresh, auth, path, limit=1000, before=stored[39]["id"]) == {"data": stored[6:39],
                                                                                    "has_more": True}
        assert listing(fresh, auth, path, limit=7) == {"data": stored[:7], "has_more": True}  # the count still holds


def test_a_page_always_holds_one_item_however_low_its_bound(make_app, auth, database_url):
    with TestClient(make_app(database_url=database_url, max_page_chars=10)) as fresh:
        thread = new_thread(fresh, auth, title="a title over the bound")
        stored = [post_message(fresh, auth, thread["id"], content=f"message number {n}", run=False).json()["message"]
                  for n in range(3)]
        path, after, pages = f"/threads/{thread['id']}/messages", None, []
        while True:
            page = listing(fresh, auth, path, **({"after": after} if after else {}))
            pages.append(page["data"])
            if not page["has_more"]:
                break
            after = page["data"][-1]["id"]
        assert pages == [[message] for message in stored]
        own = create_assistant(fresh, auth, "alice", "wordy", instructions="Say a great deal.")
        first = listing(fresh, auth, "/assistants")
        assert first["has_more"] and len(first["data"]) == 1
        assert listing(fresh, auth, "/assistants", after=first["data"][0]["id"]) == {"data": [own], "has_more": False}
        second = new_thread(fresh, auth, title="another title")
        assert listing(fresh, auth, "/threads") == {"data": [second], "has_more": True}


# ---------------------------------------------------------------- upstream failures

@pytest.mark.parametrize(("fault", "code"), [
    ("rate_limited", "rate_limited"), ("unauthorized", "upstream_auth"), ("server_error", None),
    ("response_failed", None), ("disconnect", None),
])
def test_a_message_whose_run_fails_is_still_stored_with_the_error(client, auth, fault, code):
    thread = new_thread(client, auth)
    services_of(client).offline_model.fail_next(fault)
    response = post_message(client, auth, thread["id"], content="keep me")
    assert response.status_code == 201
    assert "sk-" not in response.text
    assert "Traceback" not in response.text
    turn = response.json()
    assert turn["message"]["content"] == "keep me"
    # A run that failed after text streamed keeps that text, marked (contract v3); one that failed first has none.
    partial = turn["replies"]
    if fault in FAULTS_AFTER_TEXT:
        [reply] = partial
        assert reply["failed"] is True and reply["content"] and reply["assistant"]["name"] == "assistant"
    else:
        assert partial == []
    [error] = turn["errors"]
    assert set(error) == {"assistant", "code", "message"}
    assert error["assistant"]["name"] == "assistant"
    assert isinstance(error["code"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert messages(client, auth, thread["id"]) == [turn["message"], *partial]
    rerun = client.post(f"/threads/{thread['id']}/runs", headers=auth("alice"))
    assert rerun.status_code == 200
    assert rerun.json()["errors"] == []
    assert "heard: [alice] keep me" in rerun.json()["replies"][0]["content"]


@pytest.mark.parametrize(("fault", "status_code"), [
    ("server_error", 502), ("unauthorized", 502), ("response_failed", 502), ("incomplete", 502),
    ("error_event", 502), ("flat_error_event", 502), ("disconnect", 502), ("malformed", 502),
    ("rate_limited", 503),
])
def test_runs_that_all_fail_answer_with_the_upstream_status_and_the_next_run_works(client, auth, fault, status_code):
    thread = new_thread(client, auth)
    services_of(client).offline_model.fail_next(fault)
    response = client.post(f"/threads/{thread['id']}/runs", headers=auth("alice"))
    assert_error(response, status_code)
    if fault == "rate_limited":
        assert int(response.headers["retry-after"]) >= 1
    kept = messages(client, auth, thread["id"])  # what streamed before the failure, marked
    assert [message.get("failed") for message in kept] == ([True] if fault in FAULTS_AFTER_TEXT else [])
    again = client.post(f"/threads/{thread['id']}/runs", headers=auth("alice"))
    assert again.status_code == 200
    assert again.json()["errors"] == []
    assert len(again.json()["replies"]) == 1


def test_runs_of_which_one_fails_answer_200_with_the_reply_and_the_error(client, auth):
    thread = new_thread(client, auth)
    services_of(client).offline_model.fail_next("server_error")
    response = client.post(f"/threads/{thread['id']}/runs", json={"assistants": ["assistant", "assistant"]},
                           headers=auth("alice"))
    assert response.status_code == 200
    [error] = response.json()["errors"]
    assert error["assistant"]["name"] == "assistant"
    [reply] = response.json()["replies"]
    assert messages(client, auth, thread["id"]) == [reply]


def test_an_upstream_that_never_answers_is_a_504_and_the_next_run_works(make_app, auth):
    with TestClient(make_app(openai_timeout_seconds=0.5, openai_max_retries=0)) as slow:
        thread = new_thread(slow, auth)
        model = services_of(slow).offline_model
        model.fail_next("hang")
        assert_error(slow.post(f"/threads/{thread['id']}/runs", headers=auth("alice")), 504)
        model.fail_next("hang")
        turn = post_message(slow, auth, thread["id"], content="anyone?")
        assert turn.status_code == 201
        assert [error["code"] for error in turn.json()["errors"]] == ["timeout"]
        assert messages(slow, auth, thread["id"]) == [turn.json()["message"]]
        again = slow.post(f"/threads/{thread['id']}/runs", headers=auth("alice"))
        assert again.status_code == 200
        assert again.json()["errors"] == []


# ---------------------------------------------------------------- CORS

def test_cors_lets_the_allowed_origin_in_without_a_token_for_preflight_only(make_app, auth):
    allowed = "http://example.test"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with TestClient(make_app(cors_origins=(allowed,))) as browser:
        response = browser.options("/threads", headers={"Origin": allowed, **preflight})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == allowed
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        assert "content-type" in response.headers["access-control-allow-headers"].lower()

        other = browser.options("/threads", headers={"Origin": "http://elsewhere.test", **preflight})
        assert "access-control-allow-origin" not in other.headers

        normal = browser.get("/threads", headers={"Origin": allowed, **auth("alice")})
        assert normal.status_code == 200
        assert normal.headers["access-control-allow-origin"] == allowed
        assert "retry-after" in normal.headers["access-control-expose-headers"].lower()
        refused = browser.get("/threads", headers={"Origin": allowed})  # a browser may read why it was refused
        assert_error(refused, 401)
        assert refused.headers["access-control-allow-origin"] == allowed
        foreign = browser.get("/threads", headers={"Origin": "http://elsewhere.test", **auth("alice")})
        assert "access-control-allow-origin" not in foreign.headers


# ---------------------------------------------------------------- over a live server

@pytest.mark.anyio
async def test_a_post_streams_its_own_events_in_contract_order_and_no_one_elses(live, auth, join):
    await live.http.post("/assistants", json={"name": "second"}, headers=auth("alice"))
    thread_id = await live.new_thread(auth, members=["bob"])
    seen: list[dict] = []
    ws, _ = await join(live, thread_id, "alice")
    # Bob's run hangs, so that Alice's stream is open while Bob posts again.
    live.services.offline_model.fail_next("hang")
    blocker = asyncio.create_task(live_post(live, auth, thread_id, "bob", content="hold on"))
    blocker_run = await hanging_run(live, ws, seen)

    async def stream() -> tuple:
        body = {"content": "stream it", "assistants": ["assistant", "second"]}
        async with live.http.stream("POST", f"/threads/{thread_id}/messages", json=body,
                                    headers=SSE | auth("alice")) as response:
            return response.status_code, response.headers["content-type"], await sse_events(response)

    streaming = asyncio.create_task(stream())
    await until(ws, message_created("stream it"), seen)
    later = asyncio.create_task(live_post(live, auth, thread_id, "bob", content="me too"))
    bobs = await until(ws, message_created("me too"), seen)

    async def watch():  # the socket, meanwhile, sees every event: Alice's two runs, then Bob's
        for _ in range(3):
            await until(ws, of_type("run.completed"), seen)

    watching = asyncio.create_task(watch())
    assert (await cancel(live, auth, thread_id, blocker_run)).status_code == 202
    status_code, content_type, events = await streaming
    assert (await blocker).status_code == 201
    [bobs_reply] = (await later).json()["replies"]
    await watching

    assert status_code in (200, 201)  # the contract gives no status for a streamed answer
    assert content_type.startswith("text/event-stream")
    created, *run_events = events
    assert created["type"] == "message.created"
    assert created["message"]["content"] == "stream it"
    assert created["message"]["author"] == "alice"
    runs = runs_of(run_events)
    assert [run[0]["assistant"]["name"] for run in runs] == ["assistant", "second"]
    replies = [check_run(run) for run in runs]
    for run in runs:
        usage = run[-1]["usage"]
        assert set(usage) == {"input_tokens", "output_tokens"}
        assert usage["output_tokens"] > 0
    assert all(event["thread_id"] == thread_id for event in events)
    seqs = [event["seq"] for event in events]
    assert seqs == sorted(set(seqs))
    # Bob's message came while the stream was open, and is not in it; nor are Bob's runs.
    assert created["seq"] < bobs["seq"] < run_events[0]["seq"]
    assert {event["run_id"] for event in run_events} == {run[0]["run_id"] for run in runs}
    assert blocker_run not in {event["run_id"] for event in run_events}
    assert seen[-1]["run_id"] == bobs_reply["run_id"]
    # What the stream carried is what the socket saw of Alice's request (deltas may merge on a socket).
    others = {bobs_reply["run_id"], blocker_run}
    assert [event for event in events if event["type"] != "text.delta"] == [
        frame for frame in seen if frame["seq"] >= created["seq"] and frame["type"] != "text.delta"
        and frame.get("run_id") not in others and frame != bobs]
    stored = await live.messages(auth, thread_id)
    own_replies = [m for m in stored if m.get("run_id") in {run[0]["run_id"] for run in runs}]
    assert [m["content"] for m in own_replies] == replies
    assert [m["content"] for m in stored if m["role"] == "user"] == ["hold on", "stream it", "me too"]


@pytest.mark.anyio
async def test_twenty_concurrent_posts_are_all_stored_and_run_one_at_a_time_in_arrival_order(live, auth, join):
    # Five people post four messages each: one user alone may have only 16 runs waiting (MAX_RUNS_PER_USER).
    people = ["alice", "bob", "carol", "dave", "erin"]
    thread_id = await live.new_thread(auth, members=people[1:])
    ws, _ = await join(live, thread_id, "alice")
    watching = asyncio.create_task(frames_until(ws, "run.completed", count=20))
    contents = [f"m{i:02d}" for i in range(20)]
    responses = await asyncio.gather(*(live_post(live, auth, thread_id, people[i % 5], content=c)
                                       for i, c in enumerate(contents)))
    assert [response.status_code for response in responses] == [201] * 20
    frames = await watching
    assert_seq_grows_by_one(frames)

    # Never overlapping: each run.started is followed by its own deltas and its run.completed.
    run_frames = [frame for frame in frames if frame["type"].startswith(("run.", "text."))]
    for run in runs_of(run_frames):
        check_run(run)
    started = [frame["run_id"] for frame in frames if frame["type"] == "run.started"]
    completed = [frame["run_id"] for frame in frames if frame["type"] == "run.completed"]
    assert started == completed
    assert len(set(started)) == 20

    # In arrival order: the order their messages were stored in.
    run_of_message = {}
    for response in responses:
        turn = response.json()
        assert turn["errors"] == []
        [reply] = turn["replies"]
        run_of_message[turn["message"]["id"]] = reply["run_id"]
    arrivals = [frame["message"]["id"] for frame in frames if frame["type"] == "message.created"]
    assert [run_of_message[message_id] for message_id in arrivals] == started

    stored = await live.messages(auth, thread_id)
    assert sorted((m["content"], m["author"]) for m in stored if m["role"] == "user") == [
        (c, people[i % 5]) for i, c in enumerate(contents)]
    assert [m["id"] for m in stored if m["role"] == "user"] == arrivals
    assert [m["run_id"] for m in stored if m["role"] == "assistant"] == started


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_a_run_goes_on_and_is_stored_when_the_client_that_posted_leaves(live, auth, join, transport):
    thread_id = await live.new_thread(auth, members=["bob"])
    ws, _ = await join(live, thread_id, "bob")
    live.services.offline_model.fail_next("hang")
    blocker = asyncio.create_task(live_post(live, auth, thread_id, "bob", content="hold on"))
    blocker_run = await hanging_run(live, ws)
    streaming = asyncio.Event()

    async def post_and_wait():
        if transport == "json":
            return await live_post(live, auth, thread_id, content="bye")
        async with live.http.stream("POST", f"/threads/{thread_id}/messages", json={"content": "bye"},
                                    headers=SSE | auth("alice")) as response:
            async for _ in response.aiter_lines():
                streaming.set()  # the stream is under way (its message.created)

    leaver = asyncio.create_task(post_and_wait())
    await until(ws, message_created("bye"))
    if transport == "sse":
        await asyncio.wait_for(streaming.wait(), 10)
    assert not leaver.done()  # no answer yet: the run waits behind bob's
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    assert (await cancel(live, auth, thread_id, blocker_run, "bob")).status_code == 202
    ended = await until(ws, lambda frame: frame["type"] in ("run.completed", "run.failed", "run.cancelled"))
    assert ended["run_id"] == blocker_run
    completed = await until(ws, lambda frame: frame["type"] in ("run.completed", "run.failed", "run.cancelled"))
    assert completed["type"] == "run.completed"
    assert "heard: [alice] bye" in completed["message"]["content"]
    assert (await blocker).status_code == 201
    stored = await live.messages(auth, thread_id, "bob")
    assert [m["content"] for m in stored] == ["hold on", "bye", completed["message"]["content"]]
    assert stored[-1]["run_id"] == completed["run_id"]


@pytest.mark.anyio
async def test_a_run_is_cancelled_over_rest_by_anyone_on_the_thread(live, auth, join):
    thread_id = await live.new_thread(auth, members=["bob"])
    ws, _ = await join(live, thread_id, "alice")
    live.services.offline_model.fail_next("hang")
    posted = asyncio.create_task(live_post(live, auth, thread_id, content="never mind"))
    run_id = await hanging_run(live, ws)

    stranger = await cancel(live, auth, thread_id, run_id, "carol")
    assert_error(stranger, 404)
    assert stranger.json() == (await cancel(live, auth, MISSING_THREAD, run_id, "carol")).json()
    bobs_own = await live.new_thread(auth, "bob")
    assert_error(await cancel(live, auth, bobs_own, run_id, "bob"), 404)  # a run of another thread
    assert_error(await cancel(live, auth, thread_id, "run_" + "0" * 24, "bob"), 404)

    accepted = await cancel(live, auth, thread_id, run_id, "bob")
    assert accepted.status_code == 202
    assert accepted.json() == {"run_id": run_id, "status": "active"}
    cancelled = await until(ws, lambda frame: frame["type"] in ("run.cancelled", "run.completed", "run.failed"))
    assert cancelled == {"seq": cancelled["seq"], "type": "run.cancelled", "thread_id": thread_id,
                         "run_id": run_id, "by": "bob", "message": None}
    turn = (await posted).json()
    assert turn["replies"] == []
    assert [(error["code"], error["assistant"]["name"]) for error in turn["errors"]] == [("cancelled", "assistant")]
    assert_error(await cancel(live, auth, thread_id, run_id, "alice"), 409)

    # The thread goes on at once; a run that completed cannot be cancelled either.
    after = await live_post(live, auth, thread_id, content="still there?")
    assert after.status_code == 201
    [reply] = after.json()["replies"]
    assert (await until(ws, of_type("run.completed")))["run_id"] == reply["run_id"]
    assert_error(await cancel(live, auth, thread_id, reply["run_id"], "alice"), 409)


@pytest.mark.anyio
async def test_a_full_thread_queue_answers_429_stores_nothing_and_loses_none_it_accepted(make_app, auth, join):
    async with serve_live(make_app(max_waiting_runs=2, openai_max_retries=0)) as service:
        thread_id = await service.new_thread(auth)
        ws, _ = await join(service, thread_id, "alice")
        service.services.offline_model.fail_next("hang")
        first = asyncio.create_task(live_post(service, auth, thread_id, content="first"))
        run_id = await hanging_run(service, ws)
        queued = []
        for content in ("q1", "q2"):
            queued.append(asyncio.create_task(live_post(service, auth, thread_id, content=content)))
            await until(ws, message_created(content))
        for refused in (await live_post(service, auth, thread_id, content="q3"),
                        await live_post(service, auth, thread_id, path="runs")):
            assert_error(refused, 429)
            assert int(refused.headers["retry-after"]) >= 1
        assert [m["content"] for m in await service.messages(auth, thread_id)] == ["first", "q1", "q2"]
        assert (await cancel(service, auth, thread_id, run_id)).status_code == 202
        ends = []
        for _ in range(3):
            ends.append(await until(ws, lambda frame: frame["type"] in ("run.completed", "run.failed",
                                                                        "run.cancelled")))
        assert [end["type"] for end in ends] == ["run.cancelled", "run.completed", "run.completed"]
        answers = [await task for task in (first, *queued)]
        assert [answer.status_code for answer in answers] == [201] * 3
        assert [error["code"] for error in answers[0].json()["errors"]] == ["cancelled"]
        for answer in answers[1:]:
            assert answer.json()["errors"] == []
            assert len(answer.json()["replies"]) == 1
        stored = await service.messages(auth, thread_id)
        assert [(m["role"], m.get("author")) for m in stored] == [
            ("user", "alice"), ("user", "alice"), ("user", "alice"), ("assistant", None), ("assistant", None)]


@pytest.mark.anyio
async def test_a_users_runs_across_threads_are_bounded_while_another_user_is_served(make_app, auth, join):
    async with serve_live(make_app(max_runs_per_user=2, openai_max_retries=0)) as service:
        threads = [await service.new_thread(auth, "greedy") for _ in range(3)]
        sockets = [(await join(service, thread_id, "greedy"))[0] for thread_id in threads[:2]]
        service.services.offline_model.fail_next("hang", times=2)
        held = [asyncio.create_task(live_post(service, auth, thread_id, "greedy", content="hold"))
                for thread_id in threads[:2]]
        run_ids = [await hanging_run(service, ws) for ws in sockets]
        refused = await live_post(service, auth, threads[2], "greedy", content="one more")
        assert_error(refused, 429, "2")
        assert int(refused.headers["retry-after"]) >= 1
        assert_error(await live_post(service, auth, threads[0], "greedy", path="runs"), 429)
        assert await service.messages(auth, threads[2], "greedy") == []
        assert (await live_post(service, auth, threads[2], "greedy", content="no run", run=False)).status_code == 201

        patients = await service.new_thread(auth, "patient")
        served = await live_post(service, auth, patients, "patient", content="my turn")
        assert served.status_code == 201
        assert served.json()["errors"] == []
        assert len(served.json()["replies"]) == 1

        for thread_id, run_id in zip(threads, run_ids):
            assert (await cancel(service, auth, thread_id, run_id, "greedy")).status_code == 202
        assert [(await task).status_code for task in held] == [201, 201]
        freed = await live_post(service, auth, threads[2], "greedy", content="now?")
        assert freed.status_code == 201
        assert len(freed.json()["replies"]) == 1
