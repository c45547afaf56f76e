"""End-to-end live events: a real uvicorn serving the app on 127.0.0.1, real `websockets` clients and
real Server-Sent Events over HTTP, replies streamed by the offline model through the real openai SDK.

Covered: fan-out of every thread event to every socket, in order, with `seq` growing by one; run frames;
handshakes (token placement, refusals, a bad `?after`); bad frames answered with error frames; a socket
that stops reading (merged deltas, closed with 1013 past its bound) and one leaving mid-run; fifty
threads at once; 4401 at token expiry; a late joiner's `active_run`; resuming with `?after` and
`Last-Event-ID` (exactly the missed events, or `resync`); the SSE route (same events, keep-alive, end at
expiry, 404 for a stranger); cancelling over the socket and over REST; every `run.started` answered by
exactly one ending; 4403 / 4404 on membership change and deletion; sockets per user (429); the bounded
event log; nothing left behind; SIGTERM (the run finishes, then 1001, new work refused, a clean exit).

Two servers are shared by the module (each test works on threads of its own): `live`, fast, and `slow`,
whose offline model takes 20 ms a token so that a run is surely still streaming while a test acts on
it (and which makes one upstream call per run: no SDK retries). Tests needing other settings start
their own.
"""

import asyncio
import contextlib
import json
import signal
import socket
import time
from typing import ClassVar
from urllib.parse import urlsplit

import httpx2
import jwt
import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import hub as hub_module
import main
from auth import JWTSettings
from conftest import (
    FRAME_TIMEOUT,
    TEST_SECRET,
    assert_seq_grows_by_one,
    authorization,
    check_run,
    config_for,
    eventually,
    frames_until,
    next_frame,
    run_ends,
    serve_live,
    sse_rest,
    sse_stream,
    sse_until,
    writer_tasks,
)
from main import MAX_FRAME_CHARS, create_app

pytestmark = pytest.mark.anyio

UNKNOWN_RUN = "run_" + "0" * 24
LONG = "word " * 60  # a reply of some 70 deltas: 1.4 s on the slow server


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def live(tmp_path_factory):
    """The fast server: starting and stopping uvicorn costs more than most of these tests."""
    app = create_app(config_for(tmp_path_factory.mktemp("live")), JWTSettings(secret=TEST_SECRET))
    async with serve_live(app) as service:
        yield service


@pytest.fixture(scope="module")
async def slow(tmp_path_factory):
    """The slow server, for tests that act while a run is in progress."""
    config = config_for(tmp_path_factory.mktemp("slow"), offline_token_delay=0.02, openai_max_retries=0)
    async with serve_live(create_app(config, JWTSettings(secret=TEST_SECRET))) as service:
        yield service


# ---------------------------------------------------------------- helpers

async def open_socket(service, thread_id: str, token: str | None, opened: list, query: str = "", **kwargs):
    """A socket with this very token in its Authorization header (conftest's `join` mints its own; None:
    no header), and its thread.joined frame."""
    headers = authorization(token) if token else {}
    ws = await connect(service.socket_url(thread_id, query), additional_headers=headers, **kwargs)
    opened.append(ws)
    joined = await next_frame(ws)
    assert joined["type"] == "thread.joined", joined
    return ws, joined


async def refused_status(url: str, **kwargs) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, **kwargs)
    return refused.value.response.status_code


async def close_code(ws) -> int | None:
    """Reads (and discards) whatever is left until the server's close frame; its code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def frames_until_closed(ws) -> tuple[list[dict], int | None]:
    frames = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT)))
    except ConnectionClosed as closed:
        return frames, closed.rcvd.code if closed.rcvd else None


async def frames_until_seq(ws, seq: int) -> list[dict]:
    """Frames up to the first thread event at or past `seq`."""
    frames = []
    while not frames or frames[-1].get("seq", 0) < seq:
        frames.append(await next_frame(ws))
    return frames


def split_after_first(frames: list[dict], frame_type: str) -> tuple[list[dict], list[dict]]:
    end = next(i for i, frame in enumerate(frames) if frame["type"] == frame_type) + 1
    return frames[:end], frames[end:]


def of_run(frames: list[dict], run_id: str) -> list[dict]:
    return [frame for frame in frames if frame.get("run_id") == run_id]


def deltas(frames: list[dict], run_id: str | None = None) -> str:
    return "".join(frame["delta"] for frame in frames
                   if frame["type"] == "text.delta" and run_id in (None, frame["run_id"]))


def assert_consecutive(joined: dict, frames: list[dict]) -> None:
    """Each thread event's seq is the one before plus one, starting after thread.joined's; only a
    text.delta may jump ahead (a merged one carries its last delta's seq)."""
    assert_seq_grows_by_one(frames)
    previous = joined["seq"]
    for frame in frames:
        if "seq" not in frame:  # an error frame is for one client, not a thread event
            continue
        if frame["type"] == "text.delta":
            assert frame["seq"] > previous, (previous, frame)
        else:
            assert frame["seq"] == previous + 1, (previous, frame)
        previous = frame["seq"]


def normalised(frames: list[dict]) -> list[dict]:
    """The thread events, with each run's consecutive deltas merged as the hub may merge them for a
    client that falls behind: what any two clients of the thread must agree on."""
    events = []
    for frame in frames:
        if "seq" not in frame or frame["type"] == "thread.joined":
            continue
        last = events[-1] if events else None
        if (frame["type"] == "text.delta" and last is not None and last["type"] == "text.delta"
                and last["run_id"] == frame["run_id"]):
            events[-1] = last | {"delta": last["delta"] + frame["delta"], "seq": frame["seq"]}
        else:
            events.append(frame)
    return events


async def replies(service, auth, thread_id: str) -> list[dict]:
    return [message for message in await service.messages(auth, thread_id) if message["role"] == "assistant"]


def hub_is_empty(service) -> bool:
    return service.services.hub.threads == {} and service.services.broker.slots == {}


def events_path(thread_id: str) -> str:
    return f"/threads/{thread_id}/events"


# ---------------------------------------------------------------- streaming to every socket

async def test_every_socket_gets_every_event_of_the_thread_in_order(live, auth, join):
    thread_id = await live.new_thread(auth, members=["bob"])
    sockets = []
    for clients, sub in enumerate(["alice", "alice", "bob"], 1):
        ws, joined = await join(live, thread_id, sub)
        assert joined["clients"] == clients
        sockets.append((ws, joined))

    response = await live.http.post(f"/threads/{thread_id}/messages", json={"content": "hello from rest"},
                                     headers=auth("alice"))
    assert response.status_code == 201
    await sockets[2][0].send(json.dumps({"type": "message", "content": "hello from bob's socket"}))

    seen = []
    for ws, joined in sockets:
        frames = await frames_until(ws, "run.completed", count=2)
        assert all(frame["thread_id"] == thread_id for frame in frames)
        assert_consecutive(joined, frames)
        rest_run, socket_run = split_after_first(frames, "run.completed")
        for run, author, content in [(rest_run, "alice", "hello from rest"),
                                     (socket_run, "bob", "hello from bob's socket")]:
            created, *run = run
            assert created["type"] == "message.created"
            assert {key: created["message"][key] for key in ("role", "content", "author")} == {
                "role": "user", "content": content, "author": author}
            assert f"heard: [{author}] {content}" in check_run(run)
        seen.append(normalised(frames))
    assert seen[1] == seen[0]  # the very same events, seq included, on every socket
    assert seen[2] == seen[0]
    for completed in run_ends(seen[0]):
        assert set(completed["usage"]) == {"input_tokens", "output_tokens"}
    stored = [message["content"] for message in await replies(live, auth, thread_id)]
    assert stored[0] == response.json()["replies"][0]["content"]
    assert stored == [frame["message"]["content"] for frame in seen[0] if frame["type"] == "run.completed"]


async def test_thread_joined_carries_the_latest_seq(live, auth, join):
    thread_id = await live.new_thread(auth)
    first, joined = await join(live, thread_id, "alice")
    await first.send(json.dumps({"type": "message", "content": "count me"}))
    frames = await frames_until(first, "run.completed")
    assert_consecutive(joined, frames)

    _, rejoined = await join(live, thread_id, "alice")
    assert rejoined["seq"] == frames[-1]["seq"]
    assert rejoined["clients"] == 2
    assert rejoined["active_run"] is None


async def test_run_frame_runs_without_a_message_and_assistants_run_in_order(live, auth, join):
    for name in ("alpha", "beta"):
        assert (await live.http.post("/assistants", json={"name": name}, headers=auth("alice"))).status_code == 201
    thread_id = await live.new_thread(auth)
    ws, _ = await join(live, thread_id, "alice")

    await ws.send(json.dumps({"type": "message", "content": "roll call", "assistants": ["alpha", "beta"]}))
    frames = await frames_until(ws, "run.completed", count=2)
    assert frames[0]["type"] == "message.created"
    alpha_run, beta_run = split_after_first(frames[1:], "run.completed")
    assert [alpha_run[0]["assistant"]["name"], beta_run[0]["assistant"]["name"]] == ["alpha", "beta"]
    alpha_reply, beta_reply = check_run(alpha_run), check_run(beta_run)
    assert "heard: [alice] roll call (1 message in its context)" in alpha_reply
    assert "heard: [assistant alpha] " in beta_reply  # beta read alpha's reply as alpha's

    await ws.send(json.dumps({"type": "run"}))
    frames = await frames_until(ws, "run.completed")
    assert frames[0]["assistant"]["name"] == "assistant"  # no message.created: nothing new was said
    run_reply = check_run(frames)
    assert [message["content"] for message in await replies(live, auth, thread_id)] == [
        alpha_reply, beta_reply, run_reply]


# ---------------------------------------------------------------- handshakes

async def test_refused_handshakes_answer_with_their_status(live, auth, jwt_settings):
    private = await live.new_thread(auth)
    alice = jwt_settings.mint("alice")
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 3600}, TEST_SECRET, algorithm="HS256")
    cases = [
        (private, "", {}, 401),
        (private, "", {"Authorization": "Bearer not-a-token"}, 401),
        (private, "", {"Authorization": f"Bearer {expired}"}, 401),
        ("thread_" + "0" * 24, "", authorization(alice), 404),
        (private, "", authorization(jwt_settings.mint("bob")), 404),
        (private, "?after=soon", authorization(alice), 400),
        (private, "?after=-1", authorization(alice), 400),
        (private, "?after=" + "9" * 21, authorization(alice), 400),
    ]
    for thread_id, query, headers, status_code in cases:
        url = live.socket_url(thread_id, query)
        assert await refused_status(url, additional_headers=headers) == status_code, (thread_id, query, headers)
    assert private not in live.services.hub.threads
    assert "user:alice" not in live.services.broker.slots


async def test_token_in_header_subprotocol_or_query(live, auth, jwt_settings, opened):
    thread_id = await live.new_thread(auth)
    alice = jwt_settings.mint("alice")
    opened.append(await connect(live.socket_url(thread_id), additional_headers=authorization(alice)))
    opened.append(by_subprotocol := await connect(live.socket_url(thread_id), subprotocols=["bearer", alice]))
    opened.append(await connect(live.socket_url(thread_id, f"?token={alice}")))
    assert by_subprotocol.subprotocol == "bearer"
    assert by_subprotocol.response.headers["Sec-WebSocket-Protocol"] == "bearer"
    assert alice not in str(by_subprotocol.response.headers)
    seqs = set()
    for clients, ws in enumerate(opened, start=1):
        joined = await next_frame(ws)
        seqs.add(joined.pop("seq"))
        assert joined == {"type": "thread.joined", "thread_id": thread_id, "clients": clients,
                          "present": [{"user": "alice", "sockets": clients}], "active_run": None}
    assert len(seqs) == 1  # nothing happened on the thread meanwhile
    (seq,) = seqs
    resumed, joined = await open_socket(live, thread_id, None, opened, f"?after={seq}&token={alice}")
    assert joined["seq"] == seq
    await resumed.send(json.dumps({"type": "message", "content": "resumed with the token in the query"}))
    assert (await next_frame(resumed))["seq"] == seq + 1


# ---------------------------------------------------------------- bad frames

BAD_FRAMES = [
    ("not json", "not JSON", "invalid_frame"),
    ("JSON array", json.dumps([{"type": "message", "content": "hi"}]), "invalid_frame"),
    ("unknown type", json.dumps({"type": "dance"}), "invalid_frame"),
    ("no type", json.dumps({"content": "hi"}), "invalid_frame"),
    ("missing content", json.dumps({"type": "message"}), "invalid_frame"),
    ("content not a string", json.dumps({"type": "message", "content": 42}), "invalid_frame"),
    ("blank content", json.dumps({"type": "message", "content": "  "}), "invalid_frame"),
    ("unknown field", json.dumps({"type": "message", "content": "hi", "zz": 1}), "invalid_frame"),
    ("unknown assistant", json.dumps({"type": "message", "content": "hi", "assistant": "nobody"}), "not_found"),
    ("cancel without run_id", json.dumps({"type": "cancel"}), "invalid_frame"),
    ("cancel with a number", json.dumps({"type": "cancel", "run_id": 7}), "invalid_frame"),
    ("cancel of an unknown run", json.dumps({"type": "cancel", "run_id": UNKNOWN_RUN}), "not_found"),
    ("binary frame", json.dumps({"type": "message", "content": "hi"}).encode(), "invalid_frame"),
    ("over the size limit", json.dumps({"type": "message", "content": "x" * MAX_FRAME_CHARS}), "invalid_frame"),
]


async def test_bad_frames_get_an_error_frame_and_the_socket_keeps_working(live, auth, join):
    thread_id = await live.new_thread(auth)
    ws, joined = await join(live, thread_id, "alice")
    for case, frame, code in BAD_FRAMES:
        await ws.send(frame)
        error = await next_frame(ws)
        assert error["type"] == "error", case
        assert error["error"]["code"] == code, case
        assert error["error"]["message"], case
        assert "seq" not in error, case  # for this client alone, not a thread event
    await ws.send(json.dumps({"type": "message", "content": "still here"}))
    frames = await frames_until(ws, "run.completed")
    assert frames[0]["type"] == "message.created"
    assert frames[0]["seq"] == joined["seq"] + 1  # the refused frames made no thread event
    assert "heard: [alice] still here" in check_run(frames[1:])
    assert [message["content"] for message in await replies(live, auth, thread_id)] == [
        frames[-1]["message"]["content"]]


# ---------------------------------------------------------------- slow and leaving sockets

class ThrottledWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with small send buffers toward the peers in `throttled_ports`: one
    that stops reading blocks the server's writes after kilobytes, not after the megabytes loopback absorbs."""

    throttled_ports: ClassVar[set[int]] = set()

    def connection_made(self, transport):
        if transport.get_extra_info("peername")[1] in self.throttled_ports:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            transport.set_write_buffer_limits(high=4096)
        super().connection_made(transport)


async def connect_without_reading(server, thread_id: str, token: str):
    """A socket that will never read, with the smallest buffers on both sides (and no compression,
    which would shrink the repetitive test replies to nothing)."""
    url = urlsplit(server.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    ThrottledWebSockets.throttled_ports.add(sock.getsockname()[1])
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port))
    return await connect(server.socket_url(thread_id), sock=sock, max_queue=1, compression=None,
                         additional_headers=authorization(token))


async def test_a_socket_that_stops_reading_delays_no_one_and_is_closed_past_its_bound(
        make_app, auth, jwt_settings, join, opened):
    async with serve_live(make_app(offline_token_delay=0.0), ws=ThrottledWebSockets) as server:
        server.services.hub.max_backlog_chars = 32 * 1024  # each connection copies the bound when it joins
        thread_id = await server.new_thread(auth, members=["slowpoke"])
        readers = [(await join(server, thread_id, "alice"))[0] for _ in range(3)]
        slow_socket = await connect_without_reading(server, thread_id, jwt_settings.mint("slowpoke"))
        opened.append(slow_socket)
        assert await eventually(lambda: len(server.services.hub.threads[thread_id]) == 4)
        slow_connection = next(c for c in server.services.hub.threads[thread_id] if c.sub == "slowpoke")

        async def watch_then_drain():
            """The slow connection's peak backlog until the server closes it; then what it had received."""
            peak_backlog = 0
            while slow_connection.close_code is None:
                peak_backlog = max(peak_backlog, slow_connection.backlog_chars)
                await asyncio.sleep(0)
            frames, code = await frames_until_closed(slow_socket)
            return peak_backlog, frames, code

        watcher = asyncio.create_task(watch_then_drain())
        long_content = ("y" * 99 + " ") * 70  # a long reply (7 kB a run, message and reply) in 70 deltas
        stored = []
        for _ in range(5):
            response, *reader_frames = await asyncio.gather(
                server.http.post(f"/threads/{thread_id}/messages", json={"content": long_content},
                                 headers=auth("alice")),
                *(frames_until(ws, "run.completed") for ws in readers))
            stored.append(response.json()["replies"][0]["content"])
            assert [check_run(frames[1:]) for frames in reader_frames] == [stored[-1]] * len(readers)
        peak_backlog, slow_frames, code = await asyncio.wait_for(watcher, FRAME_TIMEOUT)

        assert peak_backlog <= server.services.hub.max_backlog_chars <= hub_module.MAX_BACKLOG_CHARS
        assert code == hub_module.SLOW_CONSUMER_CLOSE_CODE
        assert await eventually(lambda: len(server.services.hub.threads[thread_id]) == 3)
        assert "user:slowpoke" not in server.services.broker.slots
        # What did reach the slow socket was merged, never dropped: each whole run adds up to its reply.
        assert slow_frames[0]["type"] == "thread.joined"
        completed = [i for i, frame in enumerate(slow_frames) if frame["type"] == "run.completed"]
        for start, end in zip([0, *completed], completed, strict=False):
            run = [frame for frame in slow_frames[start + 1:end + 1] if frame["type"] != "message.created"]
            assert check_run(run) in stored
        assert_seq_grows_by_one(slow_frames)


async def test_a_socket_leaving_mid_run_disturbs_no_one_and_the_reply_is_stored(slow, auth, join):
    thread_id = await slow.new_thread(auth)
    leaving, _ = await join(slow, thread_id, "alice")
    staying = [(await join(slow, thread_id, "alice"))[0] for _ in range(2)]
    await staying[0].send(json.dumps({"type": "message", "content": LONG}))
    assert [frame["type"] for frame in await frames_until(leaving, "text.delta")] == [
        "message.created", "run.started", "text.delta"]
    await leaving.close()
    assert await eventually(lambda: len(slow.services.hub.threads[thread_id]) == 2)
    assert slow.services.engine.active_runs() == 1  # still streaming, for the two left
    stayed = [check_run((await frames_until(ws, "run.completed"))[1:]) for ws in staying]
    assert stayed[0] == stayed[1]
    assert [message["content"] for message in await replies(slow, auth, thread_id)] == [stayed[0]]



async def test_with_a_coalescing_window_a_socket_gets_at_most_one_delta_frame_per_window_and_every_delta(
        make_app, auth, join):
    window = main.MAX_COALESCE_MS / 1000
    # The model's tokens come every 2 ms: without the window, about one frame each.
    async with serve_live(make_app(coalesce_ms=main.MAX_COALESCE_MS, offline_token_delay=0.002)) as server:
        thread_id = await server.new_thread(auth)
        ws, _ = await join(server, thread_id, "alice")
        await ws.send(json.dumps({"type": "message", "content": LONG}))
        first_delta = await frames_until(ws, "text.delta")
        started = time.monotonic()
        rest = await frames_until(ws, "run.completed")
        elapsed = time.monotonic() - started
        delta_frames = [frame for frame in first_delta + rest if frame["type"] == "text.delta"]
        assert "".join(frame["delta"] for frame in delta_frames) == rest[-1]["message"]["content"]
        # A frame per window at most, give or take what the way to the client shifts.
        assert len(delta_frames) <= elapsed / window + 5, (len(delta_frames), elapsed)
        assert len(rest[-1]["message"]["content"].split()) > 2 * len(delta_frames)


async def test_sockets_joining_a_thread_at_once_through_redis_all_hear_its_events(make_app, auth, join, redis_url):
    url, prefix = redis_url
    async with serve_live(make_app(redis_url=url, redis_prefix=prefix)) as server:
        thread_id = await server.new_thread(auth)
        sockets = [ws for ws, _ in await asyncio.gather(*(join(server, thread_id, "alice") for _ in range(4)))]
        await sockets[0].send(json.dumps({"type": "message", "content": "all at once"}))
        for ws in sockets:
            assert "heard: [alice] all at once" in check_run((await frames_until(ws, "run.completed"))[1:])


async def test_more_sockets_joining_at_once_than_redis_connections_all_get_in_and_hear_the_run(
        make_app, auth, join, redis_url):
    """Each join is a few Redis commands at once; the client's pool has 100 connections at most. Past that, a
    command waits for a connection, rather than failing as if Redis were down (503 to the sockets)."""
    url, prefix = redis_url
    async with serve_live(make_app(redis_url=url, redis_prefix=prefix, max_sockets_per_user=300)) as server:
        thread_id = await server.new_thread(auth)
        sockets = [ws for ws, _ in await asyncio.gather(*(join(server, thread_id, "alice") for _ in range(250)))]
        await sockets[0].send(json.dumps({"type": "message", "content": "crowded"}))
        for ws in sockets:
            assert "heard: [alice] crowded" in check_run((await frames_until(ws, "run.completed"))[1:])


def test_the_coalescing_window_is_bounded():
    for refused in (-1, main.MAX_COALESCE_MS + 1):
        with pytest.raises(ValueError, match="COALESCE_MS"):
            main.Config(coalesce_ms=refused)


# ---------------------------------------------------------------- many threads at once

async def test_fifty_threads_each_get_only_their_own_events(live, auth, join):
    owners = [f"user{n}" for n in range(50)]
    thread_ids = await asyncio.gather(*(live.new_thread(auth, owner=owner) for owner in owners))

    async def four_sockets(thread_id, owner):
        return [(await join(live, thread_id, owner))[0] for _ in range(4)]

    sockets = dict(zip(thread_ids, await asyncio.gather(*map(four_sockets, thread_ids, owners)), strict=True))
    await asyncio.gather(*(group[0].send(json.dumps({"type": "message", "content": f"I am {thread_id}"}))
                           for thread_id, group in sockets.items()))

    async def check_socket(thread_id, ws):
        frames = await frames_until(ws, "run.completed")
        assert all(frame["thread_id"] == thread_id for frame in frames)
        assert frames[0]["message"]["content"] == f"I am {thread_id}"
        assert f"heard: [{frames[0]['message']['author']}] I am {thread_id} " in check_run(frames[1:])
        assert_seq_grows_by_one(frames)

    await asyncio.gather(*(check_socket(thread_id, ws) for thread_id, group in sockets.items() for ws in group))
    # Every run has ended, so any stray frame from another thread is already queued ahead of this error.
    all_sockets = [ws for group in sockets.values() for ws in group]
    await asyncio.gather(*(ws.send("not json") for ws in all_sockets))
    assert {(await next_frame(ws))["type"] for ws in all_sockets} == {"error"}

    ours = [connection for thread_id in thread_ids for connection in live.services.hub.threads[thread_id]]
    await asyncio.gather(*(ws.close() for ws in all_sockets))
    assert await eventually(lambda: not set(thread_ids) & set(live.services.hub.threads))
    assert await eventually(lambda: not {connection.writer for connection in ours} & writer_tasks())
    assert not any(f"user:{owner}" in live.services.broker.slots for owner in owners)


async def test_a_socket_is_closed_with_4401_when_its_token_expires(live, auth, jwt_settings, opened):
    thread_id = await live.new_thread(auth)
    short_lived = jwt_settings.mint("alice", hours=1 / 3600)
    expires_at = jwt.decode(short_lived, options={"verify_signature": False})["exp"]
    ws, _ = await open_socket(live, thread_id, short_lived, opened)
    assert await close_code(ws) == main.WS_TOKEN_EXPIRED
    assert time.time() >= expires_at - 0.1  # closed at the token's own expiry, not before it
    assert await eventually(lambda: thread_id not in live.services.hub.threads)


# ---------------------------------------------------------------- joining late, and resuming

async def test_a_socket_joining_mid_run_gets_the_text_so_far_then_the_rest(slow, auth, join):
    thread_id = await slow.new_thread(auth)
    first, _ = await join(slow, thread_id, "alice")
    await first.send(json.dumps({"type": "message", "content": LONG}))
    started = (await frames_until(first, "text.delta", count=3))[1]

    late, joined = await join(slow, thread_id, "alice")
    active = joined["active_run"]
    assert active["run_id"] == started["run_id"]
    assert active["assistant"] == started["assistant"]
    assert active["text"].startswith("[offline model] ")
    rest = await frames_until(late, "run.completed")
    assert {frame["type"] for frame in rest[:-1]} == {"text.delta"}  # neither message.created nor run.started
    assert_consecutive(joined, rest)
    reply = rest[-1]["message"]["content"]
    assert active["text"] + deltas(rest) == reply
    assert [message["content"] for message in await replies(slow, auth, thread_id)] == [reply]
    await frames_until(first, "run.completed")


async def test_a_socket_that_reconnects_with_after_gets_exactly_what_it_missed(slow, auth, join):
    thread_id = await slow.new_thread(auth)
    witness, _ = await join(slow, thread_id, "alice")
    dropped, joined = await join(slow, thread_id, "alice")
    await witness.send(json.dumps({"type": "message", "content": LONG}))
    before = await frames_until(dropped, "text.delta", count=3)
    last_seen = before[-1]["seq"]
    await dropped.close()
    witnessed = await frames_until_seq(witness, last_seen + 5)  # the run went on: some events were missed

    resumed, rejoined = await join(slow, thread_id, "alice", f"?after={last_seen}")
    assert rejoined["seq"] >= last_seen + 5
    after = await frames_until(resumed, "run.completed")
    witnessed += await frames_until(witness, "run.completed")
    assert after[0]["type"] != "resync"
    assert_consecutive(joined, before + after)  # nothing twice, in order
    assert normalised(before + after) == normalised(witnessed)  # nothing missing
    reply = after[-1]["message"]["content"]
    assert deltas(before + after) == reply
    assert [message["content"] for message in await replies(slow, auth, thread_id)] == [reply]


async def test_after_the_latest_seq_replays_nothing(live, auth, join):
    thread_id = await live.new_thread(auth)
    ws, _ = await join(live, thread_id, "alice")
    await ws.send(json.dumps({"type": "message", "content": "before"}))
    latest = (await frames_until(ws, "run.completed"))[-1]["seq"]

    resumed, rejoined = await join(live, thread_id, "alice", f"?after={latest}")
    assert rejoined["seq"] == latest
    await ws.send(json.dumps({"type": "message", "content": "after"}))
    created = await next_frame(resumed)
    assert created["type"] == "message.created"
    assert created["seq"] == latest + 1
    assert created["message"]["content"] == "after"
    assert check_run(await frames_until(resumed, "run.completed"))


@pytest.mark.parametrize("where", ["long_before", "ahead"])
async def test_after_outside_the_window_gets_resync_right_after_thread_joined(live, auth, join, where):
    thread_id = await live.new_thread(auth)
    ws, _ = await join(live, thread_id, "alice")
    await ws.send(json.dumps({"type": "message", "content": "something to miss"}))
    latest = (await frames_until(ws, "run.completed"))[-1]["seq"]
    after = 1 if where == "long_before" else latest + 1000

    resumed, rejoined = await join(live, thread_id, "alice", f"?after={after}")
    assert rejoined["seq"] == latest
    assert await next_frame(resumed) == {"seq": latest, "type": "resync", "thread_id": thread_id}
    async with live.http.stream("GET", events_path(thread_id),
                                headers=auth("alice") | {"Last-Event-ID": str(after)}) as response:
        stream = sse_stream(response)
        assert [event["type"] for event in await sse_until(stream, "resync")] == ["thread.joined", "resync"]
        await ws.send(json.dumps({"type": "message", "content": "live again"}))
        created = await next_frame(resumed)
        assert created["type"] == "message.created"
        assert created["seq"] == latest + 1
        assert (await sse_until(stream, "message.created")) == [created]


# ---------------------------------------------------------------- Server-Sent Events

async def test_an_event_stream_starts_with_thread_joined_and_carries_what_a_socket_gets(live, auth, join):
    thread_id = await live.new_thread(auth, members=["bob"])
    ws, joined = await join(live, thread_id, "alice")
    async with live.http.stream("GET", events_path(thread_id), headers=auth("alice")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = sse_stream(response)
        (sse_joined,) = await sse_until(stream, "thread.joined")
        assert sse_joined == {"seq": joined["seq"], "type": "thread.joined", "thread_id": thread_id, "clients": 2,
                              "present": [{"user": "alice", "sockets": 2}], "active_run": None}
        posted = await live.http.post(f"/threads/{thread_id}/messages", json={"content": "said elsewhere"},
                                      headers=auth("bob"))
        assert posted.status_code == 201
        events = await sse_until(stream, "run.completed")
    frames = await frames_until(ws, "run.completed")
    assert normalised(events) == normalised(frames)
    assert_consecutive(sse_joined, events)
    assert events[0]["message"]["author"] == "bob"
    assert check_run(events[1:]) == posted.json()["replies"][0]["content"]


async def test_an_event_stream_resumes_from_last_event_id_with_exactly_the_missed_events(slow, auth, join):
    thread_id = await slow.new_thread(auth)
    witness, _ = await join(slow, thread_id, "alice")
    async with slow.http.stream("GET", events_path(thread_id), headers=auth("alice")) as response:
        stream = sse_stream(response)
        (joined,) = await sse_until(stream, "thread.joined")
        await witness.send(json.dumps({"type": "message", "content": LONG}))
        before = await sse_until(stream, "text.delta", count=3)
    last_seen = before[-1]["seq"]
    witnessed = await frames_until_seq(witness, last_seen + 5)

    async with slow.http.stream("GET", events_path(thread_id),
                                headers=auth("alice") | {"Last-Event-ID": str(last_seen)}) as response:
        stream = sse_stream(response)
        (rejoined,) = await sse_until(stream, "thread.joined")
        assert rejoined["seq"] >= last_seen + 5
        after = await sse_until(stream, "run.completed")
    witnessed += await frames_until(witness, "run.completed")
    assert after[0]["type"] != "resync"
    assert_consecutive(joined, before + after)
    assert normalised(before + after) == normalised(witnessed)
    assert deltas(before + after) == after[-1]["message"]["content"]


async def test_a_quiet_event_stream_sends_keep_alives_and_ends_when_its_token_expires(
        live, auth, jwt_settings, monkeypatch):
    monkeypatch.setattr(main, "SSE_KEEPALIVE_SECONDS", 0.2)
    thread_id = await live.new_thread(auth)
    token = jwt_settings.mint("alice", hours=2 / 3600)
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
    async with live.http.stream("GET", events_path(thread_id), headers=authorization(token)) as response:
        assert response.status_code == 200
        items = await sse_rest(sse_stream(response))  # the server ends it
    assert time.time() >= expires_at - 0.1
    assert items[0]["type"] == "thread.joined"
    assert set(items[1:]) == {": keep-alive"}
    assert len(items[1:]) >= 2
    assert await eventually(lambda: thread_id not in live.services.hub.threads)


async def test_an_event_stream_refuses_a_stranger_a_bad_last_event_id_and_no_token(live, auth):
    thread_id = await live.new_thread(auth)
    stranger = await live.http.get(events_path(thread_id), headers=auth("mallory"))
    missing = await live.http.get(events_path("thread_" + "0" * 24), headers=auth("alice"))
    assert stranger.status_code == 404
    assert stranger.json() == missing.json()
    bad = await live.http.get(events_path(thread_id), headers=auth("alice") | {"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400
    assert bad.json()["detail"]
    assert (await live.http.get(events_path(thread_id) + "?after=-3", headers=auth("alice"))).status_code == 400
    assert (await live.http.get(events_path(thread_id))).status_code == 401
    assert thread_id not in live.services.hub.threads


# ---------------------------------------------------------------- cancelling

async def test_cancelling_over_the_socket_stops_the_run_for_everyone_and_the_next_run_starts_at_once(
        slow, auth, join):
    assert (await slow.http.post("/assistants", json={"name": "second"}, headers=auth("alice"))).status_code == 201
    thread_id = await slow.new_thread(auth, members=["bob"])
    alice, _ = await join(slow, thread_id, "alice")
    bob, _ = await join(slow, thread_id, "bob")
    model = slow.services.offline_model
    await alice.send(json.dumps({"type": "message", "content": LONG, "assistants": ["assistant", "second"]}))
    alice_frames = await frames_until(alice, "text.delta", count=3)
    run_id = alice_frames[1]["run_id"]
    await alice.send(json.dumps({"type": "cancel", "run_id": run_id}))

    alice_frames += await frames_until(alice, "run.cancelled")
    alice_frames += await frames_until(alice, "text.delta")  # the next run, streaming
    assert await eventually(lambda: model.streams_open == 1, timeout=1)  # the cancelled run's stream is closed
    alice_frames += await frames_until(alice, "run.completed")
    bob_frames = await frames_until(bob, "run.completed")
    for frames in (alice_frames, bob_frames):
        assert [frame["type"] for frame in run_ends(frames)] == ["run.cancelled", "run.completed"]
        cancelled, completed = run_ends(frames)
        assert cancelled["run_id"] == run_id
        assert cancelled["by"] == "alice"
        assert cancelled["message"]["content"] == deltas(frames, run_id)
        assert cancelled["message"]["cancelled"] is True
        assert cancelled["message"]["run_id"] == run_id
        started = frames[frames.index(cancelled) + 1]
        assert started["type"] == "run.started"  # at once: the very next event
        assert started["seq"] == cancelled["seq"] + 1
        assert started["assistant"]["name"] == "second"
        check_run(of_run(frames, started["run_id"]))
    assert normalised(alice_frames) == normalised(bob_frames)

    stored = await replies(slow, auth, thread_id)
    assert [message["run_id"] for message in stored] == [run_id, completed["run_id"]]
    assert stored[0]["cancelled"] is True
    assert stored[0]["content"] == cancelled["message"]["content"]
    assert "cancelled" not in stored[1]
    assert await eventually(lambda: model.streams_open == 0, timeout=1)

    await alice.send(json.dumps({"type": "cancel", "run_id": run_id}))
    assert (await next_frame(alice))["error"]["code"] == "conflict"
    await bob.send(json.dumps({"type": "cancel", "run_id": completed["run_id"]}))
    assert (await next_frame(bob))["error"]["code"] == "conflict"
    await alice.send(json.dumps({"type": "cancel", "run_id": UNKNOWN_RUN}))
    assert (await next_frame(alice))["error"]["code"] == "not_found"


async def test_cancelling_over_rest_mid_run_closes_the_upstream_stream_and_answers_the_poster(slow, auth, join):
    thread_id = await slow.new_thread(auth, members=["bob"])
    alice, _ = await join(slow, thread_id, "alice")
    bob, _ = await join(slow, thread_id, "bob")
    posting = asyncio.create_task(slow.http.post(f"/threads/{thread_id}/messages", json={"content": LONG},
                                                 headers=auth("alice")))
    bob_frames = await frames_until(bob, "text.delta", count=3)
    run_id = bob_frames[1]["run_id"]
    response = await slow.http.post(f"/threads/{thread_id}/runs/{run_id}/cancel", headers=auth("bob"))
    assert response.status_code == 202
    assert response.json() == {"run_id": run_id, "status": "active"}

    bob_frames += await frames_until(bob, "run.cancelled")
    alice_frames = await frames_until(alice, "run.cancelled")
    for frames in (alice_frames, bob_frames):
        cancelled = frames[-1]
        assert cancelled["by"] == "bob"
        assert cancelled["message"]["content"] == deltas(frames, run_id)
        assert cancelled["message"]["cancelled"] is True
    assert await eventually(lambda: slow.services.offline_model.streams_open == 0, timeout=1)

    posted = await asyncio.wait_for(posting, FRAME_TIMEOUT)
    assert posted.status_code == 201
    assert posted.json()["replies"] == [cancelled["message"]]
    assert [error["code"] for error in posted.json()["errors"]] == ["cancelled"]
    (stored,) = await replies(slow, auth, thread_id)
    assert stored["cancelled"] is True
    assert stored["content"] == cancelled["message"]["content"]

    cancel = f"/threads/{thread_id}/runs/{run_id}/cancel"
    assert (await slow.http.post(cancel, headers=auth("alice"))).status_code == 409
    assert (await slow.http.post(cancel.replace(run_id, UNKNOWN_RUN), headers=auth("alice"))).status_code == 404
    other_thread = await slow.new_thread(auth)
    other = f"/threads/{other_thread}/runs/{run_id}/cancel"
    assert (await slow.http.post(other, headers=auth("alice"))).status_code == 404
    assert (await slow.http.post(cancel, headers=auth("mallory"))).status_code == 404


async def test_every_run_started_is_answered_by_exactly_one_ending_on_every_socket(slow, auth, join):
    thread_id = await slow.new_thread(auth, members=["bob"])
    sockets = [(await join(slow, thread_id, sub))[0] for sub in ("alice", "alice", "bob")]
    watcher = sockets[0]
    for n in ("one", "two", "three"):
        await watcher.send(json.dumps({"type": "message", "content": f"run {n} " + "w " * 30}))
    seen = [await frames_until(watcher, "run.started", count=2)]
    seen[0] += await frames_until(watcher, "text.delta")  # the second run is streaming
    slow.services.offline_model.fail_next("response_failed")  # the third run's upstream call: the second's was made
    await watcher.send(json.dumps({"type": "cancel", "run_id": seen[0][-1]["run_id"]}))
    seen += [[] for _ in sockets[1:]]

    for ws, frames in zip(sockets, seen, strict=True):
        while len(run_ends(frames)) < 3:
            frames.append(await next_frame(ws))
        started = [frame for frame in frames if frame["type"] == "run.started"]
        assert len(started) == 3
        for start in started:
            run = of_run(frames, start["run_id"])
            assert run[0] == start
            assert len(run_ends(run)) == 1
            assert run[-1] == run_ends(run)[0]
        assert [frame["type"] for frame in run_ends(frames)] == ["run.completed", "run.cancelled", "run.failed"]
        failed = run_ends(frames)[2]
        assert failed["error"]["code"]
        assert failed["error"]["message"]
        await ws.send("not json")  # whatever was still to come is queued ahead of the answer
        assert (await next_frame(ws))["type"] == "error"
    assert normalised(seen[1]) == normalised(seen[0])
    assert normalised(seen[2]) == normalised(seen[0])
    completed, cancelled, failed = run_ends(seen[0])
    assert failed["message"]["failed"] is True  # it streamed a little before failing: that is kept
    assert await replies(slow, auth, thread_id) == [completed["message"], cancelled["message"], failed["message"]]


# ---------------------------------------------------------------- membership and deletion

async def test_removing_a_member_closes_their_sockets_with_4403_and_deleting_the_thread_closes_all_with_4404(
        live, auth, join):
    thread_id = await live.new_thread(auth, members=["bob", "carol"])
    alice, _ = await join(live, thread_id, "alice")
    bob, _ = await join(live, thread_id, "bob")
    carol, _ = await join(live, thread_id, "carol")
    async with live.http.stream("GET", events_path(thread_id), headers=auth("bob")) as response:
        bob_events = sse_stream(response)
        await sse_until(bob_events, "thread.joined")
        changed = await live.http.patch(f"/threads/{thread_id}", json={"members": ["carol"]}, headers=auth("alice"))
        assert changed.status_code == 200
        assert changed.json()["members"] == ["carol"]
        assert await close_code(bob) == hub_module.WS_REMOVED_FROM_THREAD
        assert [item for item in await sse_rest(bob_events) if isinstance(item, dict)] == []  # it ended
    assert await refused_status(live.socket_url(thread_id), additional_headers=auth("bob")) == 404

    await alice.send(json.dumps({"type": "message", "content": "bob has gone"}))
    for ws in (alice, carol):
        frames = await frames_until(ws, "run.completed")
        assert "heard: [alice] bob has gone" in check_run(frames[1:])

    assert (await live.http.delete(f"/threads/{thread_id}", headers=auth("alice"))).status_code == 204
    assert await close_code(alice) == hub_module.WS_THREAD_DELETED
    assert await close_code(carol) == hub_module.WS_THREAD_DELETED
    for sub in ("alice", "carol"):
        assert await refused_status(live.socket_url(thread_id), additional_headers=auth(sub)) == 404
    assert await eventually(lambda: thread_id not in live.services.hub.threads)


async def test_deleting_a_thread_mid_run_closes_its_sockets_and_stops_its_run(slow, auth, join):
    thread_id = await slow.new_thread(auth, members=["bob"])
    alice, _ = await join(slow, thread_id, "alice")
    bob, _ = await join(slow, thread_id, "bob")
    await alice.send(json.dumps({"type": "message", "content": LONG}))
    await frames_until(bob, "text.delta", count=3)
    assert (await slow.http.delete(f"/threads/{thread_id}", headers=auth("alice"))).status_code == 204
    assert await close_code(alice) == hub_module.WS_THREAD_DELETED
    assert await close_code(bob) == hub_module.WS_THREAD_DELETED
    assert await eventually(lambda: slow.services.offline_model.streams_open == 0, timeout=1)
    assert await eventually(lambda: slow.services.engine.active_runs() == 0)
    assert (await slow.http.get(f"/threads/{thread_id}/messages", headers=auth("alice"))).status_code == 404


async def test_a_member_removed_while_waiting_for_their_run_gets_404_and_the_run_goes_on(slow, auth, join):
    """Their listener on the thread is closed with 4403: the thread is no longer theirs, so the reply written
    after that is not theirs to read either (404, as for anyone else); the run ends for those still on it."""
    thread_id = await slow.new_thread(auth, members=["bob"])
    alice, _ = await join(slow, thread_id, "alice")
    post = asyncio.create_task(slow.http.post(f"/threads/{thread_id}/messages", json={"content": LONG},
                                              headers=auth("bob")))
    await frames_until(alice, "text.delta", count=3)
    changed = await slow.http.patch(f"/threads/{thread_id}", json={"members": []}, headers=auth("alice"))
    assert changed.status_code == 200
    answer = await post
    assert answer.status_code == 404, answer.text
    assert answer.json() == {"detail": "thread not found"}
    completed = (await frames_until(alice, "run.completed"))[-1]
    assert completed["message"]["content"] in [m["content"] for m in await slow.messages(auth, thread_id)]


# ---------------------------------------------------------------- limits and bounds

async def test_a_user_past_the_socket_limit_is_refused_with_429_until_one_closes(make_app, auth, join):
    async with serve_live(make_app(max_sockets_per_user=3)) as server:
        first = await server.new_thread(auth)
        second = await server.new_thread(auth, members=["bob"])
        sockets = [(await join(server, thread_id, "alice"))[0] for thread_id in (first, first, second)]
        for thread_id in (first, second):
            assert await refused_status(server.socket_url(thread_id), additional_headers=auth("alice")) == 429
        assert (await server.http.get(events_path(second), headers=auth("alice"))).status_code == 429
        _, joined = await join(server, second, "bob")
        assert joined["clients"] == 2

        await sockets[0].close()
        assert await eventually(lambda: len(server.services.broker.slots.get("user:alice", ())) < 3)
        _, joined = await join(server, first, "alice")
        assert joined["clients"] == 2


async def test_the_event_log_stays_within_its_bounds(make_app, auth, join):
    async with serve_live(make_app(offline_token_delay=0.0, resume_events=20, resume_log_events=100)) as server:
        broker = server.services.broker
        thread_ids = await asyncio.gather(*(server.new_thread(auth) for _ in range(8)))
        first, last = thread_ids[0], thread_ids[-1]
        ws, joined = await join(server, first, "alice")
        await ws.close()

        async def runs(thread_id):
            for n in range(3):  # some 50 events a thread, 400 in all
                posted = await server.http.post(f"/threads/{thread_id}/messages", json={"content": f"run {n}"},
                                                headers=auth("alice"))
                assert posted.status_code == 201
                assert broker.logged <= 100

        await asyncio.gather(*map(runs, thread_ids))
        assert broker.logged <= 100
        assert broker.logged == sum(len(log.events) for log in broker.logs.values())
        assert all(len(log.events) <= 20 for log in broker.logs.values())

        # A thread's recent events can still be resumed; its first ones are gone.
        watcher, _ = await join(server, last, "alice")
        await watcher.send(json.dumps({"type": "message", "content": "one more"}))
        frames = await frames_until(watcher, "run.completed")  # some 17 events, fewer than 20
        resumed, _ = await join(server, last, "alice", f"?after={frames[0]['seq']}")
        assert normalised(await frames_until(resumed, "run.completed")) == normalised(frames[1:])
        assert broker.logged <= 100
        stale, _ = await join(server, first, "alice", f"?after={joined['seq'] + 1}")
        assert (await next_frame(stale))["type"] == "resync"


async def test_seq_still_grows_by_one_on_a_watched_thread_whose_events_were_evicted(make_app, auth, join):
    async with serve_live(make_app(offline_token_delay=0.0, resume_log_events=40)) as server:
        quiet = await server.new_thread(auth)
        ws, joined = await join(server, quiet, "alice")
        for thread_id in await asyncio.gather(*(server.new_thread(auth) for _ in range(3))):
            posted = await server.http.post(f"/threads/{thread_id}/messages", json={"content": "busy elsewhere"},
                                            headers=auth("alice"))
            assert posted.status_code == 201
        assert server.services.broker.logged <= 40
        await ws.send(json.dumps({"type": "message", "content": "still here"}))
        created = await next_frame(ws)
        assert created["type"] == "message.created"
        assert created["seq"] == joined["seq"] + 1


# ---------------------------------------------------------------- nothing left behind

async def read_event_stream(http, thread_id: str, headers: dict) -> list:
    async with http.stream("GET", events_path(thread_id), headers=headers) as response:
        assert response.status_code == 200
        return await sse_rest(sse_stream(response))


async def test_nothing_is_left_behind_after_all_sorts_of_endings(make_app, auth, join, jwt_settings, opened):
    async with serve_live(make_app(offline_token_delay=0.005)) as server:
        thread_id = await server.new_thread(auth, members=["bob"])
        doomed = await server.new_thread(auth)
        short_lived = jwt_settings.mint("alice", hours=1 / 3600)
        expiring, _ = await open_socket(server, thread_id, short_lived, opened)
        expiring_events = asyncio.create_task(read_event_stream(server.http, thread_id, authorization(short_lived)))
        closing, _ = await join(server, thread_id, "alice")
        dropping, _ = await join(server, thread_id, "alice")
        removed, _ = await join(server, thread_id, "bob")
        deleted, _ = await join(server, doomed, "alice")
        deleted_events = asyncio.create_task(read_event_stream(server.http, doomed, auth("alice")))
        assert await refused_status(server.socket_url(thread_id), additional_headers=auth("mallory")) == 404
        assert await refused_status(server.socket_url(thread_id, "?after=x"), additional_headers=auth("alice")) == 400

        await closing.send(json.dumps({"type": "message", "content": LONG}))
        await frames_until(dropping, "text.delta")
        dropping.transport.abort()  # gone mid-run without a close frame
        posted = await server.http.post(f"/threads/{thread_id}/messages", json={"content": "as JSON"},
                                        headers=auth("alice"))
        assert posted.status_code == 201
        async with server.http.stream("POST", f"/threads/{thread_id}/messages", json={"content": "as events"},
                                      headers=auth("alice") | {"Accept": "text/event-stream"}) as response:
            streamed = await sse_rest(sse_stream(response))
        assert [event["type"] for event in streamed][-1] == "run.completed"
        async with server.http.stream("GET", events_path(thread_id), headers=auth("alice")) as response:
            await sse_until(sse_stream(response), "thread.joined")  # then the client leaves
        await frames_until(closing, "run.completed", count=3)  # with unread frames queued, close() would wait
        await closing.close()
        changed = await server.http.patch(f"/threads/{thread_id}", json={"members": []}, headers=auth("alice"))
        assert changed.status_code == 200
        assert await close_code(removed) == hub_module.WS_REMOVED_FROM_THREAD
        assert (await server.http.delete(f"/threads/{doomed}", headers=auth("alice"))).status_code == 204
        assert await close_code(deleted) == hub_module.WS_THREAD_DELETED
        assert next(item for item in await deleted_events if isinstance(item, dict))["type"] == "thread.joined"
        assert await close_code(expiring) == main.WS_TOKEN_EXPIRED
        assert (await expiring_events)[0]["type"] == "thread.joined"

        services = server.services
        assert await eventually(lambda: hub_is_empty(server)), (services.hub.threads, services.broker.slots)
        assert await eventually(lambda: not writer_tasks()), writer_tasks()
        assert server.services.engine.active_runs() == 0


async def test_the_shared_servers_are_left_empty(live, slow):
    """Every earlier test closed its sockets and streams: nothing at all is left on either server."""
    assert await eventually(lambda: hub_is_empty(live)), (live.services.hub.threads, live.services.broker.slots)
    assert await eventually(lambda: hub_is_empty(slow)), (slow.services.hub.threads, slow.services.broker.slots)
    assert await eventually(lambda: not writer_tasks()), writer_tasks()
    assert live.services.engine.active_runs() == 0
    assert slow.services.engine.active_runs() == 0


# ---------------------------------------------------------------- shutdown

async def refused_once_stopping(http, thread_id: str, headers: dict):
    """The signal is handled in its own time: post (storing only, no run) until the service refuses."""
    deadline = time.monotonic() + FRAME_TIMEOUT
    while time.monotonic() < deadline:
        response = await http.post(f"/threads/{thread_id}/messages", json={"content": "still taking?", "run": False},
                                   headers=headers)
        if response.status_code != 201:
            return response
        await asyncio.sleep(0.01)
    raise AssertionError("new messages were still accepted after SIGTERM")


class TrackedWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, each connection kept in `made` (to do what uvicorn's shutdown does)."""

    made: ClassVar[list["TrackedWebSockets"]] = []

    def connection_made(self, transport):
        self.made.append(self)
        super().connection_made(transport)


@pytest.fixture
def stops(monkeypatch) -> list:
    """The service's stop() (the one a signal would run), kept for the test to call; and a fresh list of the
    sockets uvicorn makes (TrackedWebSockets.made), for the test to shut down as uvicorn's handler would."""
    kept = []

    @contextlib.contextmanager
    def keep_stop(stop):
        kept.append(stop)
        yield

    monkeypatch.setattr(main, "stop_gracefully_on_signals", keep_stop)
    monkeypatch.setattr(TrackedWebSockets, "made", [])
    return kept


async def test_on_sigterm_every_socket_is_sent_1001_before_uvicorn_shuts_its_connections(make_app, auth, join, stops):
    """What a signal does, in process: the service's stop(), then (uvicorn's handler) every connection's
    shutdown(), which sends 1012 to a socket not closed yet. The race is deterministic this way; against a
    real process it shows with some hundreds of sockets (most runs) or, rarely, with one."""
    async with serve_live(make_app(), ws=TrackedWebSockets) as server:
        thread_id = await server.new_thread(auth)
        sockets = [(await join(server, thread_id, "alice"))[0] for _ in range(3)]
        await stops[0]()
        for connection in TrackedWebSockets.made:
            connection.shutdown()
        assert [await close_code(ws) for ws in sockets] == [1001] * 3


async def test_a_socket_opened_once_the_service_has_closed_its_sockets_gets_1001_too(make_app, auth, jwt_settings,
                                                                                     stops):
    """Between the service's stop() and uvicorn's shutdown of its connections, a handshake may still be
    accepted: that socket is told 1001 (going away) as the others were, not left for uvicorn's 1012."""
    async with serve_live(make_app(), ws=TrackedWebSockets) as server:
        thread_id = await server.new_thread(auth)
        await stops[0]()
        async with connect(server.socket_url(thread_id), additional_headers=authorization(jwt_settings.mint("alice")),
                           close_timeout=1) as late:
            await eventually(lambda: late.close_code is not None)  # the service's own close, if any, comes first
            for connection in TrackedWebSockets.made:
                connection.shutdown()
            assert await close_code(late) == 1001


@pytest.mark.parametrize("mid_run", [False, True], ids=["idle", "mid_run"])
async def test_sigterm_lets_the_run_finish_then_closes_sockets_with_1001_and_the_server_exits(
        servers, jwt_settings, mid_run):
    server = await servers({"OFFLINE_TOKEN_DELAY": "0.02"})
    headers = authorization(jwt_settings.mint("alice"))
    async with httpx2.AsyncClient(base_url=server.url, timeout=10) as http:
        thread_id = (await http.post("/threads", headers=headers)).json()["id"]
        probe_id = (await http.post("/threads", headers=headers)).json()["id"]
        async with (connect(f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws",
                            additional_headers=headers) as ws,
                    http.stream("GET", events_path(thread_id), headers=headers) as response):
            assert (await next_frame(ws))["type"] == "thread.joined"
            events = sse_stream(response)
            await sse_until(events, "thread.joined")
            frames = []
            if mid_run:  # a reply of some 2 s is streaming when the signal arrives
                await ws.send(json.dumps({"type": "message", "content": "w " * 100}))
                frames = await frames_until(ws, "text.delta")
            server.process.send_signal(signal.SIGTERM)
            if mid_run:
                refused = await refused_once_stopping(http, probe_id, headers)
                assert refused.status_code == 503
                assert "retry-after" in refused.headers
                await ws.send(json.dumps({"type": "message", "content": "too late"}))
            more, code = await frames_until_closed(ws)
            frames += more
            streamed = [item for item in await sse_rest(events) if isinstance(item, dict)]  # it ended too
    assert code == 1001
    if mid_run:
        errors = [frame["error"] for frame in frames if frame["type"] == "error"]
        assert [(error["code"], error.get("retry_after")) for error in errors] == [("unavailable", 5)]  # as over REST
        events = [frame for frame in frames if "seq" in frame]
        assert events[-1]["type"] == "run.completed"  # the run finished before the socket closed
        reply = check_run(events[1:])
        assert normalised(streamed) == normalised(frames)
    else:
        assert streamed == []
    assert await eventually(lambda: server.process.poll() is not None, timeout=20), server.log()
    assert server.process.returncode in (0, -signal.SIGTERM), server.log()
    assert "Traceback" not in server.log()
    if mid_run:  # the reply was stored; the refused message was not
        restarted = await servers(port=server.port)
        async with httpx2.AsyncClient(base_url=restarted.url, timeout=10) as http:
            stored = (await http.get(f"/threads/{thread_id}/messages", headers=headers)).json()["data"]
        assert [message["content"] for message in stored] == ["w " * 100, reply]

