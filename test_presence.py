"""Presence, typing and assistants in rounds, over real sockets and event streams on a real uvicorn, and
across two `python serve.py` processes on PostgreSQL and Redis.

Covered: `thread.joined` carries who is present; `presence` when a user's first connection opens and
their last closes, and nothing for a second one; `typing` passed on to the others (not the sender) at
most once per 2 s per user; neither carries a seq, has an SSE id or is replayed on resume;
GET /threads/{id}/presence (404 for a stranger); the same across processes, and a `kill -9`'d process's
user leaving within the slot expiry; rounds: order, the history each run reads, a cancel dropping the
rounds to come, the run limits counting every run, MAX_ROUNDS.
"""

import asyncio
import json
import signal
import time

import pytest
from websockets.asyncio.client import connect

from conftest import (
    TEST_JWT,
    bearer,
    config_for,
    eventually,
    frames_until,
    next_frame,
    run_ends,
    serve_live,
)
from main import create_app

pytestmark = pytest.mark.anyio
EVERY = ()  # next_frame(..., skip=EVERY): presence and typing included


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def live(tmp_path_factory):
    config = config_for(tmp_path_factory.mktemp("presence"), offline_token_delay=0.02, openai_max_retries=0)
    async with serve_live(create_app(config, TEST_JWT)) as service:
        yield service


async def socket(url: str, thread_id: str, sub: str, opened: list, query: str = ""):
    ws = await connect(f"{url.replace('http', 'ws', 1)}/threads/{thread_id}/ws{query}",
                       additional_headers=bearer(sub), close_timeout=1)
    opened.append(ws)
    joined = await next_frame(ws, skip=EVERY)
    assert joined["type"] == "thread.joined", joined
    return ws, joined


async def new_thread(http, url: str = "", owner: str = "alice", members=("bob", "carol")) -> str:
    response = await http.post(f"{url}/threads", json={"members": list(members)}, headers=bearer(owner))
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def presence(http, thread_id: str, sub: str = "alice", url: str = "") -> list[dict]:
    response = await http.get(f"{url}/threads/{thread_id}/presence", headers=bearer(sub))
    assert response.status_code == 200, response.text
    assert response.json()["has_more"] is False
    return response.json()["data"]


async def frames_until_presence_of(ws, user: str, sockets: int) -> list[dict]:
    """Every frame (presence and typing included) up to that presence frame."""
    frames = []
    while not frames or frames[-1] != {"type": "presence", "thread_id": frames[-1].get("thread_id"),
                                       "user": user, "sockets": sockets}:
        frames.append(await next_frame(ws, skip=EVERY))
    return frames


# ---------------------------------------------------------------- presence

async def test_joining_and_leaving_are_announced_once_per_user_and_the_list_says_who_is_here(live, opened):
    thread_id = await new_thread(live.http)
    alice, joined = await socket(live.url, thread_id, "alice", opened)
    assert joined["present"] == [{"user": "alice", "sockets": 1}]
    assert joined["clients"] == 1
    assert "seq" in joined

    bob, bob_joined = await socket(live.url, thread_id, "bob", opened)
    assert bob_joined["present"] == [{"user": "alice", "sockets": 1}, {"user": "bob", "sockets": 1}]
    assert await next_frame(alice, skip=EVERY) == {"type": "presence", "thread_id": thread_id, "user": "bob",
                                                   "sockets": 1}
    # A second socket of bob's: present twice over, and no frame says so; carol's arrival is the next frame.
    bob2, bob2_joined = await socket(live.url, thread_id, "bob", opened)
    assert bob2_joined["present"] == [{"user": "alice", "sockets": 1}, {"user": "bob", "sockets": 2}]
    assert await presence(live.http, thread_id) == [{"user": "alice", "sockets": 1}, {"user": "bob", "sockets": 2}]
    carol, _ = await socket(live.url, thread_id, "carol", opened)
    assert await next_frame(alice, skip=EVERY) == {"type": "presence", "thread_id": thread_id, "user": "carol",
                                                   "sockets": 1}
    await carol.close()
    assert await next_frame(alice, skip=EVERY) == {"type": "presence", "thread_id": thread_id, "user": "carol",
                                                   "sockets": 0}

    await bob2.close()  # bob is still here through his first socket: nothing
    await bob.close()
    assert await next_frame(alice, skip=EVERY) == {"type": "presence", "thread_id": thread_id, "user": "bob",
                                                   "sockets": 0}
    assert await presence(live.http, thread_id) == [{"user": "alice", "sockets": 1}]
    await alice.close()
    assert await eventually(lambda: thread_id not in live.services.hub.threads)
    assert await presence(live.http, thread_id) == []


async def test_an_event_stream_counts_as_a_connection_and_gets_presence_without_an_id(live, opened):
    thread_id = await new_thread(live.http)
    async with live.http.stream("GET", f"/threads/{thread_id}/events", headers=bearer("carol")) as stream:
        assert stream.status_code == 200
        reading = asyncio.create_task(sse_lines(stream, until='"user":"bob","sockets":0'))
        assert await eventually(lambda: any(c.slot for c in live.services.hub.threads.get(thread_id, ())))
        assert await presence(live.http, thread_id) == [{"user": "carol", "sockets": 1}]
        bob, joined = await socket(live.url, thread_id, "bob", opened)
        assert joined["present"] == [{"user": "bob", "sockets": 1}, {"user": "carol", "sockets": 1}]
        await bob.close()
        lines = await asyncio.wait_for(reading, 10)
    events = [line for line in lines if line.startswith("event: presence")]
    assert len(events) == 2
    for index, line in enumerate(lines):
        if line.startswith("event: presence"):
            assert not lines[index - 1].startswith("id:")  # a client resumes from thread events only


async def sse_lines(response, until: str) -> list[str]:
    lines = []
    async for line in response.aiter_lines():
        lines.append(line)
        if until in line:
            return lines
    return lines


async def test_the_presence_route_is_404_for_a_stranger_and_401_without_a_token(live):
    thread_id = await new_thread(live.http)
    assert (await live.http.get(f"/threads/{thread_id}/presence", headers=bearer("mallory"))).status_code == 404
    assert (await live.http.get("/threads/thr_nothing/presence", headers=bearer("alice"))).status_code == 404
    assert (await live.http.get(f"/threads/{thread_id}/presence")).status_code == 401
    assert await presence(live.http, thread_id, "bob") == []


# ---------------------------------------------------------------- typing

async def test_typing_goes_to_the_others_once_per_two_seconds_and_never_to_the_sender(live, opened):
    thread_id = await new_thread(live.http)
    alice, _ = await socket(live.url, thread_id, "alice", opened)
    bob, _ = await socket(live.url, thread_id, "bob", opened)
    assert (await next_frame(alice, skip=EVERY))["user"] == "bob"
    for _ in range(5):
        await bob.send(json.dumps({"type": "typing"}))
    sent_at = time.monotonic()
    typing = await next_frame(alice, skip=EVERY)
    assert typing == {"type": "typing", "thread_id": thread_id, "user": "bob"}  # no seq
    await socket(live.url, thread_id, "carol", opened)  # a marker: whatever came before it has come
    assert [frame["type"] for frame in await frames_until_presence_of(alice, "carol", 1)] == ["presence"]
    assert [frame["type"] for frame in await frames_until_presence_of(bob, "carol", 1)] == ["presence"]

    # Past the 2 s, the next one goes through: keep typing until it does.
    async def keep_typing():
        while True:
            await bob.send(json.dumps({"type": "typing"}))
            await asyncio.sleep(0.2)

    typist = asyncio.create_task(keep_typing())
    try:
        assert await next_frame(alice, skip=EVERY) == typing
        assert time.monotonic() - sent_at >= 1.9
    finally:
        typist.cancel()
    await bob.send(json.dumps({"type": "typing", "extra": 1}))
    assert (await next_frame(bob))["error"]["code"] == "invalid_frame"


async def test_presence_and_typing_are_not_replayed_on_resume_nor_counted_in_seq(live, opened):
    thread_id = await new_thread(live.http)
    alice, joined = await socket(live.url, thread_id, "alice", opened)
    bob, _ = await socket(live.url, thread_id, "bob", opened)
    await bob.send(json.dumps({"type": "typing"}))
    frames = [await next_frame(alice, skip=EVERY), await next_frame(alice, skip=EVERY)]
    assert [frame["type"] for frame in frames] == ["presence", "typing"]
    assert all("seq" not in frame for frame in frames)
    await bob.close()
    assert (await next_frame(alice, skip=EVERY))["sockets"] == 0

    posted = await live.http.post(f"/threads/{thread_id}/messages", json={"content": "after them", "run": False},
                                  headers=bearer("carol"))
    assert posted.status_code == 201
    created = await next_frame(alice, skip=EVERY)
    assert created["type"] == "message.created"
    assert created["seq"] == joined["seq"] + 1  # presence and typing took no seq

    resumed, _ = await socket(live.url, thread_id, "alice", opened, f"?after={joined['seq']}")
    assert await next_frame(resumed, skip=EVERY) == created  # the missed thread event, and nothing else before it


# ---------------------------------------------------------------- rounds

async def test_rounds_answer_in_turn_each_seeing_every_reply_before_it(live):
    for name in ("ann", "ben"):
        await live.http.post("/assistants", json={"name": name}, headers=bearer("alice"))
    thread_id = await new_thread(live.http)
    model = live.services.offline_model
    before = len(model.received)
    posted = await live.http.post(f"/threads/{thread_id}/messages", headers=bearer("alice"),
                                  json={"content": "talk it over", "assistants": ["ann", "ben"], "rounds": 2})
    assert posted.status_code == 201, posted.text
    replies = posted.json()["replies"]
    assert [reply["assistant"]["name"] for reply in replies] == ["ann", "ben", "ann", "ben"]
    assert len({reply["run_id"] for reply in replies}) == 4  # a run each
    inputs = [request["input"] for request in list(model.received)[before:]]
    assert [request["metadata"]["assistant_name"] for request in list(model.received)[before:]] == [
        "ann", "ben", "ann", "ben"]
    first = {"type": "message", "role": "user", "content": "[alice] talk it over"}
    a1, b1, a2, b2 = (reply["content"] for reply in replies)
    assert inputs[0] == [first]
    assert inputs[1] == [first, {"type": "message", "role": "user", "content": f"[assistant ann] {a1}"}]
    assert inputs[2] == [first, {"type": "message", "role": "assistant", "content": a1},
                         {"type": "message", "role": "user", "content": f"[assistant ben] {b1}"}]
    assert inputs[3] == [first, {"type": "message", "role": "user", "content": f"[assistant ann] {a1}"},
                         {"type": "message", "role": "assistant", "content": b1},
                         {"type": "message", "role": "user", "content": f"[assistant ann] {a2}"}]
    stored = await live.messages(bearer, thread_id)
    assert [message["content"] for message in stored[1:]] == [a1, b1, a2, b2]

    again = await live.http.post(f"/threads/{thread_id}/runs", json={"assistant": "ben", "rounds": 2},
                                 headers=bearer("alice"))
    assert [reply["assistant"]["name"] for reply in again.json()["replies"]] == ["ben", "ben"]


async def test_a_socket_asks_for_rounds_and_a_cancel_drops_the_rounds_still_to_come(live, opened):
    await live.http.post("/assistants", json={"name": "ann"}, headers=bearer("alice"))
    thread_id = await new_thread(live.http)
    alice, _ = await socket(live.url, thread_id, "alice", opened)
    await alice.send(json.dumps({"type": "message", "content": "word " * 60, "assistants": ["assistant", "ann"],
                                 "rounds": 3}))
    frames = await frames_until(alice, "text.delta", count=3)
    first_run = next(frame for frame in frames if frame["type"] == "run.started")
    assert first_run["assistant"]["name"] == "assistant"
    await alice.send(json.dumps({"type": "cancel", "run_id": first_run["run_id"]}))
    # The round in progress goes on (ann answers), the four runs of rounds 2 and 3 are dropped.
    frames += await frames_until(alice, "run.completed")
    ends = run_ends(frames)
    assert [frame["type"] for frame in ends] == ["run.cancelled"] * 5 + ["run.completed"]
    assert ends[-1]["message"]["assistant"]["name"] == "ann"
    assert all(frame["by"] == "alice" for frame in ends[:-1])
    started = [frame["run_id"] for frame in frames if frame["type"] == "run.started"]
    assert started == [first_run["run_id"], ends[-1]["run_id"]]  # the dropped ones never started
    assert await eventually(lambda: live.services.engine.active_runs() == 0)
    stored = await live.messages(bearer, thread_id)
    assert [message.get("assistant", {}).get("name") for message in stored] == [None, "assistant", "ann"]


async def test_the_run_limits_count_every_round_and_rounds_past_max_rounds_are_refused(tmp_path, opened):
    config = config_for(tmp_path, max_runs_per_user=4, max_rounds=3)
    async with serve_live(create_app(config, TEST_JWT)) as service:
        thread_id = await new_thread(service.http)
        over = await service.http.post(f"/threads/{thread_id}/runs", json={"assistants": ["assistant"] * 2,
                                                                            "rounds": 3}, headers=bearer("alice"))
        assert over.status_code == 429  # 6 runs, though 2 assistants
        too_many = await service.http.post(f"/threads/{thread_id}/runs", json={"rounds": 4}, headers=bearer("alice"))
        assert too_many.status_code == 400
        assert "rounds" in too_many.json()["detail"]
        for rounds in (0, "2", 1.5):
            assert (await service.http.post(f"/threads/{thread_id}/runs", json={"rounds": rounds},
                                            headers=bearer("alice"))).status_code == 400
        ws, _ = await socket(service.url, thread_id, "alice", opened)
        await ws.send(json.dumps({"type": "run", "rounds": 4}))
        error = await next_frame(ws)
        assert error["error"]["code"] == "invalid_frame"
        assert "rounds" in error["error"]["message"]
        fits = await service.http.post(f"/threads/{thread_id}/runs", json={"assistants": ["assistant"] * 2,
                                                                            "rounds": 2}, headers=bearer("alice"))
        assert len(fits.json()["replies"]) == 4
        assert (await service.messages(bearer, thread_id)) == fits.json()["replies"]


# ---------------------------------------------------------------- across processes

async def test_presence_and_typing_cross_processes_and_a_killed_process_user_leaves_within_the_expiry(
        servers, postgres_url, redis_url, opened):
    import httpx2

    slot_seconds = 3.0
    env = {"DATABASE_URL": postgres_url, "REDIS_URL": redis_url[0], "REDIS_PREFIX": redis_url[1],
           "SOCKET_SLOT_SECONDS": str(slot_seconds)}
    first, second = await asyncio.gather(servers(env), servers(env))
    async with httpx2.AsyncClient(timeout=30) as http:
        thread_id = await new_thread(http, first.url)
        alice, _ = await socket(first.url, thread_id, "alice", opened)
        bob, joined = await socket(second.url, thread_id, "bob", opened)
        assert joined["present"] == [{"user": "alice", "sockets": 1}, {"user": "bob", "sockets": 1}]
        assert await next_frame(alice, skip=EVERY) == {"type": "presence", "thread_id": thread_id, "user": "bob",
                                                       "sockets": 1}
        bob2, _ = await socket(first.url, thread_id, "bob", opened)  # bob on both processes
        for url in (first.url, second.url):
            assert await presence(http, thread_id, url=url) == [{"user": "alice", "sockets": 1},
                                                                {"user": "bob", "sockets": 2}]
        await alice.send(json.dumps({"type": "typing"}))
        await bob2.send(json.dumps({"type": "typing"}))  # then bob, through the other process
        # bob's socket on the second process hears both, in whichever order the two processes passed them on.
        heard = [await next_frame(bob, skip=EVERY) for _ in range(2)]
        assert sorted(heard, key=lambda frame: frame["user"]) == [
            {"type": "typing", "thread_id": thread_id, "user": "alice"},
            {"type": "typing", "thread_id": thread_id, "user": "bob"}]
        assert await next_frame(alice, skip=EVERY) == {"type": "typing", "thread_id": thread_id, "user": "bob"}
        # Within 2 s of that one, through the other process: dropped. The frame after it marks the moment.
        await bob.send(json.dumps({"type": "typing"}))
        await bob.send(json.dumps({"type": "message", "content": "a marker", "run": False}))
        assert (await next_frame(alice, skip=EVERY))["type"] == "message.created"
        carol, _ = await socket(second.url, thread_id, "carol", opened)
        assert [frame["type"] for frame in await frames_until_presence_of(alice, "carol", 1)] == ["presence"]

        # bob leaves the first process: still there through the second, so nobody is told.
        await bob2.close()
        await carol.close()
        assert [frame["type"] for frame in await frames_until_presence_of(alice, "carol", 0)] == ["presence"]

        killed_at = time.monotonic()
        second.kill(signal.SIGKILL)  # bob's last socket, and its slot, left without a word
        assert await next_frame(alice, skip=EVERY, timeout=slot_seconds * 4) == {
            "type": "presence", "thread_id": thread_id, "user": "bob", "sockets": 0}
        assert await presence(http, thread_id, url=first.url) == [{"user": "alice", "sockets": 1}]
        # Within the expiry, and the sweep after it (a third of it); the rest is a margin for a loaded machine.
        assert time.monotonic() - killed_at < slot_seconds * 4
