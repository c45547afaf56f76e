"""The OpenAPI document (GET /openapi.json, public): it is valid OpenAPI 3.1, documents exactly the app's HTTP
routes (the WebSocket under `x-websockets`), declares bearer security and a 401 on every operation that
needs a token and none on the public ones, and uses every schema it defines. Then schemathesis fuzzes a live
uvicorn with a real token and checks that no answer is a 5xx and that every answer's status code, content
type and body are the documented ones.

Schemathesis 4.32 runs here through its Python API with hypothesis, one pytest test per documented operation:
`schemathesis.openapi.from_url` loads the document the live server serves, `operation.as_strategy()` (valid
and invalid requests) feeds `@given`, and each case is sent with `case.call` (requests) and judged with
`case.validate_response(checks=...)`. Not its pytest integration: `schemathesis.pytest.from_fixture` sets
`request.node._nodeid`, which pytest 9.2's nodes no longer have (AttributeError). Schemathesis is
synchronous, so the server (conftest.serve_live) runs in an event loop of its own thread
(`served_in_a_thread`, which could move to conftest). Path parameters are drawn mostly from real ids (schema
hooks), so that fuzzing reaches past the 404, and a test checks that it did.
"""

import asyncio
import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field

import httpx2
import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route, WebSocketRoute

import openapi
from api import ListQuery
from conftest import TEST_JWT, TEST_SECRET, authorization, bearer, config_for, serve_live
from main import PUBLIC_ROUTES, ROUTES, create_app

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 25
EVENT_STREAM_EXAMPLES = 6  # each one with a real thread stays open until its token expires, a second or two


@contextlib.contextmanager
def served_in_a_thread(app):
    """conftest.serve_live in an event loop of its own thread, for synchronous clients (schemathesis)."""
    ready, box = threading.Event(), {}

    async def serve():
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        async with serve_live(app) as service:
            box["service"] = service
            ready.set()
            await box["stop"].wait()

    def run():
        try:
            asyncio.run(serve())
        finally:
            ready.set()  # a server that failed to start must not leave the test waiting

    thread = threading.Thread(target=run, name="live-server", daemon=True)
    thread.start()
    ready.wait(60)
    assert "service" in box, "the live server did not start"
    try:
        yield box["service"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)


def bearer_expiring(sub: str, seconds: float | None) -> dict:
    """A token for `sub` that expires that soon (an event stream ends at its token's expiry); None: a usual one."""
    if seconds is None:
        return bearer(sub)
    token = jwt.encode({"sub": sub, "exp": int(time.time() + seconds) + 1}, TEST_SECRET, algorithm="HS256")
    return authorization(token)


@pytest.fixture(scope="module")
def service_app(tmp_path_factory):
    config = config_for(tmp_path_factory.mktemp("openapi"), offline_token_delay=0,
                                  openai_timeout_seconds=5, openai_max_retries=0)
    return create_app(config, TEST_JWT)


@pytest.fixture(scope="module")
def server(service_app):
    """One live server for the module; the tests work on threads of their own or only read."""
    with served_in_a_thread(service_app) as service:
        yield service


@pytest.fixture(scope="module")
def document(server) -> dict:
    response = httpx2.get(server.url + "/openapi.json")  # no token: the document is public
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


# ---------------------------------------------------------------- the document itself

def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method.upper(), path, operation


def references(node) -> set[str]:
    """The names of the component schemas `node` refers to, directly."""
    if isinstance(node, list):
        return set().union(*map(references, node))
    if not isinstance(node, dict):
        return set()
    found = set().union(*map(references, node.values()))
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        found.add(ref.removeprefix("#/components/schemas/"))
    return found


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1.")
    validate(document)


def test_the_document_describes_exactly_the_apps_http_routes(service_app, document):
    routes = {(method, route.path) for route in service_app.routes if isinstance(route, Route)
              for method in route.methods - {"HEAD"}}
    assert {(method, path) for method, path, _ in operations(document)} == routes


def test_the_websocket_route_is_named_outside_the_paths(service_app, document):
    sockets = [route.path for route in service_app.routes if isinstance(route, WebSocketRoute)]
    assert sockets
    assert document["x-websockets"] == sockets
    assert not set(sockets) & set(document["paths"])


def test_every_operation_that_needs_a_token_declares_bearer_security_and_a_401(document):
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    for method, path, operation in operations(document):
        if (method, path) in PUBLIC_ROUTES:
            continue
        assert operation["security"] == [{"bearer": []}], (method, path)
        assert "401" in operation["responses"], (method, path)
        assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}, (method, path)


def test_every_operation_that_declares_bearer_security_answers_401_without_a_token(server, document):
    for method, path, operation in operations(document):
        if operation["security"]:
            response = httpx2.request(method, server.url + re.sub(r"\{\w+\}", "x", path))
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer", (method, path)


def test_the_public_operations_declare_no_security_and_answer_without_a_token(server, document):
    public = [(method, path) for method, path, _ in operations(document) if (method, path) in PUBLIC_ROUTES]
    assert sorted(public) == sorted(route for route in PUBLIC_ROUTES if not route[1].endswith("/*"))  # not /docs/*
    for method, path, operation in operations(document):
        if (method, path) in PUBLIC_ROUTES:
            assert operation.get("security") == [], (method, path)
            assert "401" not in operation["responses"], (method, path)
            assert httpx2.request(method, server.url + path).status_code == 200, (method, path)


def test_every_schema_in_components_is_referenced(document):
    schemas = document["components"]["schemas"]
    outside = {key: value for key, value in document.items() if key != "components"}
    reached, todo = set(), references(outside)
    while todo:
        name = todo.pop()
        assert name in schemas, f"$ref to a missing schema: {name}"
        reached.add(name)
        todo |= references(schemas[name]) - reached
    assert set(schemas) - reached == set()


def test_no_operation_declares_a_header_parameter_that_openapi_ignores(document):
    for method, path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "header":
                assert parameter["name"].lower() not in ("accept", "content-type", "authorization"), (method, path)


def test_no_query_parameter_may_be_null(document):
    for method, path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "query":
                types = [option.get("type") for option in parameter["schema"].get("anyOf", [parameter["schema"]])]
                assert "null" not in types, (method, path, parameter["name"])


def test_every_parameter_and_body_carries_an_example_that_the_service_accepts(document):
    bodies = {(method, path): operation.body for (method, path), operation in openapi.operations(ROUTES).items()}
    for method, path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            assert "example" in parameter, (method, path, parameter["name"])
        if "requestBody" in operation:
            example = operation["requestBody"]["content"]["application/json"]["example"]
            bodies[(method, path)].model_validate_json(json.dumps(example))  # as the service parses a body
    query = {parameter["name"]: str(parameter["example"]) for parameter in document["paths"]["/threads"]["get"]
             ["parameters"]}
    ListQuery.model_validate(query)


def test_the_document_names_the_server_it_was_asked_on(server, document):
    assert document["servers"] == [{"url": server.url}]
    behind_a_proxy = httpx2.get(server.url + "/openapi.json", headers={"Host": "api.example.com"}).json()
    assert behind_a_proxy["servers"] == [{"url": "http://api.example.com"}]


def test_every_operation_has_a_unique_operation_id(document):
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- fuzzing a live server

@dataclass
class RealIds:
    """What alice may reach, so that generated requests get past the 404: her thread (shared with bob), bob's
    thread she is a member of (PATCH and DELETE: 403), threads and assistants of her own for the DELETEs to
    use up, ended runs (cancel: 409), and assistants by id and by name."""

    threads: list[str] = field(default_factory=list)
    threads_to_delete: list[str] = field(default_factory=list)
    ended_runs: list[dict] = field(default_factory=list)
    assistants: list[str] = field(default_factory=list)
    assistants_to_delete: list[str] = field(default_factory=list)

    def path_parameters(self, method: str, path: str) -> list[dict]:
        if path.endswith("/cancel"):
            return self.ended_runs
        if "{thread_id}" in path:
            threads = self.threads_to_delete + self.threads[1:] if method == "DELETE" else self.threads
            return [{"thread_id": thread} for thread in threads]
        if "{assistant}" in path:
            names = self.assistants_to_delete + ["assistant"] if method == "DELETE" else self.assistants
            return [{"assistant": name} for name in names]
        return []


@pytest.fixture(scope="module")
def ids(server) -> RealIds:
    ids = RealIds()
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        def post(path, sub="alice", **body):
            response = http.post(path, json=body, headers=bearer(sub))
            assert response.status_code in (200, 201), response.text
            return response.json()

        own = post("/assistants", name="fuzz-helper", instructions="Answer briefly.")
        ids.assistants = ["assistant", own["id"], own["name"]]
        ids.assistants_to_delete = [post("/assistants", name=f"fuzz-delete-{n}")["name"] for n in range(3)]
        ids.threads = [post("/threads", members=["bob"], title="alice's")["id"],
                       post("/threads", sub="bob", members=["alice"], title="bob's")["id"]]
        ids.threads_to_delete = [post("/threads")["id"] for _ in range(3)]
        for thread in ids.threads:
            turn = post(f"/threads/{thread}/messages", content="hello", assistants=["assistant", "fuzz-helper"])
            assert len(turn["replies"]) == 2, turn
            ids.ended_runs += [{"thread_id": thread, "run_id": reply["run_id"]} for reply in turn["replies"]]
    return ids


STREAMING = {("POST", "/threads/{thread_id}/messages"), ("POST", "/threads/{thread_id}/runs")}


@pytest.fixture(scope="module")
def api_schema(server, ids):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")

    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        operation = context.operation
        real = ids.path_parameters(operation.method.upper(), operation.path)
        # Real ids first: hypothesis leans towards the first choices, and shrinks towards them.
        return st.sampled_from([(path_parameters or {}) | chosen for chosen in real] + [path_parameters])

    @schema.hook
    def flatmap_headers(context, headers):
        # The streamed variant (Accept: text/event-stream) too, not only when hypothesis happens to spell it.
        if (context.operation.method.upper(), context.operation.path) not in STREAMING:
            return st.just(headers)
        return st.sampled_from([(headers or {}) | {"Accept": accept}
                                for accept in ("text/event-stream", "application/json")] + [headers])

    return schema


def strategy(operation):
    """Valid requests and, where the operation takes anything, invalid ones."""
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    if not (operation.path_parameters or operation.query or operation.headers or operation.body):
        return positive
    return st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE))


OPERATIONS = sorted(openapi.operations(ROUTES))


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{method} {path}" for method, path in OPERATIONS])
def test_fuzzed_requests_get_no_server_error_and_only_documented_answers(api_schema, method, path):
    streams_events = path.endswith("/events")  # until its token expires: give it one of a second or two
    statuses = set()

    @settings(max_examples=EVENT_STREAM_EXAMPLES if streams_events else EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy(api_schema[path][method]))
    def fuzz(case):
        headers = bearer_expiring("alice", 1 if streams_events else None)
        response = case.call(headers=headers, timeout=30)
        statuses.add(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)

    fuzz()
    if "{" in path:
        assert statuses - {404}, "every request got 404: the real ids did not reach the requests"


def test_every_documented_operation_is_fuzzed(document):
    assert {(method, path) for method, path, _ in operations(document)} == set(OPERATIONS)


def test_the_document_matches_the_schema_it_gives_itself(api_schema):
    case = api_schema["/openapi.json"]["GET"].Case()
    case.call_and_validate(checks=CHECKS, timeout=30)


STREAMED = [("POST", "/threads/{thread_id}/messages", {"content": "stream it"}),
            ("POST", "/threads/{thread_id}/runs", {}),
            ("GET", "/threads/{thread_id}/events", None)]


def streamed_case(api_schema, ids, method: str, path: str, body):
    """A request for an event stream on alice's thread, and the headers to send it with."""
    events = path.endswith("/events")
    request = {"path_parameters": {"thread_id": ids.threads[0]}}
    if not events:
        request |= {"body": body, "headers": {"Accept": "text/event-stream"}}
    case = api_schema[path][method].Case(**request)
    return case, bearer_expiring("alice", 2 if events else None)  # the stream ends when the token expires


@pytest.mark.parametrize(("method", "path", "body"), STREAMED, ids=["POST messages", "POST runs", "GET events"])
def test_streamed_answers_match_their_documented_schema(api_schema, ids, method, path, body):
    case, headers = streamed_case(api_schema, ids, method, path, body)
    response = case.call(headers=headers, timeout=30)
    assert response.headers["content-type"][0].startswith("text/event-stream"), response.text
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance], headers=headers)


def test_a_streamed_post_of_a_message_answers_the_documented_201(api_schema, ids):
    case, headers = streamed_case(api_schema, ids, *STREAMED[0])
    response = case.call(headers=headers, timeout=30)
    assert response.headers["content-type"][0].startswith("text/event-stream"), response.text
    case.validate_response(response, checks=[status_code_conformance], headers=headers)


def test_the_other_streamed_answers_have_documented_status_codes(api_schema, ids):
    for method, path, body in STREAMED[1:]:
        case, headers = streamed_case(api_schema, ids, method, path, body)
        response = case.call(headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance, content_type_conformance],
                               headers=headers)
