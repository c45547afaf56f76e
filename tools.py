"""Server tools: functions the service runs itself when a model calls them.

Each is a plain function registered with `@server_tool`: its name is the tool's name, its docstring the
description the model reads, and its signature (with pydantic's `Annotated[..., Field(description=...)]`
where a parameter needs explaining) the JSON Schema of its arguments, which pydantic also checks before
the call. A function that blocks runs on a worker thread; an `async def` runs on the event loop. Whatever
it returns is the output the model reads (text as it is, anything else as JSON). An error or a call that
takes too long becomes an error text the model reads instead: the run goes on.
"""

import asyncio
import datetime
import inspect
import json
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

MAX_OUTPUT_CHARS = 32_000  # as much as a client tool's output may hold


@dataclass(frozen=True)
class ServerTool:
    name: str
    description: str
    parameters: dict
    function: Callable
    arguments: TypeAdapter  # validates the arguments, then calls the function with them

    def as_json(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def for_model(self) -> dict:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": False}


SERVER_TOOLS: dict[str, ServerTool] = {}


def server_tool(function: Callable) -> Callable:
    """Register `function` as a server tool, named after it."""
    adapter = TypeAdapter[Any](function)  # type: ignore[arg-type]  # pydantic takes a function: its arguments
    SERVER_TOOLS[function.__name__] = ServerTool(function.__name__, inspect.getdoc(function) or "",
                                                 adapter.json_schema(), function, adapter)
    return function


async def call_server_tool(name: str, arguments: str, seconds: float) -> str:
    """The output of one call, as the model is to read it: never raises."""
    tool = SERVER_TOOLS.get(name)
    if tool is None:
        return f"error: there is no tool called {name!r}"
    try:
        parsed = json.loads(arguments or "{}")
        if not isinstance(parsed, dict):
            return "error: the arguments must be a JSON object"
        async with asyncio.timeout(seconds):
            if inspect.iscoroutinefunction(tool.function):
                result = await tool.arguments.validate_python(parsed)
            else:
                result = await asyncio.to_thread(tool.arguments.validate_python, parsed)
    except TimeoutError:
        return f"error: {name} took longer than {seconds:g} s"
    except json.JSONDecodeError:
        return "error: the arguments are not valid JSON"
    except ValidationError as error:
        return f"error: invalid arguments: {error.errors(include_url=False, include_input=False)}"
    except Exception as error:  # the tool's own failure is the model's to read, not the run's end
        return f"error: {type(error).__name__}: {error}"
    output = result if isinstance(result, str) else json.dumps(result, default=str)
    return output[:MAX_OUTPUT_CHARS].replace("\x00", "\ufffd")  # PostgreSQL stores no NUL


# ---------------------------------------------------------------- the tools

@server_tool
def current_time(timezone: Annotated[str, Field(description="an IANA time zone, e.g. Europe/Paris")] = "UTC") -> str:
    """The current date and time in a time zone, as ISO 8601 text."""
    return datetime.datetime.now(zoneinfo.ZoneInfo(timezone)).isoformat(timespec="seconds")


def tool_spec(tool: Any) -> dict | None:
    """A tool of an assistant as the model is to see it (a server tool by name, or a client tool as given)."""
    if isinstance(tool, str):
        server = SERVER_TOOLS.get(tool)
        return server.for_model() if server else None
    return tool.for_model()
