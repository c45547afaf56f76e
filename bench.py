"""Benchmark: the service against the raw limit of the same uvicorn, over real sockets.

    python bench.py [--quick] [--json PATH] [--plots DIR] [--no-deflate]

Processes on 127.0.0.1: the server under test (`uvicorn main:app`, pinned to one CPU), the bare ASGI app
below that is the raw limit (same CPU, same uvicorn), the model the service streams from, and this one,
which drives real WebSocket clients; the model and the clients share the other CPU. The model is this
file's own: the Responses wire format the offline model speaks, written straight to its sockets, so that
hundreds of runs at once do not make the load generator the bottleneck. It stamps each delta with the
time it leaves ("1795693855.123456 "), so a socket receiving it knows how late it is; the raw app stamps
its frames the same way. Latency runs from the model emitting a delta, through the SDK, engine, broker,
hub and uvicorn, to each socket receiving it (all processes share one clock).

A frame is a `text.delta` frame; the hub may merge a socket's pending deltas, so deltas are counted by
content (words): throughput is delivered deltas per second, from the first emission to the last socket's
last delta. The notes give CPU use as a share of one CPU: the server's, the clients' (this process) and
that of processes outside the bench. On a shared machine, a figure taken while others were busy is noisy.
"""

import argparse
import array
import asyncio
import base64
import json
import os
import re
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx2
import uvicorn
import websockets
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol
from websockets.asyncio.client import connect

from auth import JWTSettings
from broker import encode

REPO = Path(__file__).resolve().parent
SECRET = "bench-secret-" + "b" * 64
UVICORN_OPTIONS = ["--host", "127.0.0.1", "--log-level", "warning", "--backlog", "4096"]
WAIT = 300  # seconds: the bound on every wait
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STAMP = 17  # characters of a delta's time stamp: "1795693855.123456"
FILLER_RUNS, FILLER_WORDS, FILLER_WORD_CHARS = 5, 15, 2000  # ~90 KB to each socket per run (section 4)
MODES = {
    "quick": dict(fanout=(1, 10, 100), deltas=2000, paced=200, pace=0.01, readers=100, idle=200,
                  threads=50, runs_per_thread=2, words_per_run=20, tries=1,
                  capacity=(25, 50, 100, 200, 300, 400), capacity_seconds=5, refine=1, overhead_runs=100, redis=True),
    "full": dict(fanout=(1, 10, 100, 500), deltas=2000, paced=200, pace=0.01, readers=100, idle=1000,
                 threads=200, runs_per_thread=3, words_per_run=20, tries=3,
                 capacity=(25, 50, 75, 100, 150, 200, 300, 400, 500, 600, 800), capacity_seconds=10, refine=2,
                 overhead_runs=300, redis=True),
}
CAPACITY_RATE = 50  # deltas a second per run
CAPACITY_P99_MS = 100
CAPACITY_SPREAD = 1.0  # seconds over which a capacity trial's runs start, as real traffic does (also: all at once)
COALESCE_MS = 5  # the coalescing window the bench tries (section 11)


def words(count: int, chars: int = 0) -> str:
    return " ".join(f"w{index}".ljust(chars, "x") for index in range(count))


def stamped_words(text: str) -> list[str]:
    """A delta's words; each starts with the time it left the model."""
    return text.split()


# ---------------------------------------------------------------- the model, in its own process

def sse_chunk(event_type: str, data: str) -> bytes:
    payload = f"event: {event_type}\ndata: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(payload), payload)  # chunked transfer encoding


RESPONSE = ('{"id":"resp_bench","object":"response","created_at":1700000000,"model":"bench","output":%s,'
            '"parallel_tool_calls":true,"tool_choice":"auto","tools":[],"status":"%s","temperature":1.0,'
            '"top_p":1.0,"error":null,"incomplete_details":null%s}')
ITEM = '{"id":"msg_bench","type":"message","status":"%s","role":"assistant","content":%s}'
USAGE = (',"usage":{"input_tokens":1,"input_tokens_details":{"cached_tokens":0,"cache_write_tokens":0},'
         '"output_tokens":%d,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":%d}')
HEAD = (sse_chunk("response.created", '{"type":"response.created","sequence_number":0,"response":%s}'
                  % (RESPONSE % ("[]", "in_progress", "")))
        + sse_chunk("response.output_item.added", '{"type":"response.output_item.added","sequence_number":1,'
                    '"output_index":0,"item":%s}' % (ITEM % ("in_progress", "[]"))))
DELTA = ('{"type":"response.output_text.delta","sequence_number":%d,"item_id":"msg_bench","output_index":0,'
         '"content_index":0,"delta":"%.6f%s ","logprobs":[]}')


class StreamingModel:
    """A Responses server that replies with as many deltas as the user's message has words (after its
    "[sub] " label), each delta its emission time padded to the word's length. POST /bench/pace?delay=
    sets the seconds between deltas (0: as fast as the socket takes them)."""

    def __init__(self):
        self.delay = 0.0

    async def serve(self, port: int) -> None:
        server = await asyncio.start_server(self.connection, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                target = head.split(" ", 2)[1]
                length = int(re.search(r"(?im)^content-length:\s*(\d+)", head).group(1)) \
                    if "content-length" in head.lower() else 0
                body = await reader.readexactly(length)
                if target.startswith("/bench/pace"):
                    self.delay = float(dict(parse_qsl(urlsplit(target).query))["delay"])
                    writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                else:
                    await self.stream(writer, json.loads(body))
                await writer.drain()
        writer.close()

    async def stream(self, writer: asyncio.StreamWriter, request: dict) -> None:
        text = [item for item in request["input"] if item["role"] == "user"][-1]["content"]
        user_words = text.split("] ", 1)[-1].split()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + HEAD)
        delay = self.delay
        for number, word in enumerate(user_words, 2):
            if delay:
                await asyncio.sleep(delay)
            padding = "x" * max(0, len(word) - STAMP)
            writer.write(sse_chunk("response.output_text.delta", DELTA % (number, time.time(), padding)))
            if not delay:
                await writer.drain()
        item = ITEM % ("completed", '[{"type":"output_text","text":"","annotations":[],"logprobs":[]}]')
        done = RESPONSE % (f"[{item}]", "completed", USAGE % (len(user_words), len(user_words) + 1))
        writer.write(sse_chunk("response.completed", '{"type":"response.completed","sequence_number":%d,'
                                                      '"response":%s}' % (len(user_words) + 2, done)))
        writer.write(b"0\r\n\r\n")


# ---------------------------------------------------------------- the raw limit, a bare ASGI app

RAW_GROUPS: dict[str, list] = {}


async def raw_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await raw_socket(scope, receive, send)
    else:
        await raw_fire(scope, receive, send)


async def raw_socket(scope, receive, send):
    """/ws?group=G: joins the group and ignores whatever the client sends."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    group = RAW_GROUPS.setdefault(dict(parse_qsl(scope["query_string"].decode()))["group"], [])
    group.append(send)
    await send({"type": "websocket.send", "text": encode({"type": "thread.joined", "clients": len(group)})})
    try:
        while (await receive())["type"] != "websocket.disconnect":
            pass
    finally:
        group.remove(send)


async def raw_fire(scope, receive, send):
    """POST /fire?group=&deltas=&delay=: each delta, shaped as the service's text.delta frame and stamped as
    the model stamps its, is sent to every socket of the group in turn, each send awaited."""
    params = dict(parse_qsl(scope["query_string"].decode()))
    sockets, delay = list(RAW_GROUPS.get(params["group"], ())), float(params["delay"])
    ids = {"thread_id": "thread_" + secrets.token_hex(12), "run_id": "run_" + secrets.token_hex(12)}
    for _ in range(int(params["deltas"])):
        if delay:
            await asyncio.sleep(delay)
        frame = {"type": "websocket.send",
                 "text": encode({"type": "text.delta", **ids, "delta": f"{time.time():.6f} "})}
        for send_to_socket in sockets:
            await send_to_socket(frame)
    done = {"type": "websocket.send", "text": encode({"type": "run.completed", **ids})}
    for send_to_socket in sockets:
        await send_to_socket(done)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


# ---------------------------------------------------------------- the service, varied

def service_numbering_only():
    """The service with a broker that numbers nothing and keeps no log: each event goes to the hub as it
    is, with no `seq` in its frame, no resume log and no run-in-progress record (what section 9 takes away)."""
    import broker
    import main

    class NumberingOnly(broker.MemoryBroker):
        def publish(self, thread_id: str, event: dict) -> None:
            log = self._log(thread_id)
            log.seq += 1  # the hub still orders by it; the frame does not carry it
            self._deliver(thread_id, [broker.Event(log.seq, event["type"], event.get("run_id"),
                                                   event.get("delta"), encode(event))])

    main.broker_for = lambda url, window, *settings: NumberingOnly(window)
    return main.create_app()


# ---------------------------------------------------------------- server processes

@dataclass
class Server:
    process: subprocess.Popen
    url: str

    def memory_kib(self, field_name: str) -> int:
        """VmRSS (now) or VmHWM (peak since the last reset_peak) of the server process."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M).group(1))

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def cpu_seconds(self) -> float:
        with suppress(OSError):  # 0 once it has exited
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return 0.0


RUNNING: list[Server] = []


def machine_busy_seconds() -> float:
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS  # all but idle and iowait


class CpuMeter:
    """CPU used during a measurement by the servers under test, by this process (the clients), and by
    every process that is not part of the bench: the machine may be shared, and the figures mean little
    when it is."""

    def __init__(self, *servers: Server):
        self.servers = servers
        self.start = self.sample()

    def sample(self) -> tuple:
        return (time.time(), sum(server.cpu_seconds() for server in self.servers), time.process_time(),
                sum(server.cpu_seconds() for server in RUNNING), machine_busy_seconds())

    def read(self) -> dict:
        wall, server, clients, servers, busy = (end - start for start, end in zip(self.start, self.sample()))
        return {"server_cpu": server / wall, "server_cpu_s": server, "client_cpu": clients / wall,
                "other_cpu": max(0.0, busy - servers - clients) / wall}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_for_port(process: subprocess.Popen, port: int, what: str) -> None:
    async with asyncio.timeout(30):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}")
            with suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.05)


@asynccontextmanager
async def serve(target: str, env: dict, cwd: str, cpu: int | None, factory: bool = False):
    """`uvicorn target` in a subprocess on a free port, pinned to `cpu`; stopped when the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", *(["--factory"] if factory else []), target,
               *UVICORN_OPTIONS, "--port", str(port)]
    process = subprocess.Popen(command, cwd=cwd, env=env | {"PYTHONPATH": str(REPO)})
    try:
        if cpu is not None:
            os.sched_setaffinity(process.pid, {cpu})
        await wait_for_port(process, port, target)
        RUNNING.append(server := Server(process, f"http://127.0.0.1:{port}"))
        yield server
    finally:
        RUNNING[:] = [running for running in RUNNING if running.process is not process]
        stop(process)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@asynccontextmanager
async def serve_model(cpu: int):
    """This file's model in a process of its own: `python bench.py --model-port N`."""
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--model-port", str(port)], cwd=REPO)
    try:
        os.sched_setaffinity(process.pid, {cpu})
        await wait_for_port(process, port, "the model")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@asynccontextmanager
async def private_redis():
    """A Redis of the bench's own, on a free port, keeping nothing on disk."""
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        await wait_for_port(process, port, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)


# ---------------------------------------------------------------- clients

@dataclass
class Reception:
    """What one socket received of one run."""
    frames: int = 0
    deltas: int = 0
    first: float = 0.0  # when the first delta arrived
    first_emitted: float = float("inf")
    last: float = 0.0
    latencies: list[float] = field(default_factory=list)  # one per delta, if kept
    completed: bool = False


async def receive_run(ws, keep_latencies: bool) -> Reception:
    """The frames of one run, up to its run.completed (or run.failed, or the socket closing)."""
    got = Reception()
    with suppress(websockets.ConnectionClosed):
        async for text in ws:
            now = time.time()
            event = json.loads(text)
            if event["type"] == "text.delta":
                stamps = [float(word[:STAMP]) for word in stamped_words(event["delta"])]
                got.frames, got.deltas, got.last = got.frames + 1, got.deltas + len(stamps), now
                got.first = got.first or now
                got.first_emitted = min(got.first_emitted, stamps[0])
                if keep_latencies:
                    got.latencies += [now - stamp for stamp in stamps]
            elif event["type"] in ("run.completed", "run.failed"):
                got.completed = event["type"] == "run.completed"
                break
    return got


async def open_socket(url: str, headers: dict, deflate: bool, sock=None, max_queue: int = 16):
    ws = await connect(url, additional_headers=headers, compression="deflate" if deflate else None,
                       open_timeout=60, close_timeout=2, ping_interval=None, max_size=2**24,
                       max_queue=max_queue, sock=sock)
    await ws.recv()  # thread.joined, always the first frame
    return ws


async def open_stuck_socket(url: str, headers: dict):
    """A socket that will not read: a tiny receive buffer, so the server soon has to hold its frames. It does
    not offer permessage-deflate: the bench's frames compress so well that kernel buffers would hold them all."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Loopback's 64 KiB segments would let the server's kernel buffer megabytes for it: ask for a
    # real network's segment size, and the server's send buffer stays near what it would be there.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", urlsplit(url).port))
    return await open_socket(url, headers, deflate=False, sock=sock, max_queue=1)


async def open_sockets(url: str, count: int, headers: dict, deflate: bool) -> list:
    at_once = asyncio.Semaphore(100)

    async def one():
        async with at_once:
            return await open_socket(url, headers, deflate)

    async with asyncio.timeout(WAIT):
        return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_sockets(sockets) -> None:
    with suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


class Listener(asyncio.Protocol):
    """A WebSocket client that reads only what the capacity runs need, cheaply enough to take hundreds of
    runs' frames on a shared CPU: the handshake, then frames, the delta stamps found without decoding the
    JSON. It never offers permessage-deflate. `send_text` sends a (masked) text frame."""

    def __init__(self, handshake: bytes, latencies: array.array, runs_done: dict):
        self.handshake, self.latencies, self.runs_done = handshake, latencies, runs_done
        self.buffer = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.handshake)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(RuntimeError(bytes(self.buffer[:end]).decode()))
                return
            del self.buffer[:end + 4]
            self.upgraded.set_result(None)
        now, buffer, start = time.time(), self.buffer, 0
        while len(buffer) - start >= 2:
            length, header = buffer[start + 1] & 0x7F, 2
            if length == 126:
                if len(buffer) - start < 4:
                    break
                length, header = int.from_bytes(buffer[start + 2:start + 4], "big"), 4
            elif length == 127:
                if len(buffer) - start < 10:
                    break
                length, header = int.from_bytes(buffer[start + 2:start + 10], "big"), 10
            if len(buffer) - start < header + length:
                break
            payload = bytes(buffer[start + header:start + header + length])
            start += header + length
            if b'"text.delta"' in payload:
                delta = payload[payload.index(b'"delta":"') + 9:payload.rindex(b'"')]
                for stamp in delta.split():
                    self.latencies.append(now - float(stamp[:STAMP]))
            elif b'"run.completed"' in payload or b'"run.failed"' in payload:
                run = re.search(rb'"run_id":"([^"]+)"', payload).group(1)
                self.runs_done[run] = self.runs_done.get(run, 0) + (b'"run.completed"' in payload)
        del buffer[:start]

    def send_text(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        length = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else bytes([0xFE]) + length.to_bytes(2, "big"))
        self.transport.write(header + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload)))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_listener(url: str, headers: dict, latencies: array.array, runs_done: dict) -> Listener:
    parts = urlsplit(url)
    request = (f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
               f"Sec-WebSocket-Version: 13\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    _, listener = await asyncio.get_running_loop().create_connection(
        lambda: Listener(request.encode(), latencies, runs_done), parts.hostname, parts.port)
    await listener.upgraded
    return listener


class ServiceTarget:
    name = "service"

    def __init__(self, server: Server, model_url: str, http: httpx2.AsyncClient, deflate: bool,
                 other_servers: tuple[Server, ...] = ()):
        self.server, self.model_url, self.http, self.deflate = server, model_url, http, deflate
        self.servers = (server, *other_servers)  # sockets are spread over these, round robin
        self.headers = {"Authorization": f"Bearer {JWTSettings(secret=SECRET).mint('bench')}"}

    async def new_thread(self) -> str:
        created = await self.http.post(self.server.url + "/threads", headers=self.headers)
        return created.raise_for_status().json()["id"]

    def socket_url(self, thread: str, index: int = 0) -> str:
        return self.servers[index % len(self.servers)].url.replace("http", "ws", 1) + f"/threads/{thread}/ws"

    async def open(self, count: int, stuck: int = 0) -> list:
        thread = await self.new_thread()
        sockets = []
        for index in range(len(self.servers)):
            share = count // len(self.servers) + (index < count % len(self.servers))
            sockets += await open_sockets(self.socket_url(thread, index), share, self.headers, self.deflate)
        return sockets + [await open_stuck_socket(self.socket_url(thread), self.headers) for _ in range(stuck)]

    async def pace_model(self, delay: float) -> None:
        (await self.http.post(self.model_url + "/bench/pace", params={"delay": delay})).raise_for_status()

    async def run(self, readers: list, deltas: int, delay: float, keep_latencies: bool, word_chars: int = 0):
        await self.pace_model(delay)
        receiving = [asyncio.create_task(receive_run(ws, keep_latencies)) for ws in readers]
        async with asyncio.timeout(WAIT):
            await readers[0].send(json.dumps({"type": "message", "content": words(deltas, word_chars)}))
            return await asyncio.gather(*receiving)

    async def open_listeners(self, runs: int, latencies: array.array, runs_done: dict):
        """`runs` threads with two listeners each; returns a function that starts every run."""
        at_once, posters = asyncio.Semaphore(50), []

        async def thread_with_listeners(index: int):
            async with at_once:
                thread = await self.new_thread()
                pair = [await open_listener(self.socket_url(thread, index + side), self.headers, latencies, runs_done)
                        for side in (0, 1)]
                posters.append(pair[0])
                return pair

        pairs = await asyncio.gather(*(thread_with_listeners(index) for index in range(runs)))
        message = json.dumps({"type": "message", "content": words(CAPACITY_RATE * self.capacity_seconds)})
        starts = [lambda poster=poster: poster.send_text(message) for poster in posters]
        return [listener for pair in pairs for listener in pair], starts


class RawTarget:
    name = "raw"

    def __init__(self, server: Server, http: httpx2.AsyncClient, deflate: bool):
        self.server, self.http, self.deflate = server, http, deflate
        # Hundreds of /fire requests at once (section 7): no cap on connections, or they would wait in turn.
        self.firing = httpx2.AsyncClient(timeout=WAIT, limits=httpx2.Limits(max_connections=None,
                                                                           max_keepalive_connections=None))

    async def open(self, count: int) -> list:
        self.group = secrets.token_hex(8)  # the group of the sockets opened last: `run` fans out to it
        url = self.server.url.replace("http", "ws", 1) + f"/ws?group={self.group}"
        return await open_sockets(url, count, {}, self.deflate)

    async def run(self, readers: list, deltas: int, delay: float, keep_latencies: bool):
        receiving = [asyncio.create_task(receive_run(ws, keep_latencies)) for ws in readers]
        fired = await self.http.post(self.server.url + "/fire",
                                     params={"group": self.group, "deltas": deltas, "delay": delay})
        fired.raise_for_status()
        async with asyncio.timeout(WAIT):
            return await asyncio.gather(*receiving)

    async def open_listeners(self, runs: int, latencies: array.array, runs_done: dict):
        groups, at_once = [secrets.token_hex(8) for _ in range(runs)], asyncio.Semaphore(50)
        base = self.server.url.replace("http", "ws", 1)

        async def listener(group: str):
            async with at_once:
                return await open_listener(f"{base}/ws?group={group}", {}, latencies, runs_done)

        listeners = await asyncio.gather(*(listener(group) for group in groups for _ in (0, 1)))
        params = {"deltas": CAPACITY_RATE * self.capacity_seconds, "delay": 1 / CAPACITY_RATE}
        self.fired: list[asyncio.Task] = []

        def start(group: str) -> None:
            self.fired.append(asyncio.create_task(self.firing.post(self.server.url + "/fire",
                                                                   params=params | {"group": group})))

        return listeners, [lambda group=group: start(group) for group in groups]


# ---------------------------------------------------------------- measurements

def percentile(values, share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def summarize(got: list[Reception], deltas: int) -> dict:
    span = (max(reception.last for reception in got) - min(reception.first_emitted for reception in got)
            if any(reception.deltas for reception in got) else float("nan"))
    latencies = [latency for reception in got for latency in reception.latencies]
    return {"deltas_per_s": sum(r.deltas for r in got) / span, "frames_per_s": sum(r.frames for r in got) / span,
            "completion_s": span, "p50_ms": 1000 * percentile(latencies, 0.5),
            "p99_ms": 1000 * percentile(latencies, 0.99), "latencies": latencies,
            "missing_deltas": deltas * len(got) - sum(r.deltas for r in got),
            "failed_runs": sum(not r.completed for r in got)}


async def quietest(tries: int, measure_once) -> dict:
    """The try, of `tries`, during which other processes on the machine took the least CPU."""
    return min([await measure_once() for _ in range(tries)], key=lambda result: result["other_cpu"])


async def fan_out(target, count: int, deltas: int, delay: float, keep_latencies: bool) -> dict:
    sockets = await target.open(count)
    try:
        meter = CpuMeter(*getattr(target, "servers", (target.server,)))
        got = await target.run(sockets, deltas, delay, keep_latencies)
        return summarize(got, deltas) | meter.read()
    finally:
        await close_sockets(sockets)


async def slow_reader(service: ServiceTarget, readers: int, mode: dict) -> dict:
    """The runs below without and then with a stuck socket, in alternating pairs (two at least); the paced
    runs' latencies are pooled per case, since a p99 of a few milliseconds moves by 20% from one run to the
    next on its own."""
    cases = (("without", False), ("with", True))
    pairs = [{case: await slow_runs(service, readers, mode, stuck) for case, stuck in cases}
             for _ in range(max(2, mode["tries"]))]
    pooled = {}
    for case, _ in cases:
        tries = [pair[case] for pair in pairs]
        latencies = [latency for result in tries for latency in result.pop("latencies")]
        pooled[case] = tries[-1] | {
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
            "completion_s": percentile([result["completion_s"] for result in tries], 0.5),
            "peak_kib": max(result["peak_kib"] for result in tries), "pairs": len(tries),
            "missing_deltas": sum(result["missing_deltas"] for result in tries),
            "other_cpu": max(result["other_cpu"] for result in tries)}
    return pooled


async def slow_runs(service: ServiceTarget, readers: int, mode: dict, stuck: bool) -> dict:
    """To `readers` sockets, with or without one more socket on the thread that never reads: filler runs of
    long words, which fill the stuck socket's kernel and transport buffers so that the hub has to hold its
    frames; then a fast run (the completion time) and a paced run (the readers' latency)."""
    sockets = await service.open(readers, stuck=int(stuck))
    try:
        service.server.reset_peak()
        meter, rss_before = CpuMeter(service.server), service.server.memory_kib("VmRSS")
        for _ in range(FILLER_RUNS):
            await service.run(sockets[:readers], FILLER_WORDS, 0.0, False, word_chars=FILLER_WORD_CHARS)
        fast = summarize(await service.run(sockets[:readers], mode["deltas"], 0.0, False), mode["deltas"])
        paced = summarize(await service.run(sockets[:readers], mode["paced"], mode["pace"], True), mode["paced"])
        result = meter.read() | {
            "completion_s": fast["completion_s"], "missing_deltas": fast["missing_deltas"] + paced["missing_deltas"],
            "latencies": paced["latencies"],
            "rss_before_kib": rss_before, "peak_kib": service.server.memory_kib("VmHWM")}
        if stuck:  # it reads now: were its deltas held and merged, and none lost?
            with suppress(TimeoutError):
                async with asyncio.timeout(30):
                    late = [await receive_run(sockets[-1], keep_latencies=False) for _ in range(FILLER_RUNS + 2)]
                    result |= {"stuck_runs": [(run.deltas, run.frames) for run in late[-2:]],
                               "stuck_close_code": sockets[-1].close_code}
        return result
    finally:
        await close_sockets(sockets)


async def idle_cost(target, count: int) -> dict:
    """Server memory per idle socket, measured after a first round of sockets has warmed the code paths."""
    await close_sockets(await target.open(10))
    before, started = target.server.memory_kib("VmRSS"), time.time()
    sockets = await target.open(count)
    connect_s = time.time() - started
    after = target.server.memory_kib("VmRSS")
    await close_sockets(sockets)
    return {"sockets": count, "kib_per_socket": (after - before) / count, "rss_before_kib": before,
            "rss_after_kib": after, "connect_s": connect_s}


async def many_threads(service: ServiceTarget, threads: int, runs: int, words_per_run: int) -> dict:
    """`threads` threads with 2 sockets each, all at once; on each, one socket posts `runs` messages in turn."""
    pairs = await asyncio.gather(*(service.open(2) for _ in range(threads)))
    await service.pace_model(0.0)
    message = json.dumps({"type": "message", "content": words(words_per_run)})

    async def drive(poster, listener) -> list[float]:
        waits = []
        for _ in range(runs):
            sent = time.time()
            await poster.send(message)
            got = await asyncio.gather(receive_run(poster, False), receive_run(listener, False))
            waits += [reception.first - sent for reception in got if reception.completed]
        return waits

    try:
        meter, started = CpuMeter(service.server), time.time()
        async with asyncio.timeout(WAIT):
            per_thread = await asyncio.gather(*(drive(*pair) for pair in pairs))
        waits = [wait for thread_waits in per_thread for wait in thread_waits]
        wall = time.time() - started
        return {"threads": threads, "runs": threads * runs, "runs_per_s": threads * runs / wall,
                "completed_runs": len(waits) // 2, "ttfd_p50_ms": 1000 * percentile(waits, 0.5),
                "ttfd_p99_ms": 1000 * percentile(waits, 0.99)} | meter.read()
    finally:
        await close_sockets([ws for pair in pairs for ws in pair])


async def capacity_trial(target, runs: int, seconds: int, spread: float) -> dict:
    """`runs` runs on threads of their own, starting evenly over `spread` seconds (0: all at once), each
    streaming CAPACITY_RATE deltas a second for `seconds` to two sockets. Passes when every run completes
    on both and the p99 latency is under CAPACITY_P99_MS."""
    target.capacity_seconds = seconds
    latencies, runs_done = array.array("d"), {}
    if isinstance(target, ServiceTarget):
        await target.pace_model(1 / CAPACITY_RATE)
    listeners, starts = await target.open_listeners(runs, latencies, runs_done)
    try:
        meter, loop = CpuMeter(*getattr(target, "servers", (target.server,))), asyncio.get_running_loop()
        for index, start in enumerate(starts):
            loop.call_later(spread * index / runs, start)
        deadline = time.monotonic() + spread + seconds * 3 + 10
        while sum(done == 2 for done in runs_done.values()) < runs and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        usage = meter.read()
        completed = sum(done == 2 for done in runs_done.values())
        p99 = 1000 * percentile(latencies, 0.99)
        return {"runs": runs, "completed": completed, "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": p99,
                "max_ms": 1000 * max(latencies, default=float("nan")), "deltas": len(latencies),
                "passed": completed == runs and p99 < CAPACITY_P99_MS} | usage
    finally:
        for listener in listeners:
            listener.close()
        for task in getattr(target, "fired", ()):
            task.cancel()


async def capacity(target, name: str, mode: dict, spread: float) -> dict:
    """Trials at growing counts until one fails (twice), then `refine` halvings between the largest count that
    passed and the smallest that failed (to 5 runs at most); the largest count that passed."""
    trials, seconds = [], mode["capacity_seconds"]

    async def trial(runs: int) -> bool:
        for _ in range(2):  # a failed trial is tried again once: on a shared machine one may fail on its own
            result = await capacity_trial(target, runs, seconds, spread)
            progress(f"capacity, {name}, {runs} runs: p99 {result['p99_ms']:.0f} ms, {result['completed']}/{runs} "
                     f"completed, other processes {result['other_cpu']:.0%} CPU")
            if result["passed"]:
                break
            await asyncio.sleep(seconds * 2)  # runs of a failed trial may still stream on the server's CPU
        trials.append(result)
        return result["passed"]

    passed, failed = 0, None
    for runs in mode["capacity"]:
        if not await trial(runs):
            failed = runs
            break
        passed = runs
    for _ in range(mode["refine"] if failed else 0):
        middle = (passed + failed) // 2
        if failed - passed <= 5 or middle in (passed, failed):
            break
        if await trial(middle):
            passed = middle
        else:
            failed = middle
    return {"trials": sorted(trials, key=lambda trial: trial["runs"]), "capacity": passed,
            "limit_reached": failed is not None, "first_failed": failed, "spread_s": spread}


async def per_run_overhead(service: ServiceTarget, runs: int, cpu: int | None) -> dict:
    """Server CPU per run of a 20-delta reply, two sockets, minus what its 20 deltas cost alone (measured on
    a 2,000-delta run to the same two sockets); beside it, what the bare SDK's request for the same reply
    costs (see sdk_request_cost)."""
    await service.pace_model(0.0)
    sdk = await sdk_request_cost(service.model_url, cpu, runs)
    sockets = await service.open(2)
    try:
        await service.run(sockets, 50, 0.0, False)  # warm
        meter = CpuMeter(service.server)
        await service.run(sockets, 2000, 0.0, False)
        per_delta = meter.read()["server_cpu_s"] / 2000
    finally:
        await close_sockets(sockets)
    pairs = await asyncio.gather(*(service.open(2) for _ in range(20)))
    message = json.dumps({"type": "message", "content": words(20)})
    try:
        meter = CpuMeter(service.server)
        for _ in range(runs // len(pairs)):
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*(pair[0].send(message) for pair in pairs))
                await asyncio.gather(*(receive_run(ws, False) for pair in pairs for ws in pair))
        total = meter.read()
        per_run = total["server_cpu_s"] / (runs // len(pairs) * len(pairs))
    finally:
        await close_sockets([ws for pair in pairs for ws in pair])
    return {"per_run_ms": 1000 * per_run, "per_delta_us": 1e6 * per_delta,
            "overhead_ms": 1000 * (per_run - 20 * per_delta), "runs": runs // len(pairs) * len(pairs),
            "sdk_ms": sdk} | total


SDK_REQUESTS = {  # typed arguments, and the request as the service sends it (in the body as it is)
    "typed arguments": lambda history: {"model": "bench", "input": history},
    "extra_body": lambda history: {"extra_body": {"model": "bench", "input": history}},
}


async def sdk_request_cost(model_url: str, cpu: int | None, requests: int) -> dict[str, dict]:
    """What a bare `responses.create(stream=True)`, read to its end, costs in CPU, each way of SDK_REQUESTS:
    in a process of its own on the server's CPU, after a warm-up, so that nothing but the SDK, httpx2 and the
    event loop is counted (`bench.py --sdk-requests N`). Its fixed cost, like the service's overhead, leaves
    its deltas out: from replies of 1 and of 21 deltas, by the same model."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--sdk-requests", str(requests), "--model-url", model_url,
        cwd=REPO, stdout=asyncio.subprocess.PIPE)
    if cpu is not None:
        os.sched_setaffinity(process.pid, {cpu})
    async with asyncio.timeout(WAIT):
        output, _ = await process.communicate()
    return json.loads(output)


async def sdk_requests(model_url: str, requests: int) -> dict[str, dict]:
    import openai

    cost: dict[str, dict] = {}
    async with openai.AsyncOpenAI(api_key="offline", base_url=model_url + "/v1") as client:
        for name, shape in SDK_REQUESTS.items():
            ms = {}
            for deltas in (1, 21):
                request = shape([{"type": "message", "role": "user", "content": "[bench] " + words(deltas)}])

                async def one():
                    async for _ in await client.responses.create(stream=True, **request):
                        pass
                for _ in range(20):
                    await one()
                started = time.process_time()
                for _ in range(requests):
                    await one()
                ms[deltas] = 1000 * (time.process_time() - started) / requests
            per_delta = (ms[21] - ms[1]) / 20
            cost[name] = {"fixed_ms": ms[1] - per_delta, "per_delta_us": 1000 * per_delta, "request_ms": ms[21]}
    return cost


# ---------------------------------------------------------------- the table

def losses(**results: dict) -> str:
    return "".join(f"!! {name}: {result['missing_deltas']} deltas missing, {result['failed_runs']} runs unfinished; "
                   for name, result in results.items() if result["missing_deltas"] or result["failed_runs"])


def cpu_note(*results: dict) -> str:
    """CPU use as a share of one CPU: the server's, the clients', other processes' (service/raw)."""
    def shares(key):
        return "/".join(f"{result[key]:.0%}" for result in results)
    return f"cpu: server {shares('server_cpu')}, clients {shares('client_cpu')}, others {shares('other_cpu')}"


def table_rows(results: dict, mode: dict) -> list[tuple]:
    rows = [("measurement", "sockets", "service", "raw limit", "svc/raw", "notes")]
    for count, pair in results["throughput"].items():
        service, raw = pair["service"], pair["raw"]
        rows.append((f"1 throughput, {mode['deltas']} deltas as fast as possible: deltas/s", count,
                     f"{service['deltas_per_s']:,.0f}", f"{raw['deltas_per_s']:,.0f}",
                     f"{service['deltas_per_s'] / raw['deltas_per_s']:.2f}",
                     f"{losses(service=service, raw=raw)}service frames/s {service['frames_per_s']:,.0f} (~"
                     f"{service['deltas_per_s'] / service['frames_per_s']:.0f} deltas/frame); "
                     f"{cpu_note(service, raw)}"))
    for count, pair in results["latency"].items():
        service, raw = pair["service"], pair["raw"]
        rows.append((f"2 latency, {mode['paced']} deltas at {1 / mode['pace']:.0f}/s: p50 / p99 ms", count,
                     f"{service['p50_ms']:.2f} / {service['p99_ms']:.1f}", f"{raw['p50_ms']:.2f} / {raw['p99_ms']:.1f}",
                     f"{service['p50_ms'] / raw['p50_ms']:.2f} / {service['p99_ms'] / raw['p99_ms']:.2f}",
                     losses(service=service, raw=raw) + cpu_note(service, raw)))
    slow, readers = results["slow_reader"], mode["readers"]
    for case, item in slow.items():
        label = f"4 {readers} readers, {case} a stuck socket"
        stuck = ""
        if "stuck_runs" in item:
            (fast_deltas, fast_frames), (paced_deltas, paced_frames) = item["stuck_runs"]
            stuck = (f"; the stuck socket then read the fast run's {fast_deltas} deltas in {fast_frames} frame(s) "
                     f"and the paced run's {paced_deltas} in {paced_frames}")
        if item.get("stuck_close_code"):
            stuck += f"; it was closed with {item['stuck_close_code']}"
        rows.append((f"{label}: {item['pairs']} x {mode['paced']} deltas at {1 / mode['pace']:.0f}/s, p50 / p99 ms",
                     readers + (case == "with"), f"{item['p50_ms']:.2f} / {item['p99_ms']:.1f}", "", "",
                     f"readers missed {item['missing_deltas']} deltas{stuck}"))
        rows.append((f"{label}: {mode['deltas']} deltas as fast as possible, done in s (median)",
                     readers + (case == "with"), f"{item['completion_s']:.2f}", "", "",
                     cpu_note(item) + " (the last try's runs; others: the most of any try)"))
        rows.append((f"{label}: server peak memory over its runs, MiB", readers + (case == "with"),
                     f"{item['peak_kib'] / 1024:.1f}", "", "",
                     f"RSS before the last try {item['rss_before_kib'] / 1024:.1f} MiB; server CPU for its "
                     f"{FILLER_RUNS} filler, fast and paced runs {item['server_cpu_s']:.2f} s"))
    for compression, pair in results["idle"].items():
        service, raw = pair["service"], pair["raw"]
        rows.append((f"5 idle memory per connected socket, {compression}: KiB", service["sockets"],
                     f"{service['kib_per_socket']:.1f}", f"{raw['kib_per_socket']:.1f}",
                     f"{service['kib_per_socket'] / raw['kib_per_socket']:.2f}",
                     f"the service's own share: {service['kib_per_socket'] - raw['kib_per_socket']:.1f} KiB; "
                     f"service RSS {service['rss_before_kib'] / 1024:.0f} -> {service['rss_after_kib'] / 1024:.0f} "
                     f"MiB, sockets connected in {service['connect_s']:.1f} s"))
    threads = results["threads"]
    label = f"6 {threads['threads']} threads x 2 sockets, {mode['runs_per_thread']} runs each"
    rows.append((f"{label}: runs/s", threads["threads"] * 2, f"{threads['runs_per_s']:.1f}", "", "",
                 f"{threads['completed_runs']}/{threads['runs']} runs completed; {cpu_note(threads)}"))
    rows.append((f"{label}: first delta p50 / p99 ms", threads["threads"] * 2,
                 f"{threads['ttfd_p50_ms']:.0f} / {threads['ttfd_p99_ms']:.0f}", "", "", ""))
    for name, found in results["capacity"].items():
        last = found["trials"][-1]
        best = next((trial for trial in reversed(found["trials"]) if trial["passed"]), None)
        shown = best or last
        note = (f"at {shown['runs']} runs: p50 {shown['p50_ms']:.1f} ms, max {shown['max_ms']:.0f} ms, "
                f"{cpu_note(shown)}; " + ("" if found["limit_reached"] else "the largest count tried; ")
                + (f"at {last['runs']}: {last['completed']}/{last['runs']} completed, p99 {last['p99_ms']:.0f} ms"
                   if found["limit_reached"] else ""))
        schedule = f"starting over {found['spread_s']:g} s" if found["spread_s"] else "starting at once"
        rows.append((f"7 concurrent streaming runs per core ({CAPACITY_RATE} deltas/s, 2 sockets, "
                     f"p99 < {CAPACITY_P99_MS} ms, {schedule}): {name.split(', all at once')[0]}",
                     2 * (best or last)["runs"],
                     f"{found['capacity']}", "", "", note))
    overhead = results["overhead"]
    rows.append(("8 per-run overhead, 20-delta reply to 2 sockets: server CPU ms", 2,
                 f"{overhead['overhead_ms']:.2f}", "", "",
                 f"{overhead['per_run_ms']:.2f} ms a run, of which 20 deltas at {overhead['per_delta_us']:.0f} us; "
                 f"{overhead['runs']} runs; the bare SDK's request for the same reply, in a process of its own "
                 "on the server's CPU: " + ", ".join(
                     f"{sdk['fixed_ms']:.2f} ms fixed + {sdk['per_delta_us']:.0f} us a delta ({way})"
                     for way, sdk in overhead["sdk_ms"].items())))
    for name, pair in results["seq_and_log"].items():
        with_log, without = pair["with"], pair["without"]
        value = (f"{with_log['deltas_per_s']:,.0f}" if name == "throughput"
                 else f"{with_log['p50_ms']:.2f} / {with_log['p99_ms']:.1f}")
        before = (f"{without['deltas_per_s']:,.0f}" if name == "throughput"
                  else f"{without['p50_ms']:.2f} / {without['p99_ms']:.1f}")
        ratio = (f"{with_log['deltas_per_s'] / without['deltas_per_s']:.2f}" if name == "throughput"
                 else f"{with_log['p50_ms'] / without['p50_ms']:.2f} / {with_log['p99_ms'] / without['p99_ms']:.2f}")
        rows.append((f"9 seq and resume log, {name} at 100 sockets (raw limit column: without them)", 100,
                     value, before, ratio, cpu_note(with_log, without)))
    for name, pair in results.get("redis", {}).items():
        one, two = pair["one process"], pair["two processes"]
        if name == "throughput":
            rows.append(("10 through Redis, 100 sockets on two processes vs one (raw limit column): deltas/s", 100,
                         f"{two['deltas_per_s']:,.0f}", f"{one['deltas_per_s']:,.0f}",
                         f"{two['deltas_per_s'] / one['deltas_per_s']:.2f}", cpu_note(two, one)))
        else:
            rows.append(("10 through Redis, 100 sockets on two processes vs one (raw limit column): p50 / p99 ms",
                         100, f"{two['p50_ms']:.2f} / {two['p99_ms']:.1f}",
                         f"{one['p50_ms']:.2f} / {one['p99_ms']:.1f}",
                         f"{two['p50_ms'] / one['p50_ms']:.2f} / {two['p99_ms'] / one['p99_ms']:.2f}",
                         cpu_note(two, one)))
    if "coalescing" in results:
        off, on = results["coalescing"]["off"], results["coalescing"]["on"]
        rows.append((f"11 coalescing window COALESCE_MS={COALESCE_MS}, latency at 100 sockets (raw limit column: "
                     f"without it): p50 / p99 ms", 100, f"{on['p50_ms']:.2f} / {on['p99_ms']:.1f}",
                     f"{off['p50_ms']:.2f} / {off['p99_ms']:.1f}",
                     f"{on['p50_ms'] / off['p50_ms']:.2f} / {on['p99_ms'] / off['p99_ms']:.2f}", cpu_note(on, off)))
    return rows


NOT_MEASURABLE = object()  # a goal's test that this machine cannot decide


def goals(results: dict) -> list[str]:
    """A sentence per goal: met, NOT MET (with what the same run says about why), or not measurable here
    (with the reason); then what the coalescing window does, which is no goal."""
    throughput, latency, slow = results["throughput"][100], results["latency"][100], results["slow_reader"]
    idle, capacity = results["idle"]["deflate offered"], results["capacity"]
    overhead, sdk_ms = results["overhead"], results["overhead"]["sdk_ms"]["extra_body"]["fixed_ms"]

    def runs(name: str) -> str:
        found = capacity[name]
        return f"{found['capacity']}" + ("" if found["limit_reached"] else "+ (the most tried)")

    def at_capacity(name: str) -> str:
        trial = next((trial for trial in capacity[name]["trials"] if trial["runs"] == capacity[name]["first_failed"]),
                     None)
        return "" if trial is None else (f"at {trial['runs']} runs p50 {trial['p50_ms']:.0f} / p99 "
                                         f"{trial['p99_ms']:.0f} ms, server CPU {trial['server_cpu']:.0%}")

    def cpu_needed(name: str, raw_name: str) -> str:
        """What a delta costs the server in the first trial that failed, beside the raw app's trial nearest in
        runs: server CPU seconds per delta the model emitted (each goes to two sockets)."""
        failed = capacity[name]["first_failed"]
        trial = next((trial for trial in capacity[name]["trials"] if trial["runs"] == failed), None)
        if trial is None:
            return ""
        raw = min(capacity[raw_name]["trials"], key=lambda other: abs(other["runs"] - failed))

        def per_delta(of: dict) -> float:
            return 1e6 * of["server_cpu_s"] / max(1, of["deltas"] / 2)
        return (f"; a delta took {per_delta(trial):.0f} us of server CPU there, the raw app's "
                f"{per_delta(raw):.0f} us (at {raw['runs']} runs)")

    checks = [
        ("throughput at 100 sockets >= 0.7 x the raw limit",
         throughput["service"]["deltas_per_s"] / throughput["raw"]["deltas_per_s"],
         lambda ratio: ratio >= 0.7, "{:.2f} x", ""),
        ("p50 latency at 100 sockets <= 2 x the raw limit's",
         latency["service"]["p50_ms"] / latency["raw"]["p50_ms"], lambda ratio: ratio <= 2, "{:.2f} x",
         "see section 2's cpu notes"),
        ("a stuck socket raises the readers' p99 by < 20% (a drop is noise: see the cpu notes)",
         slow["with"]["p99_ms"] / slow["without"]["p99_ms"] - 1, lambda change: change < 0.2, "{:+.1%}",
         "see section 4's cpu notes: a p99 of a few ms moves by 20% on its own on a shared machine"),
        ("< 64 KiB server memory per idle socket (clients offering permessage-deflate, as browsers do)",
         idle["service"]["kib_per_socket"], lambda kib: kib < 64, "{:.1f} KiB",
         f"uvicorn's own, the raw app's: {idle['raw']['kib_per_socket']:.1f} KiB"),
        ("the service's own share of an idle socket's memory (above the raw app's) < 8 KiB",
         idle["service"]["kib_per_socket"] - idle["raw"]["kib_per_socket"], lambda kib: kib < 8, "{:.1f} KiB",
         "the socket's listener and slot, Starlette's WebSocket and its scope, the endpoint's suspended frames"),
        (f"concurrent streaming runs per core, starting over {CAPACITY_SPREAD:g} s, >= the raw app's",
         capacity["service"]["capacity"] / max(1, capacity["raw"]["capacity"]), lambda ratio: ratio >= 1,
         "{:.2f} x", f"{runs('service')} against the raw app's {runs('raw')}; {at_capacity('service')}"
         f"{cpu_needed('service', 'raw')}"),
        ("concurrent streaming runs per core, all starting at once, >= 0.5 x the raw app's",
         capacity["service, all at once"]["capacity"] / max(1, capacity["raw, all at once"]["capacity"]),
         lambda ratio: ratio >= 0.5, "{:.2f} x",
         f"{runs('service, all at once')} against the raw app's {runs('raw, all at once')}; every run's fixed "
         f"cost ({overhead['overhead_ms']:.1f} ms) comes before anyone's first delta; "
         f"{at_capacity('service, all at once')}{cpu_needed('service, all at once', 'raw, all at once')}"),
        ("per-run overhead <= 2 x the bare SDK's streaming request (its fixed cost, as the service sends it)",
         overhead["overhead_ms"] / sdk_ms, lambda ratio: ratio <= 2, "{:.2f} x",
         f"{overhead['overhead_ms']:.2f} ms against the SDK's {sdk_ms:.2f} ms: the rest is the service's own, "
         f"its store round trips, events and fan-out of the run's frames"),
        ("per-run overhead (a 20-delta reply, minus its deltas) < 3 ms of server CPU",
         overhead["overhead_ms"], lambda ms: ms < 3, "{:.2f} ms",
         f"the bare SDK request alone takes {sdk_ms:.2f} ms of it"),
    ]
    if "redis" in results:
        through = capacity["service through Redis"]["capacity"]
        checks.append(("through Redis, concurrent streaming runs per core >= 0.8 x one process's without it",
                       through / max(1, capacity["service"]["capacity"]), lambda ratio: ratio >= 0.8, "{:.2f} x",
                       f"{runs('service through Redis')} against {runs('service')}: each event waits for a "
                       f"Redis round trip before it is delivered"))
        one = results["redis"]["latency"]["one process"]
        checks.append(("through Redis, p50 at 100 sockets within 1.5 x one process's without it",
                       one["p50_ms"] / latency["service"]["p50_ms"], lambda ratio: ratio <= 1.5, "{:.2f} x",
                       f"{one['p50_ms']:.2f} ms against {latency['service']['p50_ms']:.2f} ms"))
        one, two = results["redis"]["throughput"]["one process"], results["redis"]["throughput"]["two processes"]
        checks.append(("through Redis, a second process adds throughput rather than taking it away",
                       two["deltas_per_s"] / one["deltas_per_s"], lambda ratio: NOT_MEASURABLE, "{:.2f} x",
                       f"the second process needs a CPU of its own; here it shares the clients' "
                       f"({os.cpu_count()} CPUs)"))
    lines = []
    for text, value, test, shape, why in checks:
        verdict = test(value)
        lines.append(f"goal: {text}: {shape.format(value)} -> " + (
            f"not measurable here ({why})" if verdict is NOT_MEASURABLE else
            "met" if verdict else f"NOT MET{f' ({why})' if why else ''}"))
    if "coalescing" in results:
        off, on = results["coalescing"]["off"], results["coalescing"]["on"]
        name = f"service, COALESCE_MS={COALESCE_MS}"
        lines.append(f"coalescing window of {COALESCE_MS} ms (no goal): concurrent streaming runs per core "
                     f"{runs(name)} against {runs('service')} without it; latency at 100 sockets p50 "
                     f"{on['p50_ms'] - off['p50_ms']:+.2f} ms, p99 {on['p99_ms'] - off['p99_ms']:+.1f} ms")
    return lines


def report(results: dict, mode: dict, header: list[str]) -> str:
    rows = table_rows(results, mode)
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) if column in (0, 5) else str(cell).rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    return "\n".join(header + [""] + lines + [""] + goals(results))


# ---------------------------------------------------------------- plots

def svg_plot(title: str, x_label: str, y_label: str, series: dict[str, list[tuple[float, float]]],
             log_x: bool = False, log_y: bool = False, line: float | None = None) -> str:
    """A line chart as SVG, by hand: no plotting library for one picture."""
    import math

    width, height, left, bottom, top, right = 640, 360, 64, 48, 36, 150
    points = [point for values in series.values() for point in values]
    x_of = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    y_of = (lambda y: math.log10(max(y, 0.1))) if log_y else (lambda y: y)
    xs, ys = [x_of(x) for x, _ in points], [y_of(y) for _, y in points] + ([y_of(line)] if line else [])
    x_min, x_max = min(xs), max(xs)
    y_min, y_max = (math.floor(min(ys)), math.ceil(max(ys))) if log_y else (0, max(ys) * 1.1 or 1)

    def to_svg(x, y):
        return (left + (x_of(x) - x_min) / ((x_max - x_min) or 1) * (width - left - right),
                height - bottom - (y_of(y) - y_min) / ((y_max - y_min) or 1) * (height - top - bottom))

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="20" font-size="14">{title}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">{x_label}</text>',
             f'<text x="14" y="{(top + height - bottom) / 2}" transform="rotate(-90 14 {(top + height - bottom) / 2})" '
             f'text-anchor="middle">{y_label}</text>']
    for x in sorted({x for x, _ in points}):
        sx, _ = to_svg(x, 0)
        parts.append(f'<text x="{sx}" y="{height - bottom + 16}" text-anchor="middle">{x:g}</text>')
    ticks = ([10 ** power for power in range(int(y_min), int(y_max) + 1)] if log_y
             else [y_max * step / 4 for step in range(5)])
    for y in ticks:
        _, sy = to_svg(points[0][0], y)
        parts.append(f'<text x="{left - 6}" y="{sy + 4}" text-anchor="end">{y:g}</text>')
        parts.append(f'<line x1="{left}" y1="{sy}" x2="{width - right}" y2="{sy}" stroke="#ddd"/>')
    if line:
        _, sy = to_svg(points[0][0], line)
        parts.append(f'<line x1="{left}" y1="{sy}" x2="{width - right}" y2="{sy}" stroke="#999" stroke-dasharray="4"/>')
    for index, (name, values) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        path = " ".join(f"{sx:.1f},{sy:.1f}" for sx, sy in (to_svg(x, y) for x, y in values))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for sx, sy in (to_svg(x, y) for x, y in values):
            parts.append(f'<circle cx="{sx:.1f}" cy="{sy:.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{width - right + 10}" y="{top + 16 + index * 18}" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_plots(results: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    latency = {int(count): value for count, value in results["latency"].items()}  # JSON keys are text
    counts = sorted(latency)
    latency_series = {f"{target} {kind}": [(count, latency[count][target][f"{kind}_ms"]) for count in counts]
                      for target in ("service", "raw") for kind in ("p50", "p99")}
    capacity_series = {name: [(trial["runs"], trial["p99_ms"]) for trial in found["trials"]]
                       for name, found in results["capacity"].items()}
    written = []
    for name, svg in (("bench-latency.svg", svg_plot("Delta latency against sockets on one thread", "sockets",
                                                      "ms (log)", latency_series, log_x=True, log_y=True)),
                      ("bench-capacity.svg", svg_plot(
                          f"p99 latency against concurrent runs ({CAPACITY_RATE} deltas/s each, 2 sockets)",
                          "concurrent runs", "p99 ms", capacity_series, line=CAPACITY_P99_MS))):
        (directory / name).write_text(svg)
        written.append(directory / name)
    return written


# ---------------------------------------------------------------- main

async def bench(mode: dict, deflate: bool) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpus = (cpus[-1], set(cpus[:-1])) if len(cpus) > 1 else (None, set(cpus))
    os.sched_setaffinity(0, client_cpus)
    tries, results = mode["tries"], {"throughput": {}, "latency": {}, "idle": {}, "capacity": {}, "seq_and_log": {}}
    clean_env = {key: value for key, value in os.environ.items()
                 if not key.startswith(("JWT_", "OPENAI_", "DATABASE_", "REDIS_"))}
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        def service_env(model_url: str, name: str, **more) -> dict:
            return clean_env | {"JWT_SECRET_KEY": SECRET, "ASSISTANTS_FILE": f"{workdir}/none.json",
                                "DATABASE_URL": f"sqlite:///{workdir}/{name}.db", "OPENAI_API_KEY": "offline",
                                "OPENAI_BASE_URL": f"{model_url}/v1", "MAX_SOCKETS_PER_USER": "100000",
                                "MAX_RUNS_PER_USER": "100000", "MAX_THREADS_PER_USER": "100000",
                                "MESSAGES_PER_MINUTE": "100000000", "MESSAGE_BURST": "100000"} | more

        @asynccontextmanager
        async def servers(deflate: bool, target: str = "main:app", factory: bool = False, **more: str):
            async with (serve_model(min(client_cpus)) as model_url,
                        serve(target, service_env(model_url, secrets.token_hex(4), **more), workdir, server_cpu,
                              factory) as server,
                        serve("bench:raw_app", clean_env, workdir, server_cpu) as raw_server,
                        httpx2.AsyncClient(timeout=WAIT) as http):
                yield ServiceTarget(server, model_url, http, deflate), RawTarget(raw_server, http, deflate)

        async with servers(deflate) as (service, raw):
            for target in (service, raw):  # warm-up: imports, connection pools, code paths
                await fan_out(target, 2, 50, 0.0, keep_latencies=False)
            for count in mode["fanout"]:
                results["throughput"][count] = {target.name: await quietest(
                    tries, lambda: fan_out(target, count, mode["deltas"], 0.0, False)) for target in (service, raw)}
                progress(f"throughput, {count} sockets")
            for count in mode["fanout"]:
                results["latency"][count] = {target.name: await quietest(
                    tries, lambda: fan_out(target, count, mode["paced"], mode["pace"], True))
                    for target in (service, raw)}
                progress(f"latency, {count} sockets")
            results["slow_reader"] = await slow_reader(service, mode["readers"], mode)
            progress("slow reader")
            results["threads"] = await many_threads(service, mode["threads"], mode["runs_per_thread"],
                                                    mode["words_per_run"])
            progress("many threads")
            results["overhead"] = await per_run_overhead(service, mode["overhead_runs"], server_cpu)
            progress("per-run overhead")
            for spread, schedule in ((CAPACITY_SPREAD, ""), (0.0, ", all at once")):
                for target in (service, raw):
                    results["capacity"][target.name + schedule] = await capacity(
                        target, target.name + schedule, mode, spread)
        pick = lambda result: {key: value for key, value in result.items() if key != "latencies"}
        async with (servers(deflate, "bench:service_numbering_only", factory=True) as (without_log, _),
                    servers(deflate) as (with_log, _),
                    servers(deflate, COALESCE_MS=str(COALESCE_MS)) as (coalescing, _)):
            for target in (with_log, without_log, coalescing):
                await fan_out(target, 2, 50, 0.0, keep_latencies=False)
            results["seq_and_log"]["throughput"] = {
                case: pick(await quietest(tries, lambda: fan_out(target, 100, mode["deltas"], 0.0, False)))
                for case, target in (("with", with_log), ("without", without_log))}
            results["seq_and_log"]["latency"] = {
                case: pick(await quietest(tries, lambda: fan_out(target, 100, mode["paced"], mode["pace"], True)))
                for case, target in (("with", with_log), ("without", without_log))}
            progress("seq and resume log")
            results["coalescing"] = {
                case: pick(await quietest(tries, lambda: fan_out(target, 100, mode["paced"], mode["pace"], True)))
                for case, target in (("off", with_log), ("on", coalescing))}
            name = f"service, COALESCE_MS={COALESCE_MS}"
            results["capacity"][name] = await capacity(coalescing, name, mode, CAPACITY_SPREAD)
        progress("coalescing window")
        for compression, offered in (("deflate offered", True), ("no deflate", False)):
            # Fresh servers: memory that earlier runs freed would otherwise hide the sockets' cost.
            async with servers(offered) as (service, raw):
                results["idle"][compression] = {target.name: await idle_cost(target, mode["idle"])
                                                for target in (service, raw)}
            progress(f"idle sockets, {compression}")
        if mode["redis"] and subprocess.run(["which", "redis-server"], capture_output=True).returncode == 0:
            results["redis"] = await through_redis(mode, deflate, service_env, workdir, server_cpu, client_cpus)
    results["cpus"] = {"server": server_cpu, "clients": sorted(client_cpus)}
    for values in results["latency"].values():
        for result in values.values():
            result.pop("latencies", None)
    for values in results["throughput"].values():
        for result in values.values():
            result.pop("latencies", None)
    return results


async def through_redis(mode, deflate, service_env, workdir, server_cpu, client_cpus) -> dict:
    """Fan-out at 100 sockets over two processes sharing one Redis, beside one process with the same Redis
    (the runner's process pinned to the server CPU, the second one to the clients' CPU: this machine has two);
    then the capacity of one process through Redis."""
    results = {"throughput": {}, "latency": {}}
    async with private_redis() as redis_url, serve_model(min(client_cpus)) as model_url, \
            httpx2.AsyncClient(timeout=WAIT) as http:
        env = service_env(model_url, "redis", REDIS_URL=redis_url)
        async with serve("main:app", env, workdir, server_cpu) as first, \
                serve("main:app", env, workdir, min(client_cpus)) as second:
            one = ServiceTarget(first, model_url, http, deflate)
            two = ServiceTarget(first, model_url, http, deflate, other_servers=(second,))
            for target in (one, two):
                await fan_out(target, 2, 50, 0.0, keep_latencies=False)
            pick = lambda result: {key: value for key, value in result.items() if key != "latencies"}
            results["throughput"] = {
                name: pick(await quietest(mode["tries"], lambda: fan_out(target, 100, mode["deltas"], 0.0, False)))
                for name, target in (("one process", one), ("two processes", two))}
            results["latency"] = {
                name: pick(await quietest(mode["tries"], lambda: fan_out(target, 100, mode["paced"], mode["pace"],
                                                                        True)))
                for name, target in (("one process", one), ("two processes", two))}
            progress("through Redis: fan-out")
            results["capacity"] = await capacity(one, "service through Redis", mode, CAPACITY_SPREAD)
    return results


def progress(step: str) -> None:
    print(f"  ... {step}: done", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and tries")
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--plots", metavar="DIR", help="also draw the latency and capacity plots (SVG) there")
    parser.add_argument("--no-deflate", action="store_true",
                        help="clients do not offer permessage-deflate (sections 1-4, 6, 8-10)")
    parser.add_argument("--plots-from", metavar="JSON", help="only draw the plots, from results saved by --json")
    parser.add_argument("--model-port", type=int, help=argparse.SUPPRESS)  # runs the model (see serve_model)
    parser.add_argument("--sdk-requests", type=int, help=argparse.SUPPRESS)  # see sdk_request_cost
    parser.add_argument("--model-url", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.model_port:
        return asyncio.run(StreamingModel().serve(options.model_port))
    if options.sdk_requests:
        return print(json.dumps(asyncio.run(sdk_requests(options.model_url, options.sdk_requests))))
    if options.plots_from:
        for path in write_plots(json.loads(Path(options.plots_from).read_text()), Path(options.plots or "docs")):
            print(f"plot: {path}")
        return None
    mode_name = "quick" if options.quick else "full"
    mode = MODES[mode_name]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers: 1 fd a socket each side
    started, busy_before = time.time(), machine_busy_seconds()
    results = asyncio.run(bench(mode, deflate=not options.no_deflate))
    if "redis" in results:
        results["capacity"]["service through Redis"] = results["redis"].pop("capacity")
    wall = time.time() - started
    ours = sum(getattr(resource.getrusage(who), part) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for part in ("ru_utime", "ru_stime"))
    others = max(0.0, machine_busy_seconds() - busy_before - ours) / wall
    tries = f"best of {mode['tries']} tries (least CPU used by other processes)" if mode["tries"] > 1 else "one try"
    header = [
        f"Gainz benchmark, {mode_name} mode, {wall:.0f} s. Machine: {os.cpu_count()} CPUs; server "
        f"pinned to CPU {results['cpus']['server']}, clients and model to {results['cpus']['clients']}; "
        f"other processes used {others:.2f} CPUs on average{' (figures are noisy)' if others > 0.1 else ''}.",
        f"Python {sys.version.split()[0]}, uvicorn {uvicorn.__version__} {' '.join(UVICORN_OPTIONS)} "
        f"({AutoHTTPProtocol.__name__}, {AutoWebSocketsProtocol.__name__}), websockets {websockets.__version__} "
        f"clients (permessage-deflate {'not offered' if options.no_deflate else 'offered'}; section 7's clients "
        f"never offer it), fd limit {hard}; {tries} per figure; section 4: {max(2, mode['tries'])} pairs of tries, "
        f"latencies pooled; section 7: {mode['capacity_seconds']} s runs.",
        "Counted: text.delta frames; deltas by content (the hub merges a lagging socket's pending deltas). "
        "Latency: the model emitting a delta -> a socket receiving it.",
    ]
    if options.json:  # first: the figures are kept even if the report cannot be made of them
        Path(options.json).write_text(json.dumps(results | {"mode": mode_name, "header": header}, indent=2,
                                                 default=str))
    print(report(results, mode, header))
    if options.plots:
        for path in write_plots(results, Path(options.plots)):
            print(f"plot: {path}")


if __name__ == "__main__":
    main()
