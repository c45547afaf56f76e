"""Real peers: the service in front of the LiteLLM proxy, a Responses server nobody here wrote, bridging
`/v1/responses` to a small streaming chat-completions model this module starts (all on loopback, no
network); and the recorded streams of the other servers the README names (tests_fixtures/responses_streams,
each file's header says what that server leaves out or adds), each replayed byte for byte.

The proxy lives in a virtualenv of its own, `.ci/litellm`, installed by `.ci/run`."""

import asyncio
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from conftest import REPO, check_run, free_port, next_frame, require, run_ends, serve_live, sse_events, stop_process
from offline_model import serve_on_loopback

pytestmark = pytest.mark.anyio
LITELLM = REPO / ".ci" / "litellm" / "bin" / "litellm"
MASTER_KEY = f"sk-peers-{secrets.token_hex(8)}"
MODEL = "echo-model"
PROXY_START_SECONDS = 120  # it imports a great deal: seconds on an idle machine, far more on a loaded one
STREAMS = REPO / "tests_fixtures" / "responses_streams"


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"  # module-wide, so that the proxy and its model start once for the module


# ---------------------------------------------------------------- a chat-completions model behind the proxy

class EchoChatModel:
    """Streams back "echo: " and the last user message, a word a chunk; reports usage in a last chunk when
    `stream_options.include_usage` asks. With tools offered, a last user message saying `call <name>` of one
    of them is answered with a call of it instead (no arguments), and a last message that is a tool's output
    with "echo: " and that output. `received` keeps every request body."""

    def __init__(self):
        self.received: list[dict] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.complete, methods=["POST"])])

    @staticmethod
    def reply_to(body: dict) -> str:
        if body["messages"][-1]["role"] == "tool":
            return "echo: " + text_of(body["messages"][-1])
        return "echo: " + text_of([m for m in body["messages"] if m["role"] == "user"][-1])

    @staticmethod
    def call_asked(body: dict) -> str | None:
        last = body["messages"][-1]
        names = [tool["function"]["name"] for tool in body.get("tools") or ()]
        return next((name for name in names if last["role"] == "user" and f"call {name}" in text_of(last)), None)

    @staticmethod
    def usage_of(body: dict) -> dict:
        prompt = sum(len(text_of(message).split()) for message in body["messages"])
        completion = len(EchoChatModel.reply_to(body).split(" "))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def complete(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.received.append(body)
        words = self.reply_to(body).split(" ")

        def chunk(choices: list[dict], **more) -> str:
            data = {"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": body["model"], "choices": choices}
            return f"data: {json.dumps(data | more)}\n\n"

        def choice(delta: dict, finish_reason: str | None = None) -> list[dict]:
            return [{"index": 0, "delta": delta, "finish_reason": finish_reason}]

        async def stream():
            if name := self.call_asked(body):  # as OpenAI streams a tool call: the call, then its arguments
                call = {"index": 0, "id": "call_echo1", "type": "function", "function": {"name": name, "arguments": ""}}
                yield chunk(choice({"role": "assistant", "content": None, "tool_calls": [call]}))
                yield chunk(choice({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
                yield chunk(choice({}, "tool_calls"))
                yield "data: [DONE]\n\n"
                return
            yield chunk(choice({"role": "assistant", "content": ""}))
            for index, word in enumerate(words):
                yield chunk(choice({"content": word if index == 0 else f" {word}"}))
            yield chunk(choice({}, "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                yield chunk([], usage=self.usage_of(body))  # as the spec has it: a last chunk with no choices
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")


def text_of(message: dict) -> str:
    content = message.get("content") or ""  # an assistant's message of tool calls may have none
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


class Proxy:
    def __init__(self, url: str, model: EchoChatModel):
        self.url, self.model = url, model


@pytest.fixture(scope="module")
async def proxy(tmp_path_factory):
    """The LiteLLM proxy on a free port, its one model a deepseek/ entry whose api_base is the echo model: it
    has no Responses API of its own, so the proxy bridges /v1/responses to streamed chat completions."""
    require(LITELLM.exists(), "the LiteLLM proxy (.ci/litellm, installed by .ci/run)")
    workdir = tmp_path_factory.mktemp("litellm")
    model = EchoChatModel()
    async with serve_on_loopback(model.app) as model_url:
        config = {"model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"deepseek/{MODEL}", "api_base": f"{model_url}/v1", "api_key": "unused"}}]}
        port = free_port()
        process, log_path = start_proxy(workdir, port, config)
        try:
            url = f"http://127.0.0.1:{port}"
            await proxy_ready(url, process, log_path)
            yield Proxy(url, model)
        finally:
            stop_process(process)


def start_proxy(workdir: Path, port: int, config: dict) -> tuple[subprocess.Popen, Path]:
    (workdir / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "LITELLM_"))}
    # The master key is required; the local price list spares it a fetch from the internet at start.
    env |= {"LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    log_path = workdir / "proxy.log"
    with open(log_path, "wb") as log:  # the proxy writes to its own copy of the descriptor
        process = subprocess.Popen([str(LITELLM), "--config", str(workdir / "config.yaml"), "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, log_path


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


async def proxy_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + PROXY_START_SECONDS
    async with httpx2.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"the proxy exited with {process.returncode}:\n{log_tail(log_path)}")
            try:
                if (await http.get(f"{url}/health/liveliness")).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"the proxy did not start in {PROXY_START_SECONDS} s:\n{log_tail(log_path)}")


async def until_the_run_ends(ws) -> list[dict]:
    """Frames up to the first run.completed, run.failed or run.cancelled."""
    frames = [await next_frame(ws)]
    while not run_ends(frames):
        frames.append(await next_frame(ws))
    return frames


@pytest.fixture
async def service(proxy, make_app):
    app = make_app(openai_base_url=f"{proxy.url}/v1", openai_api_key=MASTER_KEY, openai_model=MODEL)
    async with serve_live(app) as live:
        yield live


# ---------------------------------------------------------------- threads through the proxy

async def test_a_reply_through_the_proxy_streams_to_the_socket_completes_and_is_stored(service, proxy, auth, join):
    thread_id = await service.new_thread(auth)
    ws, _ = await join(service, thread_id, "alice")
    await ws.send(json.dumps({"type": "message", "content": "hello over there"}))
    created, *frames = await until_the_run_ends(ws)

    assert created["type"] == "message.created"
    assert frames[-1]["type"] == "run.completed", frames[-1]
    reply = check_run(frames)
    assert reply == "echo: [alice] hello over there"
    stored = await service.messages(auth, thread_id)
    assert [(message["role"], message["content"]) for message in stored] == [
        ("user", "hello over there"), ("assistant", reply)]
    assert stored[1]["run_id"] == frames[-1]["run_id"]
    sent = proxy.model.received[-1]
    assert sent["stream"] is True
    assert sent["messages"][-1] == {"role": "user", "content": "[alice] hello over there"}


async def test_two_assistants_in_turn_each_see_the_other_s_reply(service, proxy, auth):
    poet = await service.http.post("/assistants", json={"name": "poet", "instructions": "Rhyme."},
                                   headers=auth("alice"))
    assert poet.status_code == 201, poet.text
    thread_id = await service.new_thread(auth)
    before = len(proxy.model.received)
    posted = await service.http.post(f"/threads/{thread_id}/messages",
                                     json={"content": "who goes first", "assistants": ["assistant", "poet"]},
                                     headers=auth("alice"))

    assert posted.status_code == 201, posted.text
    assert posted.json()["errors"] == []
    first, second = (reply["content"] for reply in posted.json()["replies"])
    assert first == "echo: [alice] who goes first"
    assert second == f"echo: [assistant assistant] {first}"
    to_first, to_second = proxy.model.received[before:]
    assert [text_of(m) for m in to_first["messages"] if m["role"] != "system"] == ["[alice] who goes first"]
    # The poet got the thread so far: the user's message, then the first assistant's reply, named.
    assert [(m["role"], text_of(m)) for m in to_second["messages"] if m["role"] != "system"] == [
        ("user", "[alice] who goes first"), ("user", f"[assistant assistant] {first}")]
    assert "Rhyme." in text_of(to_second["messages"][0])
    stored = await service.messages(auth, thread_id)
    assert [message["content"] for message in stored[1:]] == [first, second]


async def test_a_message_posted_for_server_sent_events_streams_the_run_through_the_proxy(service, auth):
    thread_id = await service.new_thread(auth)
    async with service.http.stream("POST", f"/threads/{thread_id}/messages", json={"content": "as events please"},
                                   headers=auth("alice") | {"Accept": "text/event-stream"}) as response:
        assert response.status_code in (200, 201)
        assert response.headers["content-type"].startswith("text/event-stream")
        created, *events = await sse_events(response)

    assert created["type"] == "message.created"
    assert [event["type"] for event in run_ends(events)] == ["run.completed"]
    assert check_run(events) == "echo: [alice] as events please"
    assert (await service.messages(auth, thread_id))[-1]["content"] == "echo: [alice] as events please"


async def test_the_usage_the_proxy_reports_is_on_run_completed_and_stored_with_the_run(service, proxy, auth, join):
    thread_id = await service.new_thread(auth)
    ws, _ = await join(service, thread_id, "alice")
    await ws.send(json.dumps({"type": "message", "content": "count my tokens"}))
    completed = (await until_the_run_ends(ws))[-1]
    assert completed["type"] == "run.completed", completed

    sent = proxy.model.received[-1]
    assert sent["stream_options"] == {"include_usage": True}
    usage = EchoChatModel.usage_of(sent)
    assert completed["usage"] == {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}
    (run,) = await service.services.store.runs([completed["run_id"]])
    assert run.usage == completed["usage"]


async def test_a_client_tool_call_goes_through_the_proxy_and_its_output_comes_back(service, proxy, auth, join):
    created = await service.http.post("/assistants", headers=auth("alice"), json={"name": "clerk", "tools": [
        {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]})
    assert created.status_code == 201, created.text
    thread_id = await service.new_thread(auth)
    ws, _ = await join(service, thread_id, "alice")
    await ws.send(json.dumps({"type": "message", "content": "please call lookup", "assistant": "clerk"}))
    called = next(frame for frame in [await next_frame(ws) for _ in range(3)] if frame["type"] == "tool.called")
    assert (called["name"], called["arguments"], called["runs_on"]) == ("lookup", "{}", "client")
    assert proxy.model.received[-1]["tools"][0]["function"]["name"] == "lookup"
    answered = await service.http.post(f"/threads/{thread_id}/runs/{called['run_id']}/tool_outputs",
                                       json={"outputs": [{"call_id": called["call_id"], "output": "in stock"}]},
                                       headers=auth("alice"))
    assert answered.status_code == 200, answered.text
    frames = await until_the_run_ends(ws)
    assert frames[-1]["type"] == "run.completed", frames[-1]
    assert frames[-1]["message"]["content"] == "echo: in stock"
    # The proxy turned the call and its output into chat messages: the assistant's tool call, then the tool's.
    call_message, output_message = proxy.model.received[-1]["messages"][-2:]
    assert call_message["tool_calls"][0]["id"] == called["call_id"]
    assert call_message["role"] == "assistant"
    assert call_message["tool_calls"][0]["function"] == {"name": "lookup", "arguments": "{}"}
    assert output_message == {"role": "tool", "tool_call_id": called["call_id"], "content": "in stock"}


# ---------------------------------------------------------------- recorded streams of the other servers

def recorded(path: Path) -> tuple[bytes, str, dict | None]:
    """A recorded stream: its body (the `#` header lines left out), the reply its text deltas make, and the
    usage its response.completed reports."""
    body = "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith("#"))
    events = [json.loads(line[len("data:"):]) for line in body.splitlines() if line.startswith("data:")]
    reply = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    usage = next(event["response"].get("usage") for event in events if event["type"] == "response.completed")
    return body.encode(), reply, usage and {key: usage[key] for key in ("input_tokens", "output_tokens")}


def replay_app(body: bytes, requests: list[dict]) -> Starlette:
    """Answers every POST /v1/responses with the recorded bytes, an event at a time."""

    async def responses(request: Request) -> StreamingResponse:
        requests.append(await request.json())

        async def events():
            for event in body.split(b"\n\n"):
                if event:
                    yield event + b"\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/responses", responses, methods=["POST"])])


@pytest.mark.parametrize("stream", sorted(STREAMS.glob("*.sse")), ids=lambda path: path.stem)
async def test_a_recorded_stream_of_each_server_is_read_into_a_stored_reply(stream, make_app, auth):
    body, expected, usage = recorded(stream)
    requests: list[dict] = []
    async with serve_on_loopback(replay_app(body, requests)) as upstream:
        app = make_app(openai_base_url=f"{upstream}/v1", openai_api_key="recorded", openai_model="recorded")
        async with serve_live(app) as service:
            thread_id = await service.new_thread(auth)
            posted = await service.http.post(f"/threads/{thread_id}/messages", json={"content": "hello"},
                                             headers=auth("alice"))
            assert posted.status_code == 201, posted.text
            assert posted.json()["errors"] == []
            (reply,) = posted.json()["replies"]
            stored = await service.messages(auth, thread_id)
            (run,) = await service.services.store.runs([reply["run_id"]])

    assert expected and reply["content"] == expected
    assert stored[-1]["content"] == expected
    assert run.usage == usage
    assert len(requests) == 1 and requests[0]["stream"] is True
