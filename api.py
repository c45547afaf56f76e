"""The shapes of the API: request bodies, WebSocket frames and list queries as pydantic models.

Strict (no coercion: `"run": "yes"` is refused) and closed (unknown fields are refused). pydantic's
JSON parser refuses invalid UTF-8, lone surrogate escapes and absurd nesting by itself; a NUL
("\u0000") is refused in every text, as PostgreSQL cannot store one. The same
models, with the resources', give the OpenAPI document its schemas (see `openapi.py`).
"""

import json
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator, SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from tools import SERVER_TOOLS

MAX_CONTENT_CHARS = 32_000
MAX_NAME_CHARS = 64
MAX_MODEL_CHARS = 128
MAX_INSTRUCTIONS_CHARS = 32_000
MAX_TITLE_CHARS = 200
MAX_SUB_CHARS = 256
MAX_MEMBERS = 10
MAX_ASSISTANTS_PER_RUN = 8
MAX_LIST_LIMIT = 1000
MAX_TOOLS = 32
MAX_TOOL_DESCRIPTION_CHARS = 1024
MAX_TOOL_OUTPUTS = 32
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # what OpenAI accepts as a function's name


NUL_REFUSED = "must not contain NUL (\\u0000)"


def not_blank(text: str) -> str:
    """Text a person can read and every database can store: not blank, and (as all text here) no NUL."""
    if not text.strip():
        raise ValueError("must not be blank")
    return no_nul(text)


def no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError(NUL_REFUSED)
    return text


def is_none(value: Any) -> bool:
    return value is None


def distinct(items: list) -> list:
    return list(dict.fromkeys(items))


def text(max_chars: int) -> StringConstraints:
    return StringConstraints(min_length=1, max_length=max_chars)


# Written out, not made by a function: a type checker takes only a written type for a type.
Content = Annotated[str, text(MAX_CONTENT_CHARS), AfterValidator(not_blank), Field(description="the message's text")]
Name = Annotated[str, text(MAX_NAME_CHARS), AfterValidator(not_blank),
                 Field(description="unique among the caller's assistants")]
Model = Annotated[str, text(MAX_MODEL_CHARS), AfterValidator(not_blank), Field(description="the upstream's model name")]
Instructions = Annotated[str, Field(max_length=MAX_INSTRUCTIONS_CHARS, description="sent with every run"),
                         AfterValidator(no_nul)]
Title = Annotated[str, text(MAX_TITLE_CHARS), AfterValidator(not_blank),
                  Field(description="a title; by default the start of the first message")]
Sub = Annotated[str, text(MAX_SUB_CHARS), AfterValidator(not_blank), Field(description="a user id (a token's sub)")]
AssistantRef = Annotated[str, text(MAX_NAME_CHARS + 64), AfterValidator(not_blank),
                         Field(description="an assistant's id or name")]
Members = Annotated[list[Sub], Field(max_length=MAX_MEMBERS, description="user ids who share the thread"),
                    AfterValidator(distinct)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def known_server_tool(name: str) -> str:
    if name not in SERVER_TOOLS:
        raise ValueError(f"unknown server tool {name!r} (GET /tools lists them)")
    return name


def object_schema(parameters: dict) -> dict:
    """A JSON Schema for a function's arguments: valid, and of an object, as a model's function call is."""
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as error:
        raise ValueError(f"not a valid JSON Schema: {error.message}") from None
    if parameters.get("type") != "object":
        raise ValueError('must be a JSON Schema with "type": "object"')
    return parameters


class ClientTool(Body):
    """A function the thread's clients run: the run waits for one of them to post its output."""

    type: Literal["function"]
    name: Annotated[str, StringConstraints(pattern=TOOL_NAME), Field(description="letters, digits, _ and -")]
    description: Annotated[str, Field(max_length=MAX_TOOL_DESCRIPTION_CHARS), AfterValidator(no_nul)] | None = Field(
        None, exclude_if=is_none)
    parameters: Annotated[dict[str, Any], AfterValidator(object_schema),
                          Field(description='a JSON Schema with "type": "object"')] | None = Field(
        None, exclude_if=is_none)

    def for_model(self) -> dict:
        """As the model is to see it (a server tool's is `ServerTool.for_model`)."""
        return {"type": "function", "name": self.name, "description": self.description or "",
                "parameters": self.parameters or {"type": "object", "properties": {}}, "strict": False}


TOOL_TAGS = ("server", "client")


def tool_kind(tool: Any) -> str:
    return "server" if isinstance(tool, str) else "client"


Tool = Annotated[
    Annotated[str, AfterValidator(known_server_tool), Field(description="a server tool's name"), Tag("server")]
    | Annotated[ClientTool, Tag("client")], Discriminator(tool_kind)]


def distinct_tool_names(tools: list) -> list:
    names = [tool if isinstance(tool, str) else tool.name for tool in tools]
    if duplicated := next((name for name in names if names.count(name) > 1), None):
        raise ValueError(f"two tools named {duplicated!r}")
    return tools


class NewAssistant(Body):
    name: Name
    model: Model | None = None
    instructions: Instructions = ""
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS, description="server tool names and client tools"),
                     AfterValidator(distinct_tool_names)] = []

    def tool_list(self) -> list:
        return [tool if isinstance(tool, str) else tool.model_dump(exclude_none=True) for tool in self.tools]


class NewThread(Body):
    members: Members = []
    title: Title | None = None


class ThreadChange(Body):
    members: Members | None = None
    title: Title | None = None


class RunRequest(Body):
    assistant: AssistantRef | None = Field(None, description="the assistant to run (default: the default one)")
    assistants: Annotated[list[AssistantRef], Field(min_length=1, max_length=MAX_ASSISTANTS_PER_RUN)] | None = Field(
        None, description="several assistants, run in turn on the thread")
    rounds: Annotated[int, Field(ge=1)] = Field(
        1, description="the assistants answer in turn this many times over, each seeing the replies before it "
                       "(at most MAX_ROUNDS)")

    @model_validator(mode="after")
    def one_way_to_name_assistants(self):
        if self.assistant is not None and self.assistants is not None:
            raise ValueError("give assistant or assistants, not both")
        return self

    def names(self, default: str) -> list[str]:
        return self.assistants or [self.assistant or default]


class NewMessage(RunRequest):
    content: Content
    run: bool = Field(True, description="false: store the message without running any assistant")


class MessageFrame(NewMessage):
    type: Literal["message"]


class RunFrame(RunRequest):
    type: Literal["run"]


class TypingFrame(Body):
    type: Literal["typing"]


class CancelFrame(Body):
    type: Literal["cancel"]
    run_id: Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(no_nul)]


class ToolOutput(Body):
    call_id: Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(no_nul)]
    output: Annotated[str, Field(max_length=MAX_CONTENT_CHARS, description="what the model reads"),
                      AfterValidator(no_nul)]


def one_output_per_call(outputs: list[ToolOutput]) -> list[ToolOutput]:
    call_ids = [output.call_id for output in outputs]
    if duplicated := next((call_id for call_id in call_ids if call_ids.count(call_id) > 1), None):
        raise ValueError(f"two outputs for call {duplicated!r}")
    return outputs


class ToolOutputs(Body):
    outputs: Annotated[list[ToolOutput], Field(min_length=1, max_length=MAX_TOOL_OUTPUTS),
                       AfterValidator(one_output_per_call)]

    def pairs(self) -> list[tuple[str, str]]:
        return [(output.call_id, output.output) for output in self.outputs]


class ToolOutputsFrame(ToolOutputs):
    type: Literal["tool_outputs"]
    run_id: Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(no_nul)]


Frame: TypeAdapter[MessageFrame | RunFrame | CancelFrame | TypingFrame | ToolOutputsFrame] = TypeAdapter(
    Annotated[MessageFrame | RunFrame | CancelFrame | TypingFrame | ToolOutputsFrame, Field(discriminator="type")])


class ListQuery(BaseModel):
    """`?limit=&after=&before=&order=` on every list; values come as text, so this one is not strict."""

    model_config = ConfigDict(extra="ignore")
    limit: Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT)] = 100
    after: Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(no_nul)] | None = None
    before: Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(no_nul)] | None = None
    order: Literal["asc", "desc"] | None = None


MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required",
    "json_invalid": "malformed JSON",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "union_tag_not_found": 'required: "message", "run", "cancel", "typing" or "tool_outputs"',
    "union_tag_invalid": 'must be "message", "run", "cancel", "typing" or "tool_outputs"',
}


def describe(error: ValidationError, tagged: bool = False) -> str:
    """The first problem, for a person: the field first (`members[2]: must not be blank`). For a `tagged`
    union (a frame), the first step of the location is the tag, not a field."""
    first = error.errors(include_url=False, include_input=False)[0]
    location = first["loc"][1:] if tagged and len(first["loc"]) > 1 else first["loc"]
    location = tuple(part for part in location if part not in TOOL_TAGS)  # a tool's kind is no field
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    message = MESSAGES.get(first["type"], first["msg"].removeprefix("Value error, "))
    if first["type"] == "json_invalid":
        return f"malformed JSON: {first['ctx']['error']}" if first.get("ctx", {}).get("error") else message
    return f"{where}: {message}" if where else message


# ---------------------------------------------------------------- what the service answers (for the document)

class Answer(BaseModel):
    """The shape of an answer: the service sends `model_dump(mode="json")`, the document describes the same."""

    model_config = ConfigDict(extra="forbid")


def omitted_if_none(description: str) -> Any:
    """An optional field the JSON leaves out, rather than sending null, where it does not apply."""
    return Field(None, description=description, exclude_if=is_none)


def is_row(data: Any) -> bool:
    """Whether `data` is a row of the store's tables (each has its serial key `n`) rather than the fields."""
    return isinstance(data, dict) and "n" in data


class Error(Answer):
    detail: str = Field(description="what went wrong, for a person; a 400 names the field first")


class Health(Answer):
    status: Literal["ok"]


class NotReady(Answer):
    status: Literal["unavailable"]
    down: list[Literal["database", "redis"]] = Field(description="what did not answer")


class Resource(Answer):
    """A resource: at once the store's record (`model_validate(row)` reads a row of its table), the JSON answer
    and the document's schema. A row is the service's own writing, checked when it was written: reading it back
    names its columns as fields and never applies a request's rules again."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AssistantRefOut(Resource):
    id: str
    name: str


class Assistant(Resource):
    id: str
    name: str
    model: str
    instructions: str
    owner: str | None = Field(description="the user who created it; null for a shared assistant")
    created_at: int
    tools: list[str | ClientTool] = Field(description="server tool names and client tools")

    @model_validator(mode="before")
    @classmethod
    def from_row(cls, data: Any) -> Any:
        """A row of `assistants`: a shared one's owner is "", its tools JSON text. A client tool was checked
        when it was given (its schema against the metaschema: a millisecond each), so it is built, not checked."""
        if not is_row(data):
            return data
        tools = [tool if isinstance(tool, str) else ClientTool.model_construct(**tool)
                 for tool in json.loads(data["tools"])]
        return {"id": data["id"], "name": data["name"], "model": data["model"], "instructions": data["instructions"],
                "owner": data["owner"] or None, "created_at": data["created_at"], "tools": tools}


class Thread(Resource):
    id: str
    owner: str
    members: tuple[str, ...]
    title: str | None
    created_at: int
    updated_at: int = Field(description="the time of its last message")

    @model_validator(mode="before")
    @classmethod
    def from_row(cls, data: Any) -> Any:
        """A row of `threads`: members are JSON text; `updated_at`, stored to the microsecond (lists are in its
        order), is answered in seconds."""
        if not is_row(data):
            return data
        return {"id": data["id"], "owner": data["owner"], "members": tuple(json.loads(data["members"])),
                "title": data["title"], "created_at": data["created_at"], "updated_at": int(data["updated_at"])}


class ToolCall(Resource):
    call_id: str
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it")
    runs_on: Literal["server", "client"]


class Message(Resource):
    id: str
    thread_id: str
    role: Literal["user", "assistant", "tool"]
    content: str
    created_at: int
    author: str | None = omitted_if_none("user messages: who wrote it")
    assistant: AssistantRefOut | None = omitted_if_none("replies: which assistant")
    run_id: str | None = omitted_if_none("replies: the run that wrote it")
    cancelled: bool | None = omitted_if_none("true on a reply cut short by a cancel")
    failed: bool | None = omitted_if_none("true on a reply cut short by an upstream failure")
    tool_call: ToolCall | None = omitted_if_none("tool messages: the call; `content` is its output")
    pending: bool | None = omitted_if_none("true on a tool call still waiting for its output (content empty)")

    @model_validator(mode="before")
    @classmethod
    def from_row(cls, data: Any) -> Any:
        """A row of `messages`: its assistant and its tool call are columns of their own; its flags (SQLite's are
        0 or 1) are there only when true."""
        if not is_row(data):
            return data
        fields = {"id": data["id"], "thread_id": data["thread_id"], "role": data["role"], "content": data["content"],
                  "created_at": data["created_at"], "author": data["author"]}
        if data["assistant_id"] is not None:
            fields["assistant"] = {"id": data["assistant_id"], "name": data["assistant_name"]}
            fields["run_id"] = data["run_id"]
        fields["cancelled"] = True if data["cancelled"] else None
        fields["failed"] = True if data["failed"] else None
        if data["call_id"] is not None:
            fields["tool_call"] = {"call_id": data["call_id"], "name": data["tool_name"],
                                   "arguments": data["tool_arguments"], "runs_on": data["runs_on"]}
            fields["pending"] = None if data["answered"] else True  # no output yet: `content` stays empty
        return fields


class RunError(Answer):
    assistant: AssistantRefOut
    code: str
    message: str


class Runs(Answer):
    replies: list[Message]
    errors: list[RunError] = Field(description="runs that failed or were cancelled, instead of failing the request")


class Turn(Runs):
    message: Message


class Cancelling(Answer):
    run_id: str
    status: Literal["active", "cancelled"] = Field(description="active: being stopped by its runner now")


class AssistantList(Answer):
    data: list[Assistant]
    has_more: bool


class ThreadList(Answer):
    data: list[Thread]
    has_more: bool


class MessageList(Answer):
    data: list[Message]
    has_more: bool


class Present(Answer):
    user: str
    sockets: int = Field(description="the user's sockets and event streams on the thread")


class PresenceList(Answer):
    data: list[Present] = Field(description="everyone connected to the thread now, service-wide")
    has_more: bool


class ServerToolOut(Answer):
    name: str
    description: str
    parameters: dict[str, Any] = Field(description="a JSON Schema of the arguments")


class ToolList(Answer):
    data: list[ServerToolOut]
    has_more: bool


class ToolOutputsAccepted(Answer):
    run_id: str
    messages: list[Message] = Field(description="the tool messages, each with its output now")
