"""Tools: server tools the service runs, client tools any member of the thread answers (over REST or a socket,
on any process), parallel calls, the bounds (timeout, rounds), cancel while waiting, a restart while waiting,
and the calls sent back to the model in later runs. Real uvicorn, the real SDK against the offline model,
real sockets; several processes on real PostgreSQL and Redis."""

import datetime
import json
import signal
import time

import httpx2
import openai
import psycopg
import pytest

from conftest import bearer, frames_until, serve_live, until
from offline_model import OfflineModel, serve_on_loopback
from test_processes import shared_env, socket_on

pytestmark = pytest.mark.anyio
LOOKUP = {"type": "function", "name": "lookup", "description": "Find an order by its number.",
          "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]}}


async def new_assistant(server, auth, name: str, tools: list, owner: str = "alice") -> dict:
    response = await server.http.post("/assistants", json={"name": name, "tools": tools}, headers=auth(owner))
    assert response.status_code == 201, response.text
    return response.json()


async def say(ws, content: str, assistant: str) -> None:
    await ws.send(json.dumps({"type": "message", "content": content, "assistant": assistant}))


async def frame_of(ws, kind: str) -> dict:
    return (await frames_until(ws, kind))[-1]


def tool_frames(frames: list[dict]) -> list[dict]:
    return [frame for frame in frames if frame["type"].startswith("tool.")]


async def answer(server, auth, thread_id: str, run_id: str, outputs: dict, sub: str = "bob"):
    return await server.http.post(f"/threads/{thread_id}/runs/{run_id}/tool_outputs", headers=auth(sub),
                                  json={"outputs": [{"call_id": call_id, "output": output}
                                                    for call_id, output in outputs.items()]})


# ---------------------------------------------------------------- definitions

async def test_tools_are_listed_and_assistants_carry_them_checked(make_app, auth):
    async with serve_live(make_app()) as server:
        listed = (await server.http.get("/tools", headers=auth("alice"))).json()
        current_time = next(tool for tool in listed["data"] if tool["name"] == "current_time")
        assert listed["has_more"] is False
        assert current_time["description"].startswith("The current date and time")
        assert current_time["parameters"]["properties"]["timezone"]["type"] == "string"
        assert (await server.http.get("/tools")).status_code == 401

        created = await new_assistant(server, auth, "clerk", ["current_time", LOOKUP])
        assert created["tools"] == ["current_time", LOOKUP]
        assert (await server.http.get("/assistants/clerk", headers=auth("alice"))).json() == created
        for tools, detail in [
            (["no_such_tool"], "tools[0]: unknown server tool 'no_such_tool'"),
            ([LOOKUP | {"parameters": {"type": "array"}}], 'tools[0].parameters: must be a JSON Schema with "type"'),
            ([LOOKUP | {"parameters": {"type": "object", "properties": 7}}],
             "tools[0].parameters: not a valid JSON Schema"),
            ([LOOKUP | {"name": "two words"}], "tools[0].name:"),
            ([LOOKUP | {"extra": 1}], "tools[0].extra: unknown field"),
            (["current_time", "current_time"], "tools: two tools named 'current_time'"),
        ]:
            response = await server.http.post("/assistants", json={"name": "bad", "tools": tools},
                                              headers=auth("alice"))
            assert response.status_code == 400, tools
            assert response.json()["detail"].startswith(detail), response.json()


async def test_the_offline_models_tool_calls_pass_the_sdks_strict_validation():
    model = OfflineModel(token_delay=0)
    request = {"model": "gpt-test", "tools": [LOOKUP | {"strict": False}],
               "input": [{"type": "message", "role": "user", "content": 'call lookup {"order": "A1"} call lookup'}]}
    async with serve_on_loopback(model.app) as url:
        strict = openai.AsyncOpenAI(base_url=url + "/v1", api_key="offline", max_retries=0, timeout=5,
                                    _strict_response_validation=True)
        async with await strict.responses.create(**request, stream=True) as stream:
            kinds = [event.type async for event in stream]
        async with await strict.responses.create(**request, stream=True) as stream:
            completed = [event async for event in stream][-1].response
        calls = [item for item in completed.output if item.type == "function_call"]
        assert [(call.name, json.loads(call.arguments)) for call in calls] == [("lookup", {"order": "A1"}),
                                                                              ("lookup", {})]
        assert kinds.count("response.output_item.added") == 2
        assert kinds.count("response.function_call_arguments.done") == 2
        assert "response.output_text.delta" not in kinds and kinds[-1] == "response.completed"

        # The outputs come back: it answers in text, quoting each.
        request["input"] += [{"type": "function_call", "call_id": calls[0].call_id, "name": "lookup",
                              "arguments": calls[0].arguments},
                             {"type": "function_call_output", "call_id": calls[0].call_id, "output": "shipped"}]
        answered = await strict.responses.create(**request)
        assert 'lookup returned "shipped"' in answered.output_text
        # Without a phrase naming one of the request's tools, it calls nothing.
        plain = await strict.responses.create(model="gpt-test", tools=[LOOKUP], input="call nothing here")
        assert plain.output[0].type == "message"
        await strict.close()


# ---------------------------------------------------------------- running them

async def test_a_server_tool_runs_and_the_model_answers_with_its_output(make_app, auth, join):
    async with serve_live(make_app()) as server:
        await new_assistant(server, auth, "clock", ["current_time"])
        thread_id = await server.new_thread(auth, members=["bob"])
        bob, _ = await join(server, thread_id, "bob")
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, 'what time is it? call current_time {"timezone": "Europe/Paris"}', "clock")
        frames = await frames_until(bob, "run.completed")
        called, result = tool_frames(frames)
        run_id = called["run_id"]
        assert called == {"seq": called["seq"], "type": "tool.called", "thread_id": thread_id, "run_id": run_id,
                          "call_id": called["call_id"], "name": "current_time",
                          "arguments": '{"timezone": "Europe/Paris"}', "runs_on": "server"}
        assert result["type"] == "tool.result" and result["call_id"] == called["call_id"]
        now = datetime.datetime.fromisoformat(result["output"])
        assert now.utcoffset() in (datetime.timedelta(hours=1), datetime.timedelta(hours=2))
        reply = frames[-1]["message"]["content"]
        assert reply == f'[offline model] clock got the tool outputs: current_time returned "{result["output"]}"'

        _, tool, assistant = await server.messages(auth, thread_id, "bob")
        assert tool["role"] == "tool" and tool["run_id"] == run_id and tool["assistant"]["name"] == "clock"
        assert tool["tool_call"] == {"call_id": called["call_id"], "name": "current_time",
                                     "arguments": '{"timezone": "Europe/Paris"}', "runs_on": "server"}
        assert tool["content"] == result["output"] and "pending" not in tool
        assert assistant["content"] == reply
        second = server.services.offline_model.received[-1]
        assert [tool["name"] for tool in second["tools"]] == ["current_time"]
        assert second["input"][-2:] == [
            {"type": "function_call", "call_id": called["call_id"], "name": "current_time",
             "arguments": '{"timezone": "Europe/Paris"}'},
            {"type": "function_call_output", "call_id": called["call_id"], "output": result["output"]}]


async def test_a_server_tool_that_fails_gives_the_model_an_error_text_and_the_run_goes_on(make_app, auth, join):
    async with serve_live(make_app()) as server:
        await new_assistant(server, auth, "clock", ["current_time"])
        thread_id = await server.new_thread(auth)
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, 'call current_time {"timezone": "Mars/Olympus_Mons"}', "clock")
        frames = await frames_until(alice, "run.completed")
        _, result = tool_frames(frames)
        assert result["output"].startswith("error: ZoneInfoNotFoundError")
        assert result["output"] in frames[-1]["message"]["content"]


async def test_a_client_tool_is_answered_by_another_member_over_rest_once(make_app, auth, join, database_url):
    async with serve_live(make_app(database_url=database_url)) as server:
        await new_assistant(server, auth, "clerk", [LOOKUP])
        thread_id = await server.new_thread(auth, members=["bob"])
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, 'where is my order? call lookup {"order": "A-17"}', "clerk")
        called = await frame_of(alice, "tool.called")
        assert (called["name"], called["arguments"], called["runs_on"]) == ("lookup", '{"order": "A-17"}', "client")
        run_id, call_id = called["run_id"], called["call_id"]
        pending = [m for m in await server.messages(auth, thread_id) if m["role"] == "tool"]
        assert pending[0]["pending"] is True and pending[0]["content"] == ""

        assert (await answer(server, auth, thread_id, run_id, {call_id: "x"}, sub="carol")).status_code == 404
        assert (await answer(server, auth, thread_id, run_id, {"call_nope": "x"})).status_code == 404
        assert (await answer(server, auth, thread_id, "run_nope", {call_id: "x"})).status_code == 404
        twice = await server.http.post(f"/threads/{thread_id}/runs/{run_id}/tool_outputs", headers=auth("bob"),
                                       json={"outputs": [{"call_id": call_id, "output": "a"}] * 2})
        assert twice.status_code == 400 and twice.json()["detail"] == f"outputs: two outputs for call {call_id!r}"
        answered = await answer(server, auth, thread_id, run_id, {call_id: "shipped on Monday"})
        assert answered.status_code == 200, answered.text
        assert answered.json()["messages"][0]["content"] == "shipped on Monday"
        again = await answer(server, auth, thread_id, run_id, {call_id: "lost"})
        assert again.status_code == 409 and "already been answered" in again.json()["detail"]

        frames = await frames_until(alice, "run.completed")
        assert tool_frames(frames) == [{"seq": frames[0]["seq"], "type": "tool.result", "thread_id": thread_id,
                                        "run_id": run_id, "call_id": call_id, "output": "shipped on Monday"}]
        assert frames[-1]["message"]["content"].endswith('lookup returned "shipped on Monday"')
        assert (await answer(server, auth, thread_id, run_id, {call_id: "late"})).status_code == 409
        tool = next(m for m in await server.messages(auth, thread_id, "bob") if m["role"] == "tool")
        assert tool["content"] == "shipped on Monday" and "pending" not in tool


async def test_a_client_tool_is_answered_over_a_socket_and_a_second_answer_is_refused(make_app, auth, join):
    async with serve_live(make_app()) as server:
        await new_assistant(server, auth, "clerk", [LOOKUP])
        thread_id = await server.new_thread(auth, members=["bob"])
        alice, _ = await join(server, thread_id, "alice")
        bob, _ = await join(server, thread_id, "bob")
        await say(alice, "call lookup", "clerk")
        called = await frame_of(bob, "tool.called")
        frame = {"type": "tool_outputs", "run_id": called["run_id"],
                 "outputs": [{"call_id": called["call_id"], "output": "from bob's socket"}]}
        await bob.send(json.dumps(frame))
        assert (await frame_of(bob, "tool.result"))["output"] == "from bob's socket"
        await alice.send(json.dumps(frame | {"outputs": [{"call_id": called["call_id"], "output": "too late"}]}))
        frames = await frames_until(alice, "error")
        assert frames[-1]["error"]["code"] == "conflict"
        done = await frame_of(bob, "run.completed")
        assert done["message"]["content"].endswith('lookup returned "from bob\'s socket"')


async def test_parallel_calls_run_in_one_step_and_the_run_goes_on_when_all_are_answered(make_app, auth, join):
    async with serve_live(make_app()) as server:
        await new_assistant(server, auth, "clerk", ["current_time", LOOKUP])
        thread_id = await server.new_thread(auth, members=["bob"])
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, 'call lookup {"order": "1"} and call lookup {"order": "2"} and call current_time', "clerk")
        frames = await frames_until(alice, "tool.called", count=3)
        calls = {frame["call_id"]: frame for frame in frames if frame["type"] == "tool.called"}
        client_calls = [call_id for call_id, frame in calls.items() if frame["runs_on"] == "client"]
        assert [frame["runs_on"] for frame in calls.values()] == ["client", "client", "server"]
        run_id = frames[-1]["run_id"]
        first = await answer(server, auth, thread_id, run_id, {client_calls[0]: "one"})
        assert first.status_code == 200
        await frames_until(alice, "tool.result", count=2)  # the server tool's, and the first answer's
        assert len(server.services.offline_model.received) == 1  # still waiting for the second output
        await answer(server, auth, thread_id, run_id, {client_calls[1]: "two"})
        done = await frame_of(alice, "run.completed")
        assert done["message"]["content"].startswith(
            '[offline model] clerk got the tool outputs: lookup returned "one"; lookup returned "two"; '
            'current_time returned "')
        sent = server.services.offline_model.received[-1]["input"]
        assert [item["type"] for item in sent[-6:]] == ["function_call", "function_call_output"] * 3
        assert [item["call_id"] for item in sent[-6:]] == [call_id for call_id in calls for _ in (1, 2)]


async def test_a_run_waiting_too_long_fails_with_tool_timeout_and_its_call_is_closed(make_app, auth, join):
    async with serve_live(make_app(tool_timeout_seconds=0.5)) as server:
        await new_assistant(server, auth, "clerk", [LOOKUP])
        thread_id = await server.new_thread(auth, members=["bob"])
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, "call lookup", "clerk")
        frames = await frames_until(alice, "run.failed")
        called, result = tool_frames(frames)
        assert frames[-1]["error"]["code"] == "tool_timeout"
        assert result["call_id"] == called["call_id"] and result["output"].startswith("error: no output came")
        late = await answer(server, auth, thread_id, called["run_id"], {called["call_id"]: "late"})
        assert late.status_code == 409
        # The next run sees the call with the output it ended with: a model refuses a call without one.
        await say(alice, "try again later", "clerk")
        await frame_of(alice, "run.completed")
        assert server.services.offline_model.received[-1]["input"][2]["output"] == result["output"]


async def test_a_run_waiting_for_outputs_can_be_cancelled(make_app, auth, join):
    async with serve_live(make_app()) as server:
        await new_assistant(server, auth, "clerk", [LOOKUP])
        thread_id = await server.new_thread(auth, members=["bob"])
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, "call lookup", "clerk")
        called = await frame_of(alice, "tool.called")
        cancelled = await server.http.post(f"/threads/{thread_id}/runs/{called['run_id']}/cancel",
                                           headers={"Authorization": auth("bob")["Authorization"]})
        assert cancelled.status_code == 202
        frames = await frames_until(alice, "run.cancelled")
        assert frames[-1]["by"] == "bob"
        assert tool_frames(frames)[0]["output"] == "error: the run was cancelled"
        late = await answer(server, auth, thread_id, called["run_id"], {called["call_id"]: "late"})
        assert late.status_code == 409


async def test_past_the_tool_rounds_the_run_fails_with_tool_rounds(make_app, auth, join):
    async with serve_live(make_app(tool_rounds=0)) as server:
        await new_assistant(server, auth, "clock", ["current_time"])
        thread_id = await server.new_thread(auth)
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, "call current_time", "clock")
        frames = await frames_until(alice, "run.failed")
        assert frames[-1]["error"]["code"] == "tool_rounds"
        assert not tool_frames(frames)


async def test_later_runs_get_the_calls_back_and_other_assistants_read_them_as_text(make_app, auth, join):
    async with serve_live(make_app()) as server:
        await new_assistant(server, auth, "clerk", [LOOKUP])
        thread_id = await server.new_thread(auth, members=["bob"])
        alice, _ = await join(server, thread_id, "alice")
        await say(alice, 'call lookup {"order": "9"}', "clerk")
        called = await frame_of(alice, "tool.called")
        await answer(server, auth, thread_id, called["run_id"], {called["call_id"]: "in transit"})
        reply = (await frame_of(alice, "run.completed"))["message"]["content"]

        await say(alice, "thanks", "clerk")
        await frame_of(alice, "run.completed")
        model = server.services.offline_model
        assert model.received[-1]["input"] == [
            {"type": "message", "role": "user", "content": '[alice] call lookup {"order": "9"}'},
            {"type": "function_call", "call_id": called["call_id"], "name": "lookup", "arguments": '{"order": "9"}'},
            {"type": "function_call_output", "call_id": called["call_id"], "output": "in transit"},
            {"type": "message", "role": "assistant", "content": reply},
            {"type": "message", "role": "user", "content": "[alice] thanks"}]
        assert model.received[-1]["tools"][0]["name"] == "lookup"

        await say(alice, "and you?", "assistant")  # no tools: the clerk's call is text to it
        await frame_of(alice, "run.completed")
        seen = model.received[-1]
        assert "tools" not in seen
        assert seen["input"][1] == {"type": "message", "role": "user", "content":
                                    '[assistant clerk called lookup({"order": "9"}), which returned] in transit'}


# ---------------------------------------------------------------- processes

def runner_pid(database_url: str, thread_id: str) -> int:
    with psycopg.connect(database_url) as connection:
        runner = connection.execute("SELECT runner FROM threads WHERE id = %s", (thread_id,)).fetchone()[0]
    return int(runner.split(":")[1])


async def test_a_call_answered_on_the_process_that_does_not_run_the_run(servers, postgres_url, redis_url):
    one, two = await servers(shared_env(postgres_url, redis_url)), await servers(shared_env(postgres_url, redis_url))
    async with httpx2.AsyncClient(timeout=30) as http:
        created = await http.post(f"{one.url}/assistants", json={"name": "clerk", "tools": [LOOKUP]},
                                  headers=bearer("alice"))
        assert created.status_code == 201
        created = await http.post(f"{one.url}/threads", json={"members": ["bob"]}, headers=bearer("alice"))
        thread_id = created.json()["id"]
        alice, _ = await socket_on(one, thread_id, bearer("alice"))
        await say(alice, "call lookup", "clerk")
        called = await frame_of(alice, "tool.called")
        runner = runner_pid(postgres_url, thread_id)
        other = two if runner == one.process.pid else one
        assert runner in (one.process.pid, two.process.pid) and other.process.pid != runner
        bob, _ = await socket_on(other, thread_id, bearer("bob"))
        await bob.send(json.dumps({"type": "tool_outputs", "run_id": called["run_id"],
                                   "outputs": [{"call_id": called["call_id"], "output": "answered elsewhere"}]}))
        done = await frame_of(alice, "run.completed")
        assert done["message"]["content"].endswith('lookup returned "answered elsewhere"')
        again = await http.post(f"{other.url}/threads/{thread_id}/runs/{called['run_id']}/tool_outputs",
                                json={"outputs": [{"call_id": called["call_id"], "output": "x"}]},
                                headers=bearer("bob"))
        assert again.status_code == 409
        await alice.close()
        await bob.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_a_restart_while_waiting_resumes_the_wait_and_loses_nothing(servers, tmp_path, stop):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/gainz.db", "RUN_LEASE_SECONDS": "2", "SHUTDOWN_GRACE_SECONDS": "60"}
    first = await servers(env)
    async with httpx2.AsyncClient(timeout=30) as http:
        await http.post(f"{first.url}/assistants", json={"name": "clerk", "tools": [LOOKUP]}, headers=bearer("alice"))
        created = await http.post(f"{first.url}/threads", json={"members": ["bob"]}, headers=bearer("alice"))
        thread_id = created.json()["id"]
        alice, _ = await socket_on(first, thread_id, bearer("alice"))
        await say(alice, "call lookup", "clerk")
        called = await frame_of(alice, "tool.called")
        stopping = time.monotonic()
        first.kill(stop)
        # A run waiting for people is not one to let finish: SIGTERM leaves it waiting in the store at once.
        assert time.monotonic() - stopping < 30
        assert stop == signal.SIGKILL or "Traceback" not in first.log()

        second = await servers(env, port=first.port)
        answered = await http.post(f"{second.url}/threads/{thread_id}/runs/{called['run_id']}/tool_outputs",
                                   json={"outputs": [{"call_id": called["call_id"], "output": "after the restart"}]},
                                   headers=bearer("bob"))
        assert answered.status_code == 200, answered.text

        async def ended():
            found = await http.get(f"{second.url}/threads/{thread_id}/messages", headers=bearer("alice"))
            data = found.json()["data"]
            return data if data[-1]["role"] == "assistant" else None

        _, tool, reply = await until(ended)  # one call: the model was not asked again for it
        assert tool["tool_call"]["call_id"] == called["call_id"] and tool["content"] == "after the restart"
        assert reply["run_id"] == called["run_id"]
        assert reply["content"].endswith('lookup returned "after the restart"')
        await alice.close()
