"""Fan-out benchmark: the service against the raw limit of the same uvicorn, over real sockets.

    python bench.py [--quick] [--json PATH] [--no-deflate]

Three processes on 127.0.0.1: the server under test (`uvicorn main:app`, or the bare ASGI app below
that is the raw limit), the offline model the service streams from, and this one, which drives real
WebSocket clients. The model runs in a process of its own (the service reaches it through
OPENAI_BASE_URL, as it would reach OpenAI) so that its CPU is not charged to the service, and so that it
can note the wall-clock time at which it emits each delta: latency is measured from the model emitting
a delta to each socket receiving it, through the SDK, engine, hub and uvicorn (the processes share one
clock). With two cores the server gets one to itself; the clients and the model share the other.

The model replies with the user's own words "w0 w1 ...", one delta per word. A frame is a `text.delta`
frame; the hub may merge a socket's pending deltas, so deltas are counted by content (words) and
throughput is delivered deltas per second, from the first emission to the last socket's last delta. At
full speed the engine hands the hub every delta of one upstream read before any writer runs, so the
service sends ~200 deltas a frame there, while the raw limit sends one frame per delta, each send awaited
in turn (the least work per frame; it would stall on a slow socket, which the hub must not).

The notes give CPU use as a share of one CPU: the server's, the clients' (this process) and that of
processes outside the bench. On a shared machine, a figure taken while others were busy is noisy.
"""

import argparse
import asyncio
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
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol
from websockets.asyncio.client import connect

from auth import JWTSettings
from hub import encode
from offline_model import OfflineModel, item_text, tokens

REPO = Path(__file__).resolve().parent
SECRET = "bench-secret-" + "b" * 64
UVICORN_OPTIONS = ["--host", "127.0.0.1", "--log-level", "warning", "--backlog", "2048"]
WAIT = 180  # seconds: the bound on every wait
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FILLER_RUNS, FILLER_WORDS, FILLER_WORD_CHARS = 5, 15, 2000  # ~90 KB to each socket per run (section 4)
MODES = {
    "quick": dict(fanout=(1, 10, 100), deltas=2000, paced=200, pace=0.01, readers=100, idle=200,
                  threads=50, runs_per_thread=2, words_per_run=20, tries=1),
    "full": dict(fanout=(1, 10, 100, 500), deltas=2000, paced=200, pace=0.01, readers=100, idle=1000,
                 threads=200, runs_per_thread=3, words_per_run=20, tries=3),
}


def words(count: int, chars: int = 0) -> str:
    return " ".join(f"w{index}".ljust(chars, "x") for index in range(count))


# ---------------------------------------------------------------- the model, in its own process

class TimedModel(OfflineModel):
    """The offline model, replying with the user's words verbatim and noting when each delta leaves."""

    def __init__(self):
        self.emitted: list[float] = []
        super().__init__(token_delay=0.0)
        self.app.router.routes += [Route("/bench/reset", self.reset, methods=["POST"]),
                                   Route("/bench/emitted", self.emitted_times)]

    # OfflineModel counts each delta just before it yields it: that is the moment of emission.
    @property
    def deltas_sent(self) -> int:
        return self._deltas_sent

    @deltas_sent.setter
    def deltas_sent(self, value: int) -> None:
        self._deltas_sent = value
        if value:
            self.emitted.append(time.time())

    @staticmethod
    def reply_text(metadata: dict, seen: list[dict]) -> str:
        user_texts = [item_text(item) for item in seen if item.get("role") == "user"]
        return user_texts[-1] if user_texts else "nothing"

    async def reset(self, request):
        self.token_delay, self.emitted = float(request.query_params["delay"]), []
        return Response(status_code=204)

    async def emitted_times(self, request):
        return JSONResponse(self.emitted)


def make_model_app():
    return TimedModel().app


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
    """POST /fire?group=&deltas=&delay=: each delta, shaped as the service's text.delta frame, is sent to
    every socket of the group in turn, each send awaited; answers the emission times when done."""
    params = dict(parse_qsl(scope["query_string"].decode()))
    sockets, delay = list(RAW_GROUPS.get(params["group"], ())), float(params["delay"])
    ids = {"thread_id": "conv_" + secrets.token_hex(12), "run_id": "run_" + secrets.token_hex(12)}
    emitted = []
    for delta in tokens(words(int(params["deltas"]))):
        if delay:
            await asyncio.sleep(delay)
        emitted.append(time.time())
        frame = {"type": "websocket.send", "text": encode({"type": "text.delta", **ids, "delta": delta})}
        for send_to_socket in sockets:
            await send_to_socket(frame)
    done = {"type": "websocket.send", "text": encode({"type": "run.completed", **ids})}
    for send_to_socket in sockets:
        await send_to_socket(done)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(emitted).encode()})


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
    """CPU used during a measurement by the server, by this process (the clients), and by every process
    that is not part of the bench: the machine may be shared, and the figures mean little when it is."""

    def __init__(self, server: Server):
        self.server = server
        self.start = self.sample()

    def sample(self) -> tuple:
        return (time.time(), self.server.cpu_seconds(), time.process_time(),
                sum(server.cpu_seconds() for server in RUNNING), machine_busy_seconds())

    def read(self) -> dict:
        wall, server, clients, servers, busy = (end - start for start, end in zip(self.start, self.sample()))
        return {"server_cpu": server / wall, "server_cpu_s": server, "client_cpu": clients / wall,
                "other_cpu": max(0.0, busy - servers - clients) / wall}


@asynccontextmanager
async def serve(target: str, env: dict, cwd: str, cpu: int | None, factory: bool = False):
    """`uvicorn target` in a subprocess on a free port, pinned to `cpu`; stopped when the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", *(["--factory"] if factory else []), target,
               *UVICORN_OPTIONS, "--port", str(port)]
    process = subprocess.Popen(command, cwd=cwd, env=env | {"PYTHONPATH": str(REPO)})
    try:
        if cpu is not None:
            os.sched_setaffinity(process.pid, {cpu})
        async with asyncio.timeout(30):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{target} exited with {process.returncode}")
                with suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        RUNNING.append(server := Server(process, f"http://127.0.0.1:{port}"))
        yield server
    finally:
        RUNNING[:] = [running for running in RUNNING if running.process is not process]
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- clients

@dataclass
class Reception:
    """What one socket received of one run."""
    frames: int = 0
    deltas: int = 0
    first: float = 0.0
    last: float = 0.0
    times: list[float] = field(default_factory=list)  # when each delta arrived, if kept
    completed: bool = False


async def receive_run(ws, keep_times: bool) -> Reception:
    """The frames of one run, up to its run.completed (or run.failed, or the socket closing)."""
    got = Reception()
    with suppress(websockets.ConnectionClosed):
        async for text in ws:
            now = time.time()
            event = json.loads(text)
            if event["type"] == "text.delta":
                count = len(event["delta"].split())
                got.frames, got.deltas, got.last = got.frames + 1, got.deltas + count, now
                got.first = got.first or now
                if keep_times:
                    got.times += [now] * count
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


class ServiceTarget:
    name = "service"

    def __init__(self, server: Server, model_url: str, http: httpx2.AsyncClient, deflate: bool):
        self.server, self.model_url, self.http, self.deflate = server, model_url, http, deflate
        self.headers = {"Authorization": f"Bearer {JWTSettings(secret=SECRET).mint('bench')}"}

    async def open(self, count: int, stuck: int = 0) -> list:
        created = await self.http.post(self.server.url + "/threads", headers=self.headers)
        thread = created.raise_for_status().json()["id"]
        url = self.server.url.replace("http", "ws", 1) + f"/threads/{thread}/ws"
        sockets = await open_sockets(url, count, self.headers, self.deflate)
        return sockets + [await open_stuck_socket(url, self.headers) for _ in range(stuck)]

    async def pace_model(self, delay: float) -> None:
        (await self.http.post(self.model_url + "/bench/reset", params={"delay": delay})).raise_for_status()

    async def run(self, readers: list, deltas: int, delay: float, keep_times: bool, word_chars: int = 0):
        await self.pace_model(delay)
        receiving = [asyncio.create_task(receive_run(ws, keep_times)) for ws in readers]
        async with asyncio.timeout(WAIT):
            await readers[0].send(json.dumps({"type": "message", "content": words(deltas, word_chars)}))
            got = await asyncio.gather(*receiving)
        return got, (await self.http.get(self.model_url + "/bench/emitted")).json()


class RawTarget:
    name = "raw"

    def __init__(self, server: Server, http: httpx2.AsyncClient, deflate: bool):
        self.server, self.http, self.deflate = server, http, deflate

    async def open(self, count: int) -> list:
        self.group = secrets.token_hex(8)  # the group of the sockets opened last: `run` fans out to it
        url = self.server.url.replace("http", "ws", 1) + f"/ws?group={self.group}"
        return await open_sockets(url, count, {}, self.deflate)

    async def run(self, readers: list, deltas: int, delay: float, keep_times: bool):
        receiving = [asyncio.create_task(receive_run(ws, keep_times)) for ws in readers]
        fired = await self.http.post(self.server.url + "/fire",
                                     params={"group": self.group, "deltas": deltas, "delay": delay})
        async with asyncio.timeout(WAIT):
            got = await asyncio.gather(*receiving)
        return got, fired.raise_for_status().json()


# ---------------------------------------------------------------- measurements

def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def delays(got: list[Reception], emitted: list[float]) -> list[float]:
    """From the emission of each delta to its arrival at each socket (where arrival times were kept)."""
    return [arrived - sent for reception in got for arrived, sent in zip(reception.times, emitted)]


def summarize(got: list[Reception], emitted: list[float], deltas: int) -> dict:
    if len(emitted) != deltas:
        raise RuntimeError(f"the emitter sent {len(emitted)} deltas, not {deltas}: another run overlapped")
    span = max(reception.last for reception in got) - emitted[0]
    latencies = delays(got, emitted)
    return {"deltas_per_s": sum(r.deltas for r in got) / span, "frames_per_s": sum(r.frames for r in got) / span,
            "completion_s": span, "p50_ms": 1000 * percentile(latencies, 0.5),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "missing_deltas": deltas * len(got) - sum(r.deltas for r in got),
            "failed_runs": sum(not r.completed for r in got)}


async def quietest(tries: int, measure_once) -> dict:
    """The try, of `tries`, during which other processes on the machine took the least CPU."""
    return min([await measure_once() for _ in range(tries)], key=lambda result: result["other_cpu"])


async def fan_out(target, count: int, deltas: int, delay: float, keep_times: bool) -> dict:
    sockets = await target.open(count)
    try:
        meter = CpuMeter(target.server)
        got, emitted = await target.run(sockets, deltas, delay, keep_times)
        return summarize(got, emitted, deltas) | meter.read()
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
        fast = summarize(*await service.run(sockets[:readers], mode["deltas"], 0.0, False), mode["deltas"])
        got, emitted = await service.run(sockets[:readers], mode["paced"], mode["pace"], True)
        paced = summarize(got, emitted, mode["paced"])
        result = meter.read() | {
            "completion_s": fast["completion_s"], "missing_deltas": fast["missing_deltas"] + paced["missing_deltas"],
            "latencies": delays(got, emitted),
            "rss_before_kib": rss_before, "peak_kib": service.server.memory_kib("VmHWM")}
        if stuck:  # it reads now: were its deltas held and merged, and none lost?
            with suppress(TimeoutError):
                async with asyncio.timeout(30):
                    late = [await receive_run(sockets[-1], keep_times=False) for _ in range(FILLER_RUNS + 2)]
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
                     f"service RSS {service['rss_before_kib'] / 1024:.0f} -> "
                     f"{service['rss_after_kib'] / 1024:.0f} MiB, "
                     f"sockets connected in {service['connect_s']:.1f} s"))
    threads = results["threads"]
    label = f"6 {threads['threads']} threads x 2 sockets, {mode['runs_per_thread']} runs each"
    rows.append((f"{label}: runs/s", threads["threads"] * 2, f"{threads['runs_per_s']:.1f}", "", "",
                 f"{threads['completed_runs']}/{threads['runs']} runs completed; {cpu_note(threads)}"))
    rows.append((f"{label}: first delta p50 / p99 ms", threads["threads"] * 2,
                 f"{threads['ttfd_p50_ms']:.0f} / {threads['ttfd_p99_ms']:.0f}", "", "", ""))
    return rows


def goals(results: dict) -> list[str]:
    throughput, latency, slow = results["throughput"][100], results["latency"][100], results["slow_reader"]
    checks = [
        ("throughput at 100 sockets >= 0.7 x the raw limit",
         throughput["service"]["deltas_per_s"] / throughput["raw"]["deltas_per_s"],
         lambda ratio: ratio >= 0.7, "{:.2f} x"),
        ("p50 latency at 100 sockets <= 2 x the raw limit's",
         latency["service"]["p50_ms"] / latency["raw"]["p50_ms"], lambda ratio: ratio <= 2, "{:.2f} x"),
        ("a stuck socket raises the readers' p99 by < 20% (a drop is noise: see the cpu notes)",
         slow["with"]["p99_ms"] / slow["without"]["p99_ms"] - 1, lambda change: change < 0.2, "{:+.1%}"),
        ("< 64 KiB server memory per idle socket (clients offering permessage-deflate, as browsers do)",
         results["idle"]["deflate offered"]["service"]["kib_per_socket"], lambda kib: kib < 64, "{:.1f} KiB"),
    ]
    return [f"goal: {text}: {shape.format(value)} -> {'met' if test(value) else 'NOT MET'}"
            for text, value, test, shape in checks]


def report(results: dict, mode: dict, header: list[str]) -> str:
    rows = table_rows(results, mode)
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) if column in (0, 5) else str(cell).rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    return "\n".join(header + [""] + lines + [""] + goals(results))


# ---------------------------------------------------------------- main

async def bench(mode: dict, deflate: bool) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpus = (cpus[-1], set(cpus[:-1])) if len(cpus) > 1 else (None, set(cpus))
    os.sched_setaffinity(0, client_cpus)
    tries, results = mode["tries"], {"throughput": {}, "latency": {}, "idle": {}}
    clean_env = {key: value for key, value in os.environ.items() if not key.startswith(("JWT_", "OPENAI_"))}
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        service_env = clean_env | {"JWT_SECRET_KEY": SECRET, "ASSISTANTS_FILE": f"{workdir}/assistants.json",
                                   "OPENAI_API_KEY": "offline"}

        @asynccontextmanager
        async def servers(deflate: bool):
            async with (serve("bench:make_model_app", clean_env, workdir, min(client_cpus), factory=True) as model,
                        serve("main:app", service_env | {"OPENAI_BASE_URL": f"{model.url}/v1"}, workdir,
                              server_cpu) as server,
                        serve("bench:raw_app", clean_env, workdir, server_cpu) as raw_server,
                        httpx2.AsyncClient(timeout=WAIT) as http):
                yield ServiceTarget(server, model.url, http, deflate), RawTarget(raw_server, http, deflate)

        async with servers(deflate) as (service, raw):
            for target in (service, raw):  # warm-up: imports, connection pools, code paths
                await fan_out(target, 2, 50, 0.0, keep_times=False)
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
        for compression, offered in (("deflate offered", True), ("no deflate", False)):
            # Fresh servers: memory that earlier runs freed would otherwise hide the sockets' cost.
            async with servers(offered) as (service, raw):
                results["idle"][compression] = {target.name: await idle_cost(target, mode["idle"])
                                                for target in (service, raw)}
            progress(f"idle sockets, {compression}")
    results["cpus"] = {"server": server_cpu, "clients": sorted(client_cpus)}
    return results


def progress(step: str) -> None:
    print(f"  ... {step}: done", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and tries; under a minute")
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--no-deflate", action="store_true",
                        help="clients do not offer permessage-deflate (sections 1-4 and 6)")
    options = parser.parse_args()
    mode_name = "quick" if options.quick else "full"
    mode = MODES[mode_name]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers: 1 fd a socket each side
    started, busy_before = time.time(), machine_busy_seconds()
    results = asyncio.run(bench(mode, deflate=not options.no_deflate))
    wall = time.time() - started
    ours = sum(getattr(resource.getrusage(who), part) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for part in ("ru_utime", "ru_stime"))
    others = max(0.0, machine_busy_seconds() - busy_before - ours) / wall
    tries = f"best of {mode['tries']} tries (least CPU used by other processes)" if mode["tries"] > 1 else "one try"
    header = [
        f"Gainz fan-out benchmark, {mode_name} mode, {wall:.0f} s. Machine: {os.cpu_count()} CPUs; server "
        f"pinned to CPU {results['cpus']['server']}, clients and model to {results['cpus']['clients']}; "
        f"other processes used {others:.2f} CPUs on average{' (figures are noisy)' if others > 0.1 else ''}.",
        f"Python {sys.version.split()[0]}, uvicorn {uvicorn.__version__} {' '.join(UVICORN_OPTIONS)} "
        f"({AutoHTTPProtocol.__name__}, {AutoWebSocketsProtocol.__name__}), websockets {websockets.__version__} "
        f"clients (permessage-deflate {'not offered' if options.no_deflate else 'offered'}), fd limit {hard}; "
        f"{tries} per figure; section 4: {max(2, mode['tries'])} pairs of tries, latencies pooled.",
        "Counted: text.delta frames; deltas by content (the hub merges a lagging socket's pending deltas). "
        "Latency: the model emitting a delta -> a socket receiving it.",
    ]
    print(report(results, mode, header))
    if options.json:
        Path(options.json).write_text(json.dumps(results | {"mode": mode_name, "header": header}, indent=2))


if __name__ == "__main__":
    main()
