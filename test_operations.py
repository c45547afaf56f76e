"""The routes for operators, all without a token: GET /ready (200 while the database and Redis answer, 503
naming what does not, as the service sees it when its link to them is cut), GET /metrics (Prometheus text
that counts runs, sockets, events and limits, and names no user or thread) and GET /docs (Swagger UI, served
by the service itself: no other host is asked for anything, in a real Chromium too).
"""

import asyncio
import contextlib
import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit, urlunsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    REDIS_URL,
    config_for,
    frames_until,
    free_port,
    polled,
    require,
    serve_live,
    tool,
)
from main import create_app

pytestmark = pytest.mark.anyio
READY_WAIT = 30  # seconds for a pool to reconnect once its database is back, on a loaded machine


# ---------------------------------------------------------------- /ready

class Link:
    """A TCP forwarder to the server of a URL, which the test cuts (new connections refused, open ones reset)
    and mends, on the same port: a database or Redis going away and coming back, as the service sees it."""

    def __init__(self, url: str):
        self.target = urlsplit(url)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def mend(self) -> None:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target.hostname, self.target.port)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, target_writer}
        await asyncio.gather(pump(reader, target_writer), pump(target_reader, writer))

    def url(self, url: str) -> str:
        """`url`, through this link."""
        return urlunsplit(urlsplit(url)._replace(netloc=self.target.netloc.replace(
            f"{self.target.hostname}:{self.target.port}", f"127.0.0.1:{self.port}")))


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@contextlib.asynccontextmanager
async def linked(url: str):
    link = Link(url)
    await link.mend()
    try:
        yield link
    finally:
        with contextlib.suppress(AssertionError):
            await link.cut()


async def readiness(live) -> tuple[int, dict]:
    response = await live.http.get("/ready")  # no token
    return response.status_code, response.json()


async def test_ready_names_the_database_and_redis_while_they_are_cut_off_and_is_ok_once_they_are_back(
        tmp_path, jwt_settings, postgres_url, redis_url):
    _, prefix = redis_url
    async with linked(postgres_url) as database, linked(REDIS_URL) as redis:
        config = config_for(tmp_path, database_url=database.url(postgres_url), redis_url=redis.url(REDIS_URL),
                            redis_prefix=prefix)
        async with serve_live(create_app(config, jwt_settings)) as live:
            assert await readiness(live) == (200, {"status": "ok"})
            await database.cut()
            await redis.cut()
            assert await readiness(live) == (503, {"status": "unavailable", "down": ["database", "redis"]})
            await database.mend()
            redis_down = (503, {"status": "unavailable", "down": ["redis"]})
            assert await polled(lambda: readiness(live), redis_down, READY_WAIT, 0.1) == redis_down
            await redis.mend()
            ready = (200, {"status": "ok"})
            assert await polled(lambda: readiness(live), ready, READY_WAIT, 0.1) == ready


async def test_ready_without_redis_asks_the_database_alone(live):
    assert await readiness(live) == (200, {"status": "ok"})


# ---------------------------------------------------------------- /metrics

async def scrape(live) -> tuple[str, dict]:
    """The metrics text, and its samples by (name, labels)."""
    response = await live.http.get("/metrics")  # no token
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(response.text) for sample in family.samples}
    return response.text, samples


async def test_metrics_count_runs_sockets_events_and_limits_without_naming_a_user_or_a_thread(make_app, auth, join):
    async with serve_live(make_app(max_threads_per_user=1)) as live:
        thread_id = await live.new_thread(auth, members=["bob"], title="secret plans")
        socket, _ = await join(live, thread_id, "bob")
        _, before = await scrape(live)
        assert before[("gainz_sockets_open", ())] == 1
        assert not [key for key in before if "run" in key[0] and key[0].endswith("_total")]  # no run yet

        answer = await live.http.post(f"/threads/{thread_id}/messages", json={"content": "hello from alice"},
                                      headers=auth("alice"))
        assert answer.status_code == 201, answer.text
        await frames_until(socket, "run.completed")
        refused = await live.http.post("/threads", json={}, headers=auth("alice"))
        assert refused.status_code == 429

        text, after = await scrape(live)
        assert after[("gainz_runs_total", (("outcome", "completed"),))] == 1
        assert after[("gainz_run_duration_seconds_count", (("outcome", "completed"),))] == 1
        assert after[("gainz_upstream_first_token_seconds_count", ())] == 1
        assert after[("gainz_limits_hit_total", (("endpoint", "create_thread"),))] == 1
        # message.created, run.started, the deltas, run.completed: to bob's socket and alice's waiting request
        assert after[("gainz_events_delivered_total", ())] >= 2 * 4
        for private in (thread_id, "alice", "bob", "secret plans", "hello from alice",
                        answer.json()["replies"][0]["run_id"], answer.json()["message"]["id"]):
            assert private not in text

        await socket.close()

        async def sockets_open():
            return (await scrape(live))[1][("gainz_sockets_open", ())]

        assert await polled(sockets_open, 0, timeout=10, interval=0.1) == 0


# ---------------------------------------------------------------- /docs

class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


async def test_docs_serve_swagger_ui_and_its_files_without_a_token_and_name_no_other_host(live):
    page = await live.http.get("/docs")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?:|//", page.text.replace("<!DOCTYPE html>", "")), page.text
    assert '"openapi.json"' in page.text
    parser = Links()
    parser.feed(page.text)
    assert len(parser.urls) >= 2
    for url in parser.urls:
        asset = await live.http.get(urljoin(str(page.url), url))  # no token
        assert asset.status_code == 200, url
        assert asset.content, url
    assert (await live.http.get("/docs/nothing-here.js")).status_code == 404
    assert (await live.http.get("/docs/deeper/swagger-ui.css")).status_code == 401  # public: the folder alone
    assert (await live.http.get("/threads")).status_code == 401


def test_docs_render_every_operation_in_chromium_fetching_nothing_from_another_host(tmp_path, app):
    try:
        from test_page import CHROMIUM_FLAGS, wait, webdriver
    except ImportError:
        webdriver = None
    chromium, chromedriver = tool("chromium"), tool("chromedriver")
    require(chromium is not None and chromedriver is not None,
            "Chromium and chromedriver (apt-get install chromium chromium-driver)")
    require(webdriver is not None, "selenium (pip install selenium)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or a driver
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        async def browse():
            async with serve_live(app) as live:
                operations = sum(len(item) for item in (await live.http.get("/openapi.json")).json()["paths"].values())
                await asyncio.to_thread(driver.get, live.url + "/docs")
                shown = await asyncio.to_thread(wait, driver, lambda: len(
                    driver.find_elements("css selector", ".opblock")) == operations and operations)
                fetched = await asyncio.to_thread(driver.execute_script, (
                    "return performance.getEntriesByType('resource').map((entry) => entry.name)"))
                return shown, fetched, live.url

        shown, fetched, url = asyncio.run(browse())
        assert shown
        assert fetched and all(name.startswith(url + "/") for name in fetched), fetched
        assert url + "/openapi.json" in fetched
    finally:
        driver.quit()
