"""End-to-end WebSocket tests: a real uvicorn serving the app on 127.0.0.1, real `websockets`
clients, replies streamed by the offline model through the real openai SDK."""

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import jwt
import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import hub as hub_module
from auth import JWTSettings
from conftest import TEST_SECRET, eventually, next_frame, serve_live, writer_tasks
from main import MAX_FRAME_CHARS, Config, create_app

pytestmark = pytest.mark.anyio

FRAME_TIMEOUT = 10


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def live(tmp_path_factory):
    """One server for the module (each test works on threads of its own): starting and stopping uvicorn
    costs more than most of these tests. No delay between offline tokens: timing does not matter here."""
    config = Config(assistants_file=tmp_path_factory.mktemp("live") / "assistants.json", offline_token_delay=0.0)
    async with serve_live(create_app(config, JWTSettings(secret=TEST_SECRET))) as service:
        yield service


@pytest.fixture
def token(jwt_settings):
    return jwt_settings.mint


@pytest.fixture
async def opened():
    """The sockets a test opens; those still open are closed when it ends, passed or failed, so that
    a failure does not leave sockets behind on the shared server."""
    sockets = []
    yield sockets
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


@pytest.fixture
def join(live, opened):
    async def join_thread(thread_id: str, token: str, clients: int | None = None, server=None):
        """A socket on the thread, its first frame (thread.joined, counting `clients` if given) already read."""
        headers = {"Authorization": f"Bearer {token}"}
        ws = await connect(socket_url(server or live, thread_id), additional_headers=headers)
        opened.append(ws)
        joined = await next_frame(ws)
        assert joined["type"] == "thread.joined" and joined["thread_id"] == thread_id
        assert clients is None or joined["clients"] == clients
        return ws

    return join_thread


# ---------------------------------------------------------------- helpers

async def new_thread(live, auth, owner="alice", members=()) -> str:
    response = await live.http.post("/threads", json={"members": list(members)}, headers=auth(owner))
    assert response.status_code == 201
    return response.json()["id"]


def socket_url(live, thread_id: str, query: str = "") -> str:
    return f"{live.ws_url}/threads/{thread_id}/ws{query}"


async def frames_until(ws, last_type: str, count: int = 1) -> list[dict]:
    """Frames up to and including the `count`-th frame of type `last_type`."""
    frames = []
    while count:
        frames.append(await next_frame(ws))
        count -= frames[-1]["type"] == last_type
    return frames


def split_after_first(frames: list[dict], frame_type: str) -> tuple[list[dict], list[dict]]:
    end = next(i for i, frame in enumerate(frames) if frame["type"] == frame_type) + 1
    return frames[:end], frames[end:]


def check_run(frames: list[dict]) -> str:
    """Asserts one run's frames (run.started, text.delta..., run.completed); returns the reply."""
    started, *deltas, completed = frames
    assert started["type"] == "run.started" and completed["type"] == "run.completed"
    assert deltas and all(frame["type"] == "text.delta" for frame in deltas)
    assert {frame["run_id"] for frame in frames} == {started["run_id"]}
    reply = completed["message"]["content"]
    assert "".join(frame["delta"] for frame in deltas) == reply
    assert completed["message"]["assistant"] == started["assistant"]
    return reply


async def stored_replies(live, auth, thread_id: str) -> list[str]:
    messages = (await live.http.get(f"/threads/{thread_id}/messages", headers=auth("alice"))).json()
    return [message["content"] for message in messages if message["role"] == "assistant"]


async def close_code(ws) -> int | None:
    """Reads (and discards) whatever is left until the server's close frame; its code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


# ---------------------------------------------------------------- streaming to every socket

async def test_every_socket_gets_every_event_of_the_thread_in_order(live, auth, token, join):
    thread_id = await new_thread(live, auth, members=["bob"])
    sockets = [await join(thread_id, token(sub), clients=n) for n, sub in enumerate(["alice", "alice", "bob"], 1)]

    response = await live.http.post(f"/threads/{thread_id}/messages", json={"content": "hello from rest"},
                                     headers=auth("alice"))
    assert response.status_code == 201
    await sockets[2].send(json.dumps({"type": "message", "content": "hello from bob's socket"}))

    replies = set()
    for ws in sockets:
        frames = await frames_until(ws, "run.completed", count=2)
        assert all(frame["thread_id"] == thread_id for frame in frames)
        rest_run, socket_run = split_after_first(frames, "run.completed")
        for run, author, content in [(rest_run, "alice", "hello from rest"),
                                     (socket_run, "bob", "hello from bob's socket")]:
            created, *run = run
            assert created["type"] == "message.created"
            assert {key: created["message"][key] for key in ("role", "content", "author")} == {
                "role": "user", "content": content, "author": author}
            reply = check_run(run)
            assert f"heard: {content}" in reply
            replies.add((author, reply))
    stored = await stored_replies(live, auth, thread_id)
    assert stored[0] == response.json()["replies"][0]["content"]
    assert replies == {("alice", stored[0]), ("bob", stored[1])}  # every socket saw the very same replies


async def test_run_frame_runs_without_a_message_and_assistants_run_in_order(live, auth, token, join):
    for name in ("alpha", "beta"):
        assert (await live.http.post("/assistants", json={"name": name}, headers=auth("alice"))).status_code == 201
    thread_id = await new_thread(live, auth)
    ws = await join(thread_id, token("alice"))

    await ws.send(json.dumps({"type": "message", "content": "roll call", "assistants": ["alpha", "beta"]}))
    frames = await frames_until(ws, "run.completed", count=2)
    assert frames[0]["type"] == "message.created"
    alpha_run, beta_run = split_after_first(frames[1:], "run.completed")
    assert [alpha_run[0]["assistant"]["name"], beta_run[0]["assistant"]["name"]] == ["alpha", "beta"]
    alpha_reply, beta_reply = check_run(alpha_run), check_run(beta_run)
    assert alpha_reply.startswith("[offline model] alpha heard: roll call")
    assert beta_reply.startswith("[offline model] beta heard: roll call")

    await ws.send(json.dumps({"type": "run"}))
    frames = await frames_until(ws, "run.completed")
    assert frames[0]["assistant"]["name"] == "assistant"  # no message.created: nothing new was said
    run_reply = check_run(frames)
    assert await stored_replies(live, auth, thread_id) == [alpha_reply, beta_reply, run_reply]


# ---------------------------------------------------------------- handshakes

async def test_refused_handshakes_answer_with_their_status(live, auth, token):
    private = await new_thread(live, auth)
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 3600}, TEST_SECRET, algorithm="HS256")
    cases = [
        (private, {}, 401),
        (private, {"Authorization": "Bearer not-a-token"}, 401),
        (private, {"Authorization": f"Bearer {expired}"}, 401),
        ("conv_" + "0" * 24, {"Authorization": f"Bearer {token('alice')}"}, 404),
        (private, {"Authorization": f"Bearer {token('bob')}"}, 404),
    ]
    for thread_id, headers, status_code in cases:
        with pytest.raises(InvalidStatus) as refused:
            await connect(socket_url(live, thread_id), additional_headers=headers)
        assert refused.value.response.status_code == status_code, (thread_id, headers)
    assert live.hub.clients(private) == 0


async def test_token_in_header_subprotocol_or_query(live, auth, token, opened):
    thread_id = await new_thread(live, auth)
    alice = token("alice")
    opened.append(await connect(socket_url(live, thread_id), additional_headers={"Authorization": f"Bearer {alice}"}))
    opened.append(by_subprotocol := await connect(socket_url(live, thread_id), subprotocols=["bearer", alice]))
    opened.append(await connect(socket_url(live, thread_id, f"?token={alice}")))
    assert by_subprotocol.subprotocol == "bearer"
    assert by_subprotocol.response.headers["Sec-WebSocket-Protocol"] == "bearer"
    assert alice not in str(by_subprotocol.response.headers)
    for clients, ws in enumerate(opened, start=1):
        assert await next_frame(ws) == {"type": "thread.joined", "thread_id": thread_id, "clients": clients}


# ---------------------------------------------------------------- bad frames

BAD_FRAMES = [
    ("not json", "not JSON", "invalid_frame"),
    ("JSON array", json.dumps([{"type": "message", "content": "hi"}]), "invalid_frame"),
    ("unknown type", json.dumps({"type": "dance"}), "invalid_frame"),
    ("missing content", json.dumps({"type": "message"}), "invalid_frame"),
    ("content not a string", json.dumps({"type": "message", "content": 42}), "invalid_frame"),
    ("unknown assistant", json.dumps({"type": "message", "content": "hi", "assistant": "nobody"}), "not_found"),
    ("binary frame", json.dumps({"type": "message", "content": "hi"}).encode(), "invalid_frame"),
    ("over the size limit", json.dumps({"type": "message", "content": "x" * MAX_FRAME_CHARS}), "invalid_frame"),
]


async def test_bad_frames_get_an_error_frame_and_the_socket_keeps_working(live, auth, token, join):
    thread_id = await new_thread(live, auth)
    ws = await join(thread_id, token("alice"))
    for case, frame, code in BAD_FRAMES:
        await ws.send(frame)
        error = await next_frame(ws)
        assert error["type"] == "error" and error["error"]["code"] == code, case
        assert error["error"]["message"], case
    await ws.send(json.dumps({"type": "message", "content": "still here"}))
    frames = await frames_until(ws, "run.completed")
    assert frames[0]["type"] == "message.created" and "heard: still here" in check_run(frames[1:])
    assert await stored_replies(live, auth, thread_id) == [frames[-1]["message"]["content"]]


# ---------------------------------------------------------------- slow and leaving sockets

class ThrottledWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with small send buffers toward the peers in `throttled_ports`: one
    that stops reading blocks the server's writes after kilobytes, not after the megabytes loopback absorbs."""

    throttled_ports: set[int] = set()

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
    return await connect(socket_url(server, thread_id), sock=sock, max_queue=1, compression=None,
                         additional_headers={"Authorization": f"Bearer {token}"})


async def test_a_socket_that_stops_reading_delays_no_one_and_is_closed_past_its_bound(make_app, auth, token, join):
    app = make_app(offline_token_delay=0.0)
    async with serve_live(app, ws=ThrottledWebSockets) as server:
        server.hub.max_backlog_chars = 32 * 1024  # each connection copies the bound when it joins
        thread_id = await new_thread(server, auth)
        readers = [await join(thread_id, token("alice"), server=server) for _ in range(3)]
        slow = await connect_without_reading(server, thread_id, token("alice"))
        await slow_socket_scenario(server, auth, thread_id, readers, slow)


async def slow_socket_scenario(server, auth, thread_id, readers, slow):
    assert await eventually(lambda: server.hub.clients(thread_id) == 4)
    slow_connection = next(c for c in server.hub.threads[thread_id] if c.websocket.client.port == slow.local_address[1])

    async def watch_then_drain():
        """The slow connection's peak backlog until the server closes it; then what it had received."""
        peak_backlog, frames = 0, []
        while slow_connection.close_code is None:
            peak_backlog = max(peak_backlog, slow_connection.backlog_chars)
            await asyncio.sleep(0)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frames.append(json.loads(await slow.recv()))
        return peak_backlog, frames, closed.value.rcvd.code

    watcher = asyncio.create_task(watch_then_drain())
    long_content = ("y" * 99 + " ") * 70  # a long reply (7 kB a run, message and reply) in 70 deltas
    replies = []
    for _ in range(5):
        response, *reader_frames = await asyncio.gather(
            server.http.post(f"/threads/{thread_id}/messages", json={"content": long_content}, headers=auth("alice")),
            *(frames_until(ws, "run.completed") for ws in readers))
        replies.append(response.json()["replies"][0]["content"])
        assert [check_run(frames[1:]) for frames in reader_frames] == [replies[-1]] * len(readers)
    peak_backlog, slow_frames, code = await asyncio.wait_for(watcher, FRAME_TIMEOUT)

    assert peak_backlog <= server.hub.max_backlog_chars <= hub_module.MAX_BACKLOG_CHARS
    assert code == hub_module.SLOW_CONSUMER_CLOSE_CODE
    assert server.hub.clients(thread_id) == 3
    # What did reach the slow socket was merged, never dropped: each whole run adds up to its reply.
    assert slow_frames[0]["type"] == "thread.joined"
    completed = [i for i, frame in enumerate(slow_frames) if frame["type"] == "run.completed"]
    for start, end in zip([0, *completed], completed):
        run = [frame for frame in slow_frames[start + 1:end + 1] if frame["type"] != "message.created"]
        assert check_run(run) in replies


async def test_a_socket_leaving_mid_run_disturbs_no_one_and_the_reply_is_stored(live, auth, token, join):
    thread_id = await new_thread(live, auth)
    leaving, *staying = [await join(thread_id, token("alice")) for _ in range(3)]
    live.offline_model.token_delay = 0.01  # slow enough that the run is surely still streaming when it leaves
    try:
        await staying[0].send(json.dumps({"type": "message", "content": "story " * 40}))
        first_frames = [(await next_frame(leaving))["type"] for _ in range(3)]
        assert first_frames == ["message.created", "run.started", "text.delta"]
        await leaving.close()
        assert live.engine.queue.busy_threads() == 1
        replies = [check_run((await frames_until(ws, "run.completed"))[1:]) for ws in staying]
    finally:
        live.offline_model.token_delay = 0.0
    assert replies[0] == replies[1]
    assert await stored_replies(live, auth, thread_id) == [replies[0]]
    assert await eventually(lambda: live.hub.clients(thread_id) == 2)


# ---------------------------------------------------------------- many threads at once, and cleanup

async def test_fifty_threads_each_get_only_their_own_events_and_the_hub_empties(live, auth, token, join):
    alice = token("alice")
    thread_ids = await asyncio.gather(*(new_thread(live, auth) for _ in range(50)))

    async def four_sockets(thread_id):
        return [await join(thread_id, alice) for _ in range(4)]

    sockets = dict(zip(thread_ids, await asyncio.gather(*map(four_sockets, thread_ids))))
    await asyncio.gather(*(group[0].send(json.dumps({"type": "message", "content": f"I am {thread_id}"}))
                           for thread_id, group in sockets.items()))

    async def check_socket(thread_id, ws):
        frames = await frames_until(ws, "run.completed")
        assert all(frame["thread_id"] == thread_id for frame in frames)
        assert frames[0]["message"]["content"] == f"I am {thread_id}"
        assert f"heard: I am {thread_id} " in check_run(frames[1:])

    await asyncio.gather(*(check_socket(thread_id, ws) for thread_id, group in sockets.items() for ws in group))
    # Every run has ended, so any stray frame from another thread is already queued ahead of this error.
    all_sockets = [ws for group in sockets.values() for ws in group]
    await asyncio.gather(*(ws.send("not json") for ws in all_sockets))
    assert {(await next_frame(ws))["type"] for ws in all_sockets} == {"error"}

    ours = [connection for thread_id in thread_ids for connection in live.hub.threads[thread_id]]
    await asyncio.gather(*(ws.close() for ws in all_sockets))
    assert await eventually(lambda: not set(thread_ids) & set(live.hub.threads))
    assert await eventually(lambda: not {connection.writer for connection in ours} & writer_tasks())
    # Every earlier test closed its sockets too, so nothing at all is left.
    assert await eventually(lambda: live.hub.threads == {} and not writer_tasks()), (live.hub.threads, writer_tasks())


async def test_a_socket_is_closed_with_4401_when_its_token_expires(live, auth, token, join):
    thread_id = await new_thread(live, auth)
    short_lived = token("alice", hours=1 / 3600)
    expires_at = jwt.decode(short_lived, options={"verify_signature": False})["exp"]
    ws = await join(thread_id, short_lived)
    assert await close_code(ws) == 4401
    assert time.time() >= expires_at - 0.1  # closed at the token's own expiry, not before it
    assert live.hub.clients(thread_id) == 0


# ---------------------------------------------------------------- shutdown

@pytest.mark.parametrize("mid_run", [False, True], ids=["idle", "mid_run"])
async def test_sigterm_closes_sockets_with_1001_and_the_server_exits_cleanly(tmp_path, mid_run):
    secret = "shutdown-secret-" + "s" * 64
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")} | {
        "JWT_SECRET_KEY": secret, "ASSISTANTS_FILE": str(tmp_path / "assistants.json"),
        "OFFLINE_TOKEN_DELAY": "0", "PYTHONPATH": str(Path(__file__).parent)}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", "0",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        url = await asyncio.wait_for(bound_url(server.stderr), 20)
        headers = {"Authorization": f"Bearer {JWTSettings(secret=secret).mint('alice')}"}
        async with httpx2.AsyncClient(base_url=url, timeout=10) as http:
            thread_id = (await http.post("/threads", headers=headers)).json()["id"]
        async with connect(f"{url.replace('http', 'ws', 1)}/threads/{thread_id}/ws", additional_headers=headers) as ws:
            assert (await next_frame(ws))["type"] == "thread.joined"
            if mid_run:  # the server is busy streaming a long reply when the signal arrives
                await ws.send(json.dumps({"type": "message", "content": "w " * 1000}))
                await frames_until(ws, "text.delta")
            server.send_signal(signal.SIGTERM)
            assert await close_code(ws) == 1001
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why it stopped.
        assert await asyncio.wait_for(server.wait(), 10) == -signal.SIGTERM
        log = (await server.stderr.read()).decode()
        assert "Application shutdown complete" in log and "Traceback" not in log, log
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


async def bound_url(stderr) -> str:
    while line := (await stderr.readline()).decode():
        if match := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
            return match.group(1)
    raise AssertionError("uvicorn exited before it was listening")
