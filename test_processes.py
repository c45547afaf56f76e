"""The service as processes, started the way the README starts it (`python serve.py`): what survives a
restart and a `kill -9`, and several processes (uvicorn --workers, or separate processes as on separate
hosts) on one database and one Redis behaving as one service: tokens, sockets, events in order, run
order, limits, cancels, a process dying mid-run and Redis restarting mid-stream."""

import asyncio
import json
import re
import secrets
import signal
import subprocess

import httpx2
import pytest
from websockets.asyncio.client import connect

from conftest import (
    PeakMemory,
    bearer,
    frames_until,
    free_port,
    next_frame,
    require,
    run_ends,
    thread_messages,
    tool,
    until,
)

pytestmark = pytest.mark.anyio


def demo_token(log: str, sub: str) -> str:
    return re.search(rf"^\s*{sub}: Authorization: Bearer (\S+)$", log, re.M).group(1)


async def socket_on(server, thread_id: str, headers: dict, query: str = ""):
    ws = await connect(f"{server.url.replace('http', 'ws', 1)}/threads/{thread_id}/ws{query}",
                       additional_headers=headers)
    joined = await next_frame(ws)
    assert joined["type"] == "thread.joined", joined
    return ws, joined


def shared_env(database_url: str, redis: tuple[str, str] | None, **more) -> dict:
    env = {"DATABASE_URL": database_url} | {key: str(value) for key, value in more.items()}
    if redis is not None:
        env |= {"REDIS_URL": redis[0], "REDIS_PREFIX": redis[1]}
    return env


@pytest.fixture
async def http():
    async with httpx2.AsyncClient(timeout=30) as client:
        yield client


# ---------------------------------------------------------------- one process: restarts

async def test_threads_messages_assistants_and_tokens_survive_a_restart(servers, tmp_path, http):
    env = {"JWT_SECRET_KEY": "", "DATABASE_URL": f"sqlite:///{tmp_path}/gainz.db"}
    first = await servers(env)
    alice = {"Authorization": f"Bearer {demo_token(first.log(), 'alice')}"}
    bob = {"Authorization": f"Bearer {demo_token(first.log(), 'bob')}"}
    poet = (await http.post(f"{first.url}/assistants", json={"name": "poet", "instructions": "Rhyme."},
                            headers=alice)).json()
    thread = (await http.post(f"{first.url}/threads", json={"members": ["bob"], "title": "plans"},
                              headers=alice)).json()
    posted = await http.post(f"{first.url}/threads/{thread['id']}/messages",
                             json={"content": "hello", "assistants": ["assistant", "poet"]}, headers=alice)
    assert posted.status_code == 201
    before = await thread_messages(http, thread["id"], bob, first.url)
    first.stop()

    second = await servers(env)
    assert "Demo tokens" in second.log()  # printed again, with the same secret: the old tokens still work
    after = await thread_messages(http, thread["id"], bob, second.url)
    assert after == before
    assert [message.get("author") for message in after] == ["alice", None, None]
    assert [message.get("assistant", {}).get("name") for message in after] == [None, "assistant", "poet"]
    assert all(message.get("run_id") for message in after[1:])
    assert (await http.get(f"{second.url}/assistants/poet", headers=alice)).json() == poet
    assert (await http.get(f"{second.url}/threads", headers=bob)).json()["data"][0]["title"] == "plans"


async def test_a_run_cut_off_by_kill_9_runs_again_at_the_next_start_and_ends_exactly_once(servers, tmp_path, http):
    # A short lease: the next start waits for the dead process's lease to run out before it takes the run.
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/gainz.db", "OFFLINE_TOKEN_DELAY": "0.05", "RUN_LEASE_SECONDS": "3"}
    first = await servers(env)
    thread_id = (await http.post(f"{first.url}/threads", headers=bearer("alice"))).json()["id"]
    ws, _ = await socket_on(first, thread_id, bearer("alice"))
    await ws.send(json.dumps({"type": "message", "content": "do not lose me"}))
    frames = await frames_until(ws, "text.delta", count=3)
    run_id = next(frame["run_id"] for frame in frames if frame["type"] == "run.started")
    first.kill(signal.SIGKILL)

    second = await servers(env, port=first.port)
    ws, _ = await socket_on(second, thread_id, bearer("alice"))
    replies = await until(lambda: replied(http, second, thread_id))
    assert [reply["run_id"] for reply in replies] == [run_id]
    assert replies[0]["content"] == ("[offline model] assistant heard: [alice] do not lose me "
                                     "(1 message in its context)")
    await ws.close()


async def replied(http, server, thread_id):
    messages = await thread_messages(http, thread_id, bearer("alice"), server.url)
    replies = [m for m in messages if m["role"] == "assistant"]
    return replies or None


async def test_sigterm_lets_the_active_run_finish_and_leaves_queued_ones_for_the_next_start(servers, tmp_path, http):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/gainz.db", "OFFLINE_TOKEN_DELAY": "0.02",
           "SHUTDOWN_GRACE_SECONDS": "20"}
    first = await servers(env)
    thread_id = (await http.post(f"{first.url}/threads", headers=bearer("alice"))).json()["id"]
    ws, _ = await socket_on(first, thread_id, bearer("alice"))
    await ws.send(json.dumps({"type": "message", "content": "first", "assistants": ["assistant", "assistant"]}))
    started = await frames_until(ws, "text.delta")
    first.process.send_signal(signal.SIGTERM)
    rest = await frames_until(ws, "run.completed")
    assert run_ends(started + rest)[0]["run_id"] == next(f["run_id"] for f in started if f["type"] == "run.started")
    await ws.wait_closed()
    assert ws.close_code == 1001
    # uvicorn re-raises the signal once it has shut down, so that the exit status says what stopped it.
    assert first.process.wait(timeout=30) in (0, -signal.SIGTERM)

    second = await servers(env, port=first.port)
    replies = await until(lambda: replies_count(http, second, thread_id, 2))
    assert len(replies) == 2  # the second run waited in the store and ran at the next start


async def replies_count(http, server, thread_id, count):
    messages = await thread_messages(http, thread_id, bearer("alice"), server.url)
    replies = [m for m in messages if m["role"] == "assistant"]
    return replies if len(replies) >= count else None


# ---------------------------------------------------------------- start-up

NO_DEMO_TOKENS = '<script id="demo-tokens" type="application/json">null</script>'


async def test_demo_sign_in_is_for_a_browser_on_this_machine_never_through_forwarded_headers(servers, tmp_path,
                                                                                             http):
    """uvicorn with --forwarded-allow-ips '*' takes the client's address from X-Forwarded-For: anyone
    could claim to be 127.0.0.1. Demo tokens go only to a request that names no forwarded client."""
    dev = await servers({"JWT_SECRET_KEY": "", "DATABASE_URL": f"sqlite:///{tmp_path}/dev.db"},
                        args=("--forwarded-allow-ips", "*"))
    direct = (await http.get(f"{dev.url}/")).text
    tokens = json.loads(re.search(r'<script id="demo-tokens" type="application/json">(.*?)</script>', direct)[1])
    signed_in = await http.get(f"{dev.url}/threads", headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert signed_in.status_code == 200
    for forwarded in ({"X-Forwarded-For": "127.0.0.1"}, {"X-Forwarded-For": "203.0.113.7, 127.0.0.1"},
                      {"Forwarded": "for=127.0.0.1"}, {"X-Real-IP": "::1"}):
        page = await http.get(f"{dev.url}/", headers=forwarded)
        assert page.status_code == 200
        assert NO_DEMO_TOKENS in page.text, forwarded
        assert "eyJ" not in page.text
    assert len(re.findall(r"Demo sign-in is on", dev.log())) == 1
    secured = await servers({"DATABASE_URL": f"sqlite:///{tmp_path}/secured.db"}, args=("--forwarded-allow-ips", "*"))
    assert NO_DEMO_TOKENS in (await http.get(f"{secured.url}/")).text
    assert len(re.findall(r"Demo sign-in is off: JWT_SECRET_KEY is set", secured.log())) == 1


async def test_postgresql_unreachable_at_start_is_one_line_at_once(servers):
    port = free_port()  # nothing listens there
    started = asyncio.get_running_loop().time()
    server = await servers({"DATABASE_URL": f"postgresql://postgres:secret@127.0.0.1:{port}/test"}, wait=False)
    assert await asyncio.to_thread(server.process.wait, 60) == 3
    assert asyncio.get_running_loop().time() - started < 9  # the pool would have tried for 10 s
    log = server.log()
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if "PostgreSQL" in line]
    assert "unreachable" in line and "Connection refused" in line and str(port) in line
    assert "secret" not in log


# ---------------------------------------------------------------- several processes

async def test_several_processes_without_redis_are_refused_with_what_to_set(servers, tmp_path, postgres_url):
    workers = await servers({"DATABASE_URL": f"sqlite:///{tmp_path}/gainz.db"}, args=("--workers", "2"),
                            wait=False)
    assert workers.process.wait(timeout=60) == 3
    assert "set REDIS_URL" in workers.log()
    assert "Traceback" not in workers.log()
    first = await servers({"DATABASE_URL": postgres_url})  # several hosts on one PostgreSQL, likewise
    second = await servers({"DATABASE_URL": postgres_url}, wait=False)
    assert second.process.wait(timeout=60) == 3
    assert "set REDIS_URL" in second.log()
    assert first.process.poll() is None


async def test_two_processes_on_postgresql_behave_as_one_service(servers, postgres_url, redis_url, http):
    env = shared_env(postgres_url, redis_url, JWT_SECRET_KEY="", OFFLINE_TOKEN_DELAY="0.005")
    one, two = await servers(env), await servers(env)
    logs = one.log() + two.log()
    assert logs.count("Demo tokens") == 1  # printed once, by whichever process came first
    # No JWT_SECRET_KEY: the secret generated once and kept in the database signs for both processes.
    alice = {"Authorization": f"Bearer {demo_token(logs, 'alice')}"}
    bob = {"Authorization": f"Bearer {demo_token(logs, 'bob')}"}
    created = await http.post(f"{one.url}/threads", json={"members": ["bob"]}, headers=alice)
    thread_id = created.json()["id"]
    assert (await http.get(f"{two.url}/threads/{thread_id}", headers=bob)).status_code == 200

    sockets = []
    for server, headers in ((one, alice), (two, bob), (two, alice), (one, bob)):
        ws, joined = await socket_on(server, thread_id, headers)
        sockets.append(ws)
        assert joined["clients"] == len(sockets)  # counted service-wide
    posts = [http.post(f"{server.url}/threads/{thread_id}/messages", json={"content": f"post {n}"},
                       headers=headers) for n, (server, headers) in enumerate([(one, alice), (two, bob)] * 3)]
    answers = await asyncio.gather(*posts)
    assert [answer.status_code for answer in answers] == [201] * 6
    received = [seen(await frames_until(ws, "run.completed", count=6)) for ws in sockets]
    for other in received[1:]:  # every event, once, in one order, on every socket
        assert other == received[0]
    events, texts = received[0]
    kinds = [kind for kind, _ in events if kind in ("run.started", "run.completed")]
    assert kinds == ["run.started", "run.completed"] * 6  # runs never overlapped
    assert len(texts) == 6
    for ws in sockets:
        await ws.close()


@pytest.fixture
def new_postgres_database():
    """new_postgres_database() -> the URL of a PostgreSQL database created empty now; all dropped at the end."""
    import psycopg

    from conftest import POSTGRES_URL, reachable

    require(reachable("127.0.0.1", 5432), "PostgreSQL (127.0.0.1:5432)")
    made: list[str] = []

    def make() -> str:
        name = f"gainz_fresh_{secrets.token_hex(4)}"
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        for name in made:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def every_worker_started(server, workers: int) -> None:
    await until(lambda: asyncio.sleep(0, server.log().count("Application startup complete.") >= workers), 60)
    assert server.process.poll() is None, server.log()


async def test_processes_starting_together_on_brand_new_databases_migrate_them_once(
        servers, new_postgres_database, redis_url, tmp_path, http):
    """Both workers used to run the first migration at once: one died on the catalog's unique index and
    the service exited 3."""
    starts = [("--workers 2", shared_env(new_postgres_database(), redis_url)) for _ in range(4)]
    starts += [("two hosts", shared_env(new_postgres_database(), redis_url)),
               ("--workers 2", shared_env(f"sqlite:///{tmp_path}/fresh.db", redis_url))]
    for how, env in starts:
        if how == "two hosts":
            both = [await servers(env, wait=False), await servers(env, wait=False)]
            for server in both:
                await server.ready(timeout=60)
                await every_worker_started(server, 1)
        else:
            both = [await servers(env, args=("--workers", "2"), wait=False)]
            await both[0].ready(timeout=60)
            await every_worker_started(both[0], 2)
        for server in both:
            log = server.log()
            assert "Traceback" not in log and "UniqueViolation" not in log, log
            created = await http.post(f"{server.url}/threads", json={"title": how}, headers=bearer("alice"))
            assert created.status_code == 201, created.text
            server.stop()


def seen(frames: list[dict]) -> tuple[list, dict]:
    """What every socket must agree on: each event but the deltas, with its seq, and each run's text.
    (A socket that lags gets its pending deltas merged, so the deltas' frames themselves may differ.)"""
    seqs = [frame["seq"] for frame in frames]
    assert seqs == sorted(set(seqs))
    texts: dict[str, str] = {}
    for frame in frames:
        if frame["type"] == "text.delta":
            texts[frame["run_id"]] = texts.get(frame["run_id"], "") + frame["delta"]
    for frame in frames:
        if frame["type"] == "run.completed":
            assert texts[frame["run_id"]] == frame["message"]["content"]
    return [(frame["type"], frame["seq"]) for frame in frames if frame["type"] != "text.delta"], texts



async def test_the_message_rate_holds_across_processes(servers, postgres_url, redis_url, http):
    # One a minute after a burst of five: no message is given back while the test runs.
    env = shared_env(postgres_url, redis_url, MESSAGES_PER_MINUTE=1, MESSAGE_BURST=5)
    one, two = await servers(env), await servers(env)
    thread_id = (await http.post(f"{one.url}/threads", headers=bearer("flooder"))).json()["id"]
    answers = await asyncio.gather(*(http.post(f"{server.url}/threads/{thread_id}/messages",
                                               json={"content": "again", "run": False}, headers=bearer("flooder"))
                                     for server in (one, two) * 10))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(201) == 5  # each process alone would have let five in
    assert statuses.count(429) == 15
    assert all(int(answer.headers["retry-after"]) >= 1 for answer in answers if answer.status_code == 429)
    assert len(await thread_messages(http, thread_id, bearer("flooder"), one.url)) == 5
    # The rate is the flooder's alone.
    theirs = (await http.post(f"{two.url}/threads", headers=bearer("bystander"))).json()["id"]
    assert (await http.post(f"{two.url}/threads/{theirs}/messages", json={"content": "me", "run": False},
                            headers=bearer("bystander"))).status_code == 201


async def test_three_workers_on_sqlite_count_sockets_and_limits_service_wide(servers, tmp_path, redis_url, http):
    env = shared_env(f"sqlite:///{tmp_path}/gainz.db", redis_url, MAX_SOCKETS_PER_USER=4)
    workers = await servers(env, args=("--workers", "3"))
    thread_id = (await http.post(f"{workers.url}/threads", json={"members": ["bob"]},
                                 headers=bearer("alice"))).json()["id"]
    sockets = []
    for n in range(4):  # spread over the workers by the kernel
        ws, joined = await socket_on(workers, thread_id, bearer("alice"))
        sockets.append(ws)
        assert joined["clients"] == n + 1
    for _ in range(3):  # whichever worker takes it, the fifth is one too many
        refused = await http.get(f"{workers.url}/threads/{thread_id}/events",
                                 headers=bearer("alice"))
        assert refused.status_code == 429
    bob, joined = await socket_on(workers, thread_id, bearer("bob"))
    assert joined["clients"] == 5
    await http.post(f"{workers.url}/threads/{thread_id}/messages", json={"content": "to all"},
                    headers=bearer("bob"))
    for ws in [*sockets, bob]:
        frames = await frames_until(ws, "run.completed")
        assert [frame["type"] for frame in frames][:2] == ["message.created", "run.started"]
        await ws.close()


async def test_a_cancel_reaches_the_process_that_runs_the_run(servers, postgres_url, redis_url, http):
    env = shared_env(postgres_url, redis_url, OFFLINE_TOKEN_DELAY="0.05")
    one, two = await servers(env), await servers(env)
    thread_id = (await http.post(f"{one.url}/threads", headers=bearer("alice"))).json()["id"]
    watcher, _ = await socket_on(two, thread_id, bearer("alice"))
    posting = asyncio.create_task(http.post(f"{one.url}/threads/{thread_id}/messages",
                                            json={"content": "a long answer please " * 5}, headers=bearer("alice")))
    frames = await frames_until(watcher, "text.delta", count=2)
    run_id = next(frame["run_id"] for frame in frames if frame["type"] == "run.started")
    cancelled = await http.post(f"{two.url}/threads/{thread_id}/runs/{run_id}/cancel", headers=bearer("alice"))
    assert cancelled.status_code == 202
    end = (await frames_until(watcher, "run.cancelled"))[-1]
    assert (end["run_id"], end["by"]) == (run_id, "alice")
    answer = await posting
    assert answer.json()["errors"][0]["code"] == "cancelled"
    assert answer.json()["replies"][0]["cancelled"] is True
    await watcher.close()


async def test_a_process_killed_mid_run_holds_its_thread_no_longer_than_the_lease(servers, postgres_url, redis_url,
                                                                                 http):
    env = shared_env(postgres_url, redis_url, OFFLINE_TOKEN_DELAY="0.05", RUN_LEASE_SECONDS="2")
    one, two = await servers(env), await servers(env)
    thread_id = (await http.post(f"{one.url}/threads", headers=bearer("alice"))).json()["id"]
    watcher, _ = await socket_on(two, thread_id, bearer("alice"))
    await http.post(f"{one.url}/threads/{thread_id}/messages", json={"content": "hi", "run": False},
                    headers=bearer("alice"))
    runs = asyncio.create_task(http.post(f"{one.url}/threads/{thread_id}/runs", headers=bearer("alice")))
    frames = await frames_until(watcher, "text.delta", count=2)
    run_id = next(frame["run_id"] for frame in frames if frame["type"] == "run.started")
    one.kill(signal.SIGKILL)
    with pytest.raises(httpx2.HTTPError):
        await runs
    again = await frames_until(watcher, "run.completed", timeout=30)
    restarted = [frame for frame in again if frame["type"] == "run.started"]
    assert [frame["run_id"] for frame in restarted] == [run_id]  # run again, from its start, by the survivor
    assert [frame["run_id"] for frame in run_ends(again)] == [run_id]
    stored = [m for m in await thread_messages(http, thread_id, bearer("alice"), two.url) if m["role"] == "assistant"]
    assert [message["run_id"] for message in stored] == [run_id]
    await watcher.close()


# ---------------------------------------------------------------- Redis going away

@pytest.fixture
def private_redis(tmp_path):
    """A Redis of this test's own (it is stopped and started again), on a free port."""
    require(tool("redis-server") is not None, "redis-server")
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp_path)]
    processes = []

    def start():
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop():
        processes[-1].terminate()
        processes[-1].wait(timeout=10)

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_redis_restarting_mid_stream_crashes_nothing_and_delivery_resumes(servers, postgres_url, private_redis,
                                                                                http):
    url, start_redis, stop_redis = private_redis
    env = shared_env(postgres_url, (url, "gainz:"), OFFLINE_TOKEN_DELAY="0.03")
    one, two = await servers(env), await servers(env)
    thread_id = (await http.post(f"{one.url}/threads", headers=bearer("alice"))).json()["id"]
    watcher, _ = await socket_on(two, thread_id, bearer("alice"))
    posting = asyncio.create_task(http.post(f"{one.url}/threads/{thread_id}/messages",
                                            json={"content": "through the outage " * 4}, headers=bearer("alice")))
    await frames_until(watcher, "text.delta", count=2)
    stop_redis()
    answer = await posting  # the run ends and is stored while Redis is away
    assert answer.status_code == 201
    assert answer.json()["replies"]
    start_redis()
    # The socket stayed open; what it missed it is told to reload, and it gets what comes next.
    frames = await frames_until(watcher, "resync", timeout=30)
    assert frames[-1]["thread_id"] == thread_id
    await http.post(f"{two.url}/threads/{thread_id}/messages", json={"content": "after"}, headers=bearer("alice"))
    # The first run's last events, held while Redis was away, may come first: the new run's come all the same.
    while (frame := await next_frame(watcher, timeout=30))["type"] != "run.completed" or \
            not frame["message"]["content"].endswith("heard: [alice] after (3 messages in its context)"):
        pass
    assert one.process.poll() is None
    assert two.process.poll() is None
    await watcher.close()



async def test_while_redis_is_down_writes_are_stored_and_answered_and_a_socket_gets_resync_once_it_is_back(
        servers, tmp_path, private_redis, http):
    url, start_redis, stop_redis = private_redis
    server = await servers(shared_env(f"sqlite:///{tmp_path}/gainz.db", (url, "gainz:")))
    thread_id = (await http.post(f"{server.url}/threads", headers=bearer("alice"))).json()["id"]
    watcher, _ = await socket_on(server, thread_id, bearer("alice"))
    stop_redis()

    noted = await http.post(f"{server.url}/threads/{thread_id}/messages",
                            json={"content": "while away", "run": False}, headers=bearer("alice"))
    assert noted.status_code == 201, noted.text
    asked = await http.post(f"{server.url}/threads/{thread_id}/messages",
                            json={"content": "answer me anyway"}, headers=bearer("alice"))
    assert asked.status_code == 201, asked.text
    (reply,) = asked.json()["replies"]
    assert reply["content"].endswith("heard: [alice] answer me anyway (2 messages in its context)")
    async with http.stream("POST", f"{server.url}/threads/{thread_id}/messages", json={"content": "and stream"},
                           headers=bearer("alice") | {"Accept": "text/event-stream"}) as streamed:
        assert streamed.status_code == 201
        await streamed.aread()  # it ends once its run has, although the run's events wait for Redis
    stored = await thread_messages(http, thread_id, bearer("alice"), server.url)
    assert [(message["role"], message["content"]) for message in stored][:3] == [
        ("user", "while away"), ("user", "answer me anyway"), ("assistant", reply["content"])]
    assert [message["role"] for message in stored][3:] == ["user", "assistant"]
    # Live events cannot be joined meanwhile (nor a socket's slot counted): a handshake is told to come back.
    refused = await http.get(f"{server.url}/threads/{thread_id}/events", headers=bearer("alice"))
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1

    with PeakMemory(server.process.pid) as memory:
        start_redis()  # on the same port, empty: every thread's seq counts on from where the clock is
        resync = (await frames_until(watcher, "resync", timeout=30))[-1]
    assert resync["thread_id"] == thread_id
    again = await http.post(f"{server.url}/threads/{thread_id}/messages", json={"content": "back", "run": False},
                            headers=bearer("alice"))
    assert again.status_code == 201
    # What was held while Redis was away may come first; then the live events, in seq order.
    frames = [await next_frame(watcher, timeout=30)]
    while not (frames[-1]["type"] == "message.created" and frames[-1]["message"]["content"] == "back"):
        frames.append(await next_frame(watcher, timeout=30))
    assert [frame["seq"] for frame in frames] == sorted({frame["seq"] for frame in frames})
    assert frames[0]["seq"] > resync["seq"]
    assert memory.growth < 50
    assert server.process.poll() is None
    await watcher.close()
