"""The OpenAPI 3.1 document of the API, derived from the route table (main.py) and the models (api.py).

Each HTTP route in the table is an `ApiRoute`, which says next to its path what it takes and answers; an
undocumented HTTP route fails loudly when the document is made. WebSocket routes have no place in OpenAPI:
the document's description points to the README for them. Every parameter and body carries an example, and
main.py adds the server asked, so that a client generated from the document works as it is; `/docs` shows it
in Swagger UI.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import Mount, Route, WebSocketRoute

from api import Error, ListQuery, NewAssistant, NewMessage, NewThread, RunRequest, ThreadChange, ToolOutputs

ERRORS = {
    400: "malformed JSON or an invalid field (the detail names it)",
    401: "missing, expired or invalid token",
    403: "an owner-only action by a member",
    404: "unknown, or not the caller's to see",
    409: "the run has already ended, or the tool call has already been answered",
    413: "body over 256 KiB",
    429: "a limit reached (Retry-After says when to try again where waiting helps)",
    502: "the upstream refused or failed",
    503: "the upstream is rate limiting, or the service is shutting down (Retry-After)",
    504: "the upstream timed out",
}
# A text/event-stream schema describes one event (OpenAPI 3.1 has no way to describe the stream as a whole).
SERVER_SENT_EVENT = {"type": "object", "required": ["event", "data"], "description":
                     "one Server-Sent Event: `id: <seq>` (none on `presence` and `typing`), `event: <type>`, "
                     "`data: <the JSON a WebSocket gets>`",
                     "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}, "event": {"type": "string"},
                                    "data": {"type": "string", "contentMediaType": "application/json"}}}
EVENT_STREAM = {"text/event-stream": {"schema": SERVER_SENT_EVENT}}
CONTENT_SCHEMAS = {"text/html": {"type": "string"}, "text/plain": {"type": "string"},
                   "application/json": {"type": "object"}, "text/event-stream": SERVER_SENT_EVENT}
# An example for every parameter and body, so that a client generated from the document (Postman's import, with
# parameters generated from examples) sends requests that work: those that need no earlier answer's id succeed.
# The assistant created by the POST example is the one the {assistant} example reads, then deletes.
BODY_EXAMPLES: dict[type[BaseModel], dict] = {
    NewAssistant: {"name": "helper", "instructions": "Answer in one short paragraph.", "tools": ["current_time"]},
    NewThread: {"members": ["bob"], "title": "Trip planning"},
    ThreadChange: {"members": ["bob", "carol"], "title": "Trip planning, with carol"},
    NewMessage: {"content": "Where should we go in May?", "assistant": "assistant"},
    RunRequest: {"assistant": "assistant"},
    ToolOutputs: {"outputs": [{"call_id": "call_3f9a1c7e5b2d4a60", "output": "Lisbon: 24 °C, sunny"}]},
}
PATH_EXAMPLES = {"assistant": "helper", "thread_id": "thread_5f1c0a9e2b7d4c83a6e19f20",
                 "run_id": "run_0c7e4b1a9d2f4e6a8b3c5d71"}
LIST_EXAMPLES = {"/assistants": "asst_2d9a7c41e08b4f5a9c6e3b12", "/threads": "thread_5f1c0a9e2b7d4c83a6e19f20",
                 "/threads/{thread_id}/messages": "msg_8e3b2f6c1a0d4b7e9f5a2c48"}  # after= and before=: an id
QUERY_EXAMPLES = {"limit": 20, "order": "asc"}
SEQ_EXAMPLE = "42"


@dataclass(frozen=True)
class Operation:
    summary: str
    answers: dict[int, type[BaseModel] | None]  # status -> shape (None: no body)
    body: type[BaseModel] | None = None
    body_optional: bool = False
    listing: bool = False
    streams: bool = False  # may answer with Server-Sent Events instead (Accept: text/event-stream)
    errors: tuple[int, ...] = ()
    public: bool = False
    content_type: str | None = None  # for answers that are not JSON
    headers: dict = field(default_factory=dict)


RUNS = (400, 404, 413, 429, 502, 503, 504)


class ApiRoute(Route):
    """A route of the API with what it takes and answers, for the document: `ApiRoute(method, path, endpoint,
    summary, answers, body=..., errors=...)`."""

    def __init__(self, method: str, path: str, endpoint: Callable[..., Any], summary: str,
                 answers: dict[int, type[BaseModel] | None], **details: Any):
        super().__init__(path, endpoint, methods=[method])
        self.method = method
        self.operation = Operation(summary, answers, **details)


def public_routes(routes: list) -> frozenset[tuple[str, str]]:
    """(method, path) of the routes that need no token; a mounted folder's files as `path/*`."""
    public = {(route.method, route.path) for route in routes if isinstance(route, ApiRoute) and route.operation.public}
    return frozenset(public | {("GET", f"{route.path}/*") for route in routes if isinstance(route, Mount)})


DESCRIPTION = """\
OpenAI assistants behind a JWT-secured REST API and WebSocket; every reply streams, token by token, to
every client on its thread. The WebSocket `/threads/{thread_id}/ws` (not describable in OpenAPI) joins a
thread: see the README for its frames, close codes and how to resume with `?after=<seq>`."""


def operations(routes: list) -> dict[tuple[str, str], Operation]:
    """(method, path) -> what it takes and answers, for every HTTP route of the table."""
    if undocumented := [route.path for route in routes if isinstance(route, Route) and not isinstance(route, ApiRoute)]:
        raise RuntimeError(f"HTTP routes must be ApiRoutes, to be documented: {undocumented}")
    return {(route.method, route.path): route.operation for route in routes if isinstance(route, ApiRoute)}


def document(routes: list, version: str) -> dict:
    """The document for `routes` (the app's route table)."""
    table = operations(routes)
    models = {model for operation in table.values()
              for model in [operation.body, *operation.answers.values()] if model is not None} | {Error}
    # Bodies are read as the request parses them; answers as the service writes them.
    bodies = {operation.body for operation in table.values()}
    keyed: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (model, "validation" if model in bodies else "serialization")
        for model in sorted(models, key=lambda model: model.__name__)]
    refs, definitions = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    paths: dict = {}
    for (method, path), operation in table.items():
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, operation, refs)
    websockets = [route.path for route in routes if isinstance(route, WebSocketRoute)]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Gainz OpenAI Backend", "version": version, "description": DESCRIPTION,
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "x-websockets": websockets,
    }


def _schema(refs: dict, model: type[BaseModel]) -> dict:
    return refs.get((model, "validation")) or refs[(model, "serialization")]


def _operation(method: str, path: str, operation: Operation, refs: dict) -> dict:
    described: dict = {"summary": operation.summary, "operationId": _operation_id(method, path)}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                   "example": PATH_EXAMPLES[name]} for name in _path_names(path)]
    if operation.listing:
        examples = QUERY_EXAMPLES | {"after": LIST_EXAMPLES[path], "before": LIST_EXAMPLES[path]}
        parameters += [{"name": name, "in": "query", "required": False, "schema": _without_null(schema),
                        "example": examples[name]}
                       for name, schema in ListQuery.model_json_schema()["properties"].items()]
    if path.endswith("/events"):
        parameters += [{"name": "after", "in": "query", "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"}, "example": SEQ_EXAMPLE},
                       {"name": "Last-Event-ID", "in": "header", "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"}, "example": SEQ_EXAMPLE}]
    if operation.streams:
        described["description"] = ("With `Accept: text/event-stream`, the answer is the request's own events as "
                                    "they happen, ending after its last run.")
    if parameters:
        described["parameters"] = parameters
    if operation.body is not None:
        described["requestBody"] = {"required": not operation.body_optional, "content": {
            "application/json": {"schema": _schema(refs, operation.body), "example": BODY_EXAMPLES[operation.body]}}}
    answers = {}
    for status_code, model in operation.answers.items():
        answer: dict = {"description": "OK" if status_code < 300 else ""}
        if model is not None:
            answer["content"] = {"application/json": {"schema": _schema(refs, model)}}
            if operation.streams:
                answer["content"] |= EVENT_STREAM
        elif operation.content_type:
            answer["content"] = {operation.content_type: {"schema": CONTENT_SCHEMAS[operation.content_type]}}
        answers[str(status_code)] = answer
    error = {"content": {"application/json": {"schema": _schema(refs, Error)}}}
    for status_code in sorted(set(operation.errors) | ({401} if not operation.public else set())):
        answers[str(status_code)] = {"description": ERRORS[status_code]} | error
    described["responses"] = answers
    described["security"] = [] if operation.public else [{"bearer": []}]
    return described


# Swagger UI, from the files the service serves at /docs/ (swagger-ui-bundle-v2). validatorUrl null: it would
# otherwise send the document to Swagger's public validator.
INTERACTIVE_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Gainz OpenAI Backend: API</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", validatorUrl: null, persistAuthorization: true});
  </script>
</body>
</html>
"""


def _without_null(schema: dict) -> dict:
    """A query string cannot carry a null: the parameter's schema without its null branch."""
    if "anyOf" not in schema:
        return schema
    rest = [branch for branch in schema["anyOf"] if branch != {"type": "null"}]
    return {key: value for key, value in schema.items() if key not in ("anyOf", "default")} | (
        rest[0] if len(rest) == 1 else {"anyOf": rest})


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _operation_id(method: str, path: str) -> str:
    words = [part.strip("{}") for part in path.split("/") if part]
    return "_".join([method.lower(), *words]) if words else f"{method.lower()}_root"
