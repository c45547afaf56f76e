"""The attacks that took the first version down, scaled down to run in seconds, against a real server
started the way the README starts it (`python serve.py`). Each asserts its limit, and that meanwhile
another user is still served: GET /health answers within HEALTH_BOUND and another user's run completes
within RUN_BOUND (generous: the machine runs the rest of the suite too)."""

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import struct
import time

import httpx2
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import TEST_JWT, PeakMemory, ServerProcess, bearer, frames_until, next_frame, sse_stream
from offline_model import OfflineModel, serve_on_loopback

pytestmark = pytest.mark.anyio
HEALTH_BOUND = 1.0  # seconds
RUN_BOUND = 5.0  # seconds, for a reply of some twenty words
RESUME_BOUND = 2.0  # seconds, for a socket and an event stream to resume, one after the other


def rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


class Bystander:
    """Another user, served while the attack goes on: one run and /health in a loop, both timed. Leaving
    the block waits for the run, and for one more /health."""

    def __init__(self, server):
        self.server = server
        self.health_times: list[float] = []
        self.run_time: float | None = None

    async def __aenter__(self):
        self.http = httpx2.AsyncClient(base_url=self.server.url, timeout=30)
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._health())]
        return self

    async def _run(self):
        thread_id = (await self.http.post("/threads", headers=bearer("bystander"))).json()["id"]
        started = time.monotonic()
        answer = await self.http.post(f"/threads/{thread_id}/messages", json={"content": "still there?"},
                                      headers=bearer("bystander"))
        assert answer.status_code == 201, answer.text
        self.run_time = time.monotonic() - started

    async def _health(self):
        while True:
            started = time.monotonic()
            assert (await self.http.get("/health")).status_code == 200
            self.health_times.append(time.monotonic() - started)
            if self.stop.is_set():
                return
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc_info):
        self.stop.set()
        await asyncio.gather(*self.tasks)
        await self.http.aclose()
        assert self.run_time is not None
        assert self.run_time < RUN_BOUND
        assert max(self.health_times) < HEALTH_BOUND


async def raw_connection(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


def raw_websocket(server, path: str, headers: dict, receive_buffer: int | None = None) -> socket.socket:
    """A WebSocket handshake by hand, leaving a plain blocking socket to misbehave on. With a small
    `receive_buffer`, it also asks for a real network's segment size: over loopback's 64 KiB segments the
    server's kernel would buffer megabytes for it before the server itself had to hold anything."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{name}: {value}" for name, value in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


def frame(opcode: int, payload: bytes, claimed_length: int | None = None) -> bytes:
    """A masked client frame; `claimed_length` may claim more than is sent."""
    length = len(payload) if claimed_length is None else claimed_length
    header = bytes([0x80 | opcode])
    if length < 126:
        header += bytes([0x80 | length])
    elif length < 1 << 16:
        header += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return header + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


def close_code_of(sock: socket.socket) -> int | None:
    """Reads until the server's close frame; its code (None if the connection just ended)."""
    sock.settimeout(10)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
        start = data.find(b"\x88")
        if start >= 0 and len(data) >= start + 4:
            return struct.unpack("!H", data[start + 2:start + 4])[0]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def shared(tmp_path_factory):
    """One server for the attacks that do not read its log (each uses users and threads of its own)."""
    server = ServerProcess(tmp_path_factory.mktemp("limits"), {
        "MAX_SOCKETS_PER_USER": "5", "MAX_RUNS_PER_USER": "8", "REQUEST_HEAD_TIMEOUT": "1",
        "BODY_TIMEOUT_SECONDS": "1", "OFFLINE_TOKEN_DELAY": "0.002"}).start()
    try:
        yield await server.ready()
    finally:
        server.stop()


@pytest.fixture
def thread_of_alice():
    async def make(server, owner: str = "alice") -> str:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http:
            return (await http.post("/threads", headers=bearer(owner))).json()["id"]
    return make


# ---------------------------------------------------------------- the attacks

async def test_one_user_cannot_open_more_than_their_sockets(shared, thread_of_alice):
    server = shared
    thread_id = await thread_of_alice(server, "sockets-hog")
    url = f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws"
    accepted, refused = [], 0
    async with Bystander(server):
        for _ in range(60):
            try:
                accepted.append(await connect(url, additional_headers=bearer("sockets-hog"), close_timeout=1))
            except InvalidStatus as error:
                assert error.response.status_code == 429
                refused += 1
    assert (len(accepted), refused) == (5, 55)
    for ws in accepted:
        await ws.close()


async def test_connections_that_send_no_whole_request_head_are_closed(shared):
    server = shared
    connections = [await raw_connection(server) for _ in range(40)]
    for index, (_, writer) in enumerate(connections):
        if index % 2:  # half of them send half a head, then nothing
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
    async with Bystander(server):
        started = time.monotonic()
        for reader, _ in connections:
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed by the server
        assert time.monotonic() - started < 5
    for _, writer in connections:
        writer.close()


async def test_one_user_cannot_queue_runs_across_many_threads(shared):
    server = shared
    memory_before = rss_mib(server.process.pid)
    async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http, Bystander(server):
        threads = [(await http.post("/threads", headers=bearer("mallory"))).json()["id"] for _ in range(60)]
        posts = [http.post(f"/threads/{thread_id}/messages", json={"content": "x" * 30_000},
                           headers=bearer("mallory")) for thread_id in threads]
        answers = await asyncio.gather(*posts)
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(201) <= 8 + 8  # those accepted, plus any accepted once earlier ones had ended
    assert statuses.count(429) >= 60 - 16
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert rss_mib(server.process.pid) - memory_before < 100


async def test_a_ping_flood_without_reading_does_not_grow_memory(servers, thread_of_alice):
    server = await servers()
    thread_id = await thread_of_alice(server)
    sock = await asyncio.to_thread(raw_websocket, server, f"/threads/{thread_id}/ws", bearer("alice"), 4096)
    memory_before = rss_mib(server.process.pid)
    ping = frame(0x9, b"ping")
    sock.setblocking(False)

    def flood(seconds: float) -> int:
        """Pings as fast as the server takes them, never reading; how many bytes went, until dropped."""
        sent, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += sock.send(ping * 256)
            except BlockingIOError:  # the server stopped reading: what it could not send waits for us
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                return sent
        raise AssertionError(f"still connected after {seconds} s of flooding")

    async with Bystander(server):
        sent = await asyncio.to_thread(flood, 10.0)
    assert sent > 0
    assert rss_mib(server.process.pid) - memory_before < 30
    assert "over 100 pings a second: dropped" in server.log()
    sock.close()


async def test_a_frame_far_over_the_limit_is_refused_before_it_is_read(shared, thread_of_alice):
    server = shared
    thread_id = await thread_of_alice(server)
    memory_before = rss_mib(server.process.pid)
    for _ in range(5):
        sock = await asyncio.to_thread(raw_websocket, server, f"/threads/{thread_id}/ws", bearer("alice"))
        sock.sendall(frame(0x1, b"x" * 65536, claimed_length=15 * 1024 * 1024))
        assert await asyncio.to_thread(close_code_of, sock) == 1009
        sock.close()
    assert rss_mib(server.process.pid) - memory_before < 20


async def test_no_token_reaches_the_log(servers, thread_of_alice):
    server = await servers()
    thread_id = await thread_of_alice(server)
    query_token, header_token = TEST_JWT.mint("carol"), TEST_JWT.mint("alice")
    async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get(f"/health?token={query_token}")).status_code == 200
        assert (await http.get(f"/threads?token={query_token}")).status_code == 401  # never taken over HTTP
        assert (await http.get(f"/threads?token={query_token}", headers=bearer("bob"))).status_code == 200
        refused = await http.get("/threads", headers={"Authorization": f"Bearer {query_token}x"})
        assert refused.status_code == 401
    # Both a header and a query token: the header's is used, and neither is logged.
    url = f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws?token={query_token}"
    async with connect(url, additional_headers={"Authorization": f"Bearer {header_token}"}) as ws:
        assert (await next_frame(ws))["type"] == "thread.joined"
    log = server.log()
    assert "GET /threads" in log
    assert query_token not in log
    assert header_token not in log
    assert "eyJ" not in log


async def test_a_client_leaving_mid_body_or_sending_bad_utf8_costs_one_log_line(servers, thread_of_alice):
    server = await servers()
    thread_id = await thread_of_alice(server)
    _, writer = await raw_connection(server)
    token = TEST_JWT.mint("alice")
    writer.write(f"POST /threads/{thread_id}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"content\": ".encode())
    await writer.drain()
    writer.close()
    sock = await asyncio.to_thread(raw_websocket, server, f"/threads/{thread_id}/ws", bearer("alice"))
    sock.sendall(frame(0x1, b'{"type": "message", "content": "\xff\xfe"}'))
    assert await asyncio.to_thread(close_code_of, sock) == 1007
    sock.close()
    async with httpx2.AsyncClient(base_url=server.url) as http:  # the server goes on
        assert (await http.get("/health")).status_code == 200
    log = server.log()
    assert "Traceback" not in log
    assert len(re.findall(r"left before sending its whole body", log)) == 1
    assert len(re.findall(r"not UTF-8: closed with 1007", log)) == 1


async def test_a_body_trickled_in_is_cut_off(shared, thread_of_alice):
    server = shared
    thread_id = await thread_of_alice(server)
    reader, writer = await raw_connection(server)
    writer.write(f"POST /threads/{thread_id}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 f"{TEST_JWT.mint('alice')}\r\nContent-Length: 100\r\n\r\n{{".encode())
    await writer.drain()
    started = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    assert status_line.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 5
    writer.close()


async def test_a_socket_that_never_reads_is_closed_and_others_go_on(shared, thread_of_alice):
    server = shared
    thread_id = await thread_of_alice(server)
    stuck = await asyncio.to_thread(raw_websocket, server, f"/threads/{thread_id}/ws", bearer("alice"), 4096)
    memory_before = rss_mib(server.process.pid)
    async with httpx2.AsyncClient(base_url=server.url, timeout=60) as http:
        ws = await connect(f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws",
                           additional_headers=bearer("alice"), close_timeout=1)
        await next_frame(ws)
        for _ in range(12):  # each run sends the stuck socket about 64 KiB: twice the message
            answer = await http.post(f"/threads/{thread_id}/messages", json={"content": "y" * 32_000},
                                     headers=bearer("alice"))
            assert answer.status_code == 201
            assert (await frames_until(ws, "run.completed"))[-1]["type"] == "run.completed"
    assert await asyncio.to_thread(close_code_of, stuck) == 1013
    assert rss_mib(server.process.pid) - memory_before < 50
    await ws.close()
    stuck.close()



# ---------------------------------------------------------------- long replies, stuck readers, trickled bodies

LONG_DELTA = "x" * 999 + " "  # the offline model cuts a reply into deltas at spaces


class LongReplies(OfflineModel):
    """An upstream whose every reply is `deltas` deltas of 1,000 characters."""

    def __init__(self, deltas: int, token_delay: float = 0):
        super().__init__(token_delay=token_delay)
        self.deltas = deltas

    def reply_text(self, metadata: dict, seen: list[dict]) -> str:
        return LONG_DELTA * self.deltas


@contextlib.asynccontextmanager
async def served_with_upstream(servers, upstream: OfflineModel):
    async with serve_on_loopback(upstream.app) as url:
        yield await servers(env={"OPENAI_BASE_URL": url + "/v1", "OPENAI_API_KEY": "upstream-key"})


async def sse_until_run_ends(http, thread_id: str, sub: str, ready: asyncio.Event) -> list[dict]:
    """A GET /threads/{id}/events listener's events, up to its first run's end or the stream's."""
    events = []
    async with http.stream("GET", f"/threads/{thread_id}/events", headers=bearer(sub)) as response:
        assert response.status_code == 200
        async for event in sse_stream(response):
            if isinstance(event, dict):
                events.append(event)
                ready.set()
                if event["type"] in ("run.completed", "run.failed", "run.cancelled"):
                    break
    return events


def reply_of(frames: list[dict]) -> tuple[str, int, bool]:
    """How the run ended, the length of its deltas joined, and whether they make its final message."""
    end = frames[-1]
    deltas = "".join(frame.get("delta", "") for frame in frames if frame["type"] == "text.delta")
    return end["type"], len(deltas), end["message"]["content"] == deltas


@pytest.mark.parametrize("ending", ["run.completed", "run.cancelled"])
async def test_a_reply_longer_than_a_backlog_reaches_every_client_whole(servers, thread_of_alice, ending):
    """600 deltas of 1,000 characters, or an endless reply cancelled past 700,000: a socket, an event
    stream and the POST that asked for it each get the whole reply, and its end."""
    upstream = LongReplies(600) if ending == "run.completed" else LongReplies(100_000, token_delay=0.002)
    async with served_with_upstream(servers, upstream) as server:
        thread_id = await thread_of_alice(server)
        async with httpx2.AsyncClient(base_url=server.url, timeout=60) as http:
            ws = await connect(f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws",
                               additional_headers=bearer("alice"), max_size=None, close_timeout=1)
            await next_frame(ws)
            listening = asyncio.Event()
            sse = asyncio.create_task(sse_until_run_ends(http, thread_id, "alice", listening))
            await asyncio.wait_for(listening.wait(), 10)
            post = asyncio.create_task(http.post(f"/threads/{thread_id}/messages", json={"content": "a long one"},
                                                 headers=bearer("alice")))
            frames = [await next_frame(ws), await next_frame(ws)]  # message.created, run.started
            streamed, cancelled = 0, False
            while frames[-1]["type"] not in ("run.completed", "run.cancelled"):
                frames.append(await next_frame(ws))
                streamed += len(frames[-1].get("delta", ""))
                if ending == "run.cancelled" and streamed >= 700_000 and not cancelled:
                    cancel = await http.post(f"/threads/{thread_id}/runs/{frames[1]['run_id']}/cancel",
                                             headers=bearer("alice"))
                    assert cancel.status_code == 202
                    cancelled = True
            answer = await post
            await ws.close()
    length = 600_000 if ending == "run.completed" else len(frames[-1]["message"]["content"])
    assert length >= 600_000
    assert reply_of(frames[1:]) == (ending, length, True)
    assert reply_of((await sse)[2:]) == (ending, length, True)  # after thread.joined, message.created
    assert answer.status_code == 201, answer.text
    assert [len(reply["content"]) for reply in answer.json()["replies"]] == [length]


async def test_a_connection_answered_while_its_body_trickles_in_is_closed(shared):
    """No token, a body of 100,000,000 bytes declared and a byte sent now and then: answered 401, then
    closed, however long the client would go on."""
    connections = [await raw_connection(shared) for _ in range(5)]

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"POST /threads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{")
        with contextlib.suppress(ConnectionError):
            while True:
                await writer.drain()
                await asyncio.sleep(0.5)
                writer.write(b" ")

    trickling = [asyncio.create_task(trickle(writer)) for _, writer in connections]
    try:
        started = time.monotonic()
        for reader, _ in connections:
            answer = await asyncio.wait_for(reader.read(), timeout=10)  # to the end: the server closed it
            assert answer.startswith(b"HTTP/1.1 401"), answer
        assert time.monotonic() - started < 5
    finally:
        for task in trickling:
            task.cancel()
        for _, writer in connections:
            writer.close()


async def test_out_of_file_descriptors_the_connections_waiting_are_closed_and_logged_once(servers):
    server = await servers(env={"REQUEST_HEAD_TIMEOUT": "60"}, open_files=100)
    started = time.monotonic()
    connections = [await raw_connection(server) for _ in range(150)]  # the first ones stay, idle
    ended = [asyncio.create_task(reader.read()) for reader, _ in connections]
    await asyncio.wait(ended, timeout=5)
    turned_away = sum(task.done() and task.result() == b"" for task in ended)
    for task in ended:
        task.cancel()
    for _, writer in connections:
        writer.close()

    async def served() -> bool:  # again, once the server has seen some of them close (when, it alone knows)
        with contextlib.suppress(httpx2.TransportError):
            return (await http.get("/health")).status_code == 200
        return False

    async with httpx2.AsyncClient(base_url=server.url, timeout=10) as http:
        deadline = time.monotonic() + 30
        while not await served():
            assert time.monotonic() < deadline, server.log()[-2000:]
            await asyncio.sleep(0.1)
    log = server.log()
    assert turned_away >= 30, log[-2000:]
    reports = log.count("cannot accept connections: [Errno 24] Too many open files")
    assert 1 <= reports <= 1 + (time.monotonic() - started) // 10, log[-2000:]  # once every 10 s, not per attempt
    assert log.count("Too many open files") == reports
    assert "Traceback" not in log


def stuck_event_stream(server, thread_id: str, sub: str) -> socket.socket:
    """GET /threads/{id}/events over a socket that is never read, its buffers kept small (see raw_websocket)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /threads/{thread_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 f"{TEST_JWT.mint(sub)}\r\n\r\n".encode())
    return sock


def closed_by_the_server(sock: socket.socket) -> bool:
    """Reads what is left; True once the server has ended the connection."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


async def test_an_event_stream_that_is_not_read_is_closed_and_gives_its_slot_back(servers, thread_of_alice):
    server = await servers(env={"MAX_SOCKETS_PER_USER": "1", "WRITE_TIMEOUT_SECONDS": "1"})
    thread_id = await thread_of_alice(server, "stuck")
    stuck = await asyncio.to_thread(stuck_event_stream, server, thread_id, "stuck")
    async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http:

        async def another_stream() -> int:
            async with http.stream("GET", f"/threads/{thread_id}/events", headers=bearer("stuck")) as response:
                return response.status_code

        assert await another_stream() == 429  # the stuck one holds the user's one slot
        started = time.monotonic()
        for _ in range(40):  # some 1.3 MB of events that the stuck stream never reads
            answer = await http.post(f"/threads/{thread_id}/messages", json={"content": "z" * 32_000, "run": False},
                                     headers=bearer("stuck"))
            assert answer.status_code == 201
        while await another_stream() != 200:
            assert time.monotonic() - started < 20, "the slot was not given back"
            await asyncio.sleep(0.1)
    assert await asyncio.to_thread(closed_by_the_server, stuck)
    stuck.close()
    assert "Traceback" not in server.log()


async def test_one_user_cannot_store_messages_faster_than_the_message_rate(servers, thread_of_alice):
    """The attack: one token posting messages of 32 KB as fast as it can (2,368 in 12 s, before). At the
    default rate, 60 a minute after a burst of 10, the rest are refused with 429 and Retry-After, over REST
    and over the socket alike; another user is served meanwhile."""
    server = await servers({"MESSAGES_PER_MINUTE": "", "MESSAGE_BURST": ""})  # unset: the defaults
    thread_id = await thread_of_alice(server, "flooder")
    body = {"content": "f" * 32_000, "run": False}
    async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http, Bystander(server):
        started = time.monotonic()
        answers = await asyncio.gather(*(http.post(f"/threads/{thread_id}/messages", json=body,
                                                   headers=bearer("flooder")) for _ in range(60)))
        async with connect(f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws",
                           additional_headers=bearer("flooder")) as ws:
            await next_frame(ws)
            for _ in range(20):  # as many as the REST ones: whatever the second has given back is spent at once
                await ws.send(json.dumps({"type": "message", "content": "and over the socket?"}))
            refusal = await frames_until(ws, "error")
        seconds = time.monotonic() - started
        stored = (await http.get(f"/threads/{thread_id}/messages", params={"limit": 1000},
                                 headers=bearer("flooder"))).json()["data"]
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) == {201, 429}
    assert 10 <= statuses.count(201) <= 10 + seconds + 1  # the burst, then one a second
    assert sum(message["content"] == body["content"] for message in stored) == statuses.count(201)
    for answer in answers:
        if answer.status_code == 429:
            assert "60 messages a minute" in answer.json()["detail"]
            assert 1 <= int(answer.headers["retry-after"]) <= 60
    error = refusal[-1]["error"]
    assert error["code"] == "limit_reached"
    assert 1 <= error["retry_after"] <= 60


# ---------------------------------------------------------------- resume points

async def resumed(server, http, thread_id: str, after: int) -> list[str]:
    """The first two frames a socket, and an event stream, resuming after `after` get (the same for both)."""
    async with connect(f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws?after={after}",
                       additional_headers=bearer("alice"), close_timeout=1) as ws:
        on_the_socket = [(await next_frame(ws))["type"] for _ in range(2)]
    on_the_stream = []
    async with http.stream("GET", f"/threads/{thread_id}/events",
                           headers=bearer("alice") | {"Last-Event-ID": str(after)}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                on_the_stream.append(line.partition(":")[2].strip())
            if len(on_the_stream) == 2:
                break
    assert on_the_stream == on_the_socket
    return on_the_socket


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_a_resume_point_however_far_or_absurd_costs_no_more_than_a_recent_one(servers, thread_of_alice,
                                                                                      request, broker):
    env = {}
    if broker == "redis":
        url, prefix = request.getfixturevalue("redis_url")
        env = {"REDIS_URL": url, "REDIS_PREFIX": prefix}
    server = await servers(env)
    thread_id = await thread_of_alice(server)
    async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http:
        for content in ("one", "two"):
            posted = await http.post(f"/threads/{thread_id}/messages", json={"content": content, "run": False},
                                     headers=bearer("alice"))
            assert posted.status_code == 201
        async with connect(f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws",
                           additional_headers=bearer("alice")) as ws:
            latest = (await next_frame(ws))["seq"]
        assert await resumed(server, http, thread_id, latest - 1) == ["thread.joined", "message.created"]
        # Far behind (a log that long would hold 10 million events), 0, ahead, the largest number accepted.
        with PeakMemory(server.process.pid) as memory:
            for after in (latest - 10_000_000, 0, latest + 1, latest + 10**9, 10**20 - 1):
                started = time.monotonic()
                assert await resumed(server, http, thread_id, after) == ["thread.joined", "resync"], after
                assert time.monotonic() - started < RESUME_BOUND, after
    assert memory.growth < 20
