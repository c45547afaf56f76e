"""The demo page (GET /) in a real headless Chromium, against the service started as the README starts
it (`python serve.py`; dev mode, no JWT_SECRET_KEY, so the page offers alice and bob): windows signed
in with the demo buttons; a reply streamed token by token into two windows and ending as the stored
one; a window opened mid-reply showing it from its start (thread.joined's active_run); Stop ending a
run with the cancelled mark everywhere; a dropped socket resuming with ?after= without losing a token;
assistants answering in the order picked, and in rounds; who is here, live, and "bob is typing…"; each
message's time; a removed member, a deleted thread and an expired token
(close codes 4403, 4404, 4401) sending their windows back to the list or to sign in.

One server and three windows for the module (alice, bob, and a second tab of alice's); each test
works on threads of its own. With SAVE_SCREENSHOT=1, alice's window after a reply is saved to
docs/demo.png.
"""

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx2
import pytest

from auth import JWT_SECRET_SETTING, JWTSettings
from conftest import REPO, ServerProcess, require, tool
from store import stored_setting

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # reported by the fixture: skipped on a laptop, failed under CI
    webdriver = None

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1280,900")
WAIT = 20  # seconds: two cores, three browsers and a server
PREFIX = "[offline model] assistant heard:"
CONTENT = ("Hello bob! Shall we ship on Friday? The migration comes first, then the docs, then a careful look at "
           "the dashboards before we turn it on for everyone. Does <b>this</b> stay plain text?")

# The last reply on the page, skipping the runs in arguments[0]; null while there is none.
LAST_REPLY = """
const items = [...document.querySelectorAll('#messages li.assistant')]
  .filter((item) => !arguments[0].includes(item.dataset.runId));
const item = items.pop();
return item ? {run_id: item.dataset.runId, who: item.querySelector('.who').textContent,
               text: item.querySelector('.text').textContent, writing: item.classList.contains('writing'),
               cancelled: item.classList.contains('cancelled'),
               mark: item.querySelector('.mark') && item.querySelector('.mark').textContent} : null;
"""
ALL_REPLIES = """
return [...document.querySelectorAll('#messages li.assistant')].map((item) => ({
  who: item.querySelector('.who').textContent, text: item.querySelector('.text').textContent,
  writing: item.classList.contains('writing')}));
"""
# Closes the page's socket as a dropped network would; answers the state the page shows once it noticed.
DROP_SOCKET = """
const done = arguments[arguments.length - 1];
state.ws.addEventListener('close', () => done(document.getElementById('conn').dataset.state));
state.ws.close(4000);
"""


@dataclass
class Demo:
    server: ServerProcess
    alice: object
    bob: object
    alice2: object  # a second tab of alice's

    def users(self):
        return ((self.alice, "alice"), (self.bob, "bob"), (self.alice2, "alice"))


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """`python serve.py` in dev mode (the page then carries alice's and bob's tokens), with a slower offline
    model so that a reply takes long enough to watch; and three Chromium windows, signed in."""
    chromium, chromedriver = tool("chromium"), tool("chromedriver")
    require(chromium is not None and chromedriver is not None,
            "Chromium and chromedriver (apt-get install chromium chromium-driver)")
    require(webdriver is not None, "selenium (pip install selenium)")
    workdir = tmp_path_factory.mktemp("page")
    server = ServerProcess(workdir, {"JWT_SECRET_KEY": "", "OFFLINE_TOKEN_DELAY": "0.03"})
    opened = []

    def open_browser(name: str):
        options = Options()
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={workdir / f'chromium-{name}'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        opened.append(driver)
        return driver

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or a driver
        try:
            server.start()
            with ThreadPoolExecutor(3) as pool:  # each takes a while to start: all at once
                browsers = pool.map(open_browser, ("alice", "bob", "alice2"))
                asyncio.run(server.ready())
                demo = Demo(server, *browsers)
                list(pool.map(lambda user: sign_in(user[0], server.url, user[1]), demo.users()))
            yield demo
        finally:
            for driver in opened:
                driver.quit()
            server.stop()


@pytest.fixture
def demo(started):
    """The windows, each signed in as its user (a test may have signed one out), no assistant picked."""
    for driver, user in started.users():
        if driver.find_element(By.ID, "who").text != f"Signed in as {user}":
            sign_in(driver, started.server.url, user)
        driver.execute_script("state.picked = []; renderPicker()")
    return started


# ---------------------------------------------------------------- helpers

def wait(driver, condition, timeout: float = WAIT):
    """Polls `condition()` until it is truthy, and returns it."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: condition())


def sign_in(driver, url: str, user: str) -> None:
    driver.get(url)
    driver.find_element(By.CSS_SELECTOR, f'#demo-users button[data-user="{user}"]').click()
    wait(driver, lambda: driver.find_element(By.ID, "who").text == f"Signed in as {user}")


def connected(driver) -> bool:
    return driver.find_element(By.ID, "conn").get_attribute("data-state") == "connected"


def new_thread(driver, members: str = "", title: str = "") -> str:
    """Creates a thread with the page's form; returns its id once the page is on it, connected."""
    previous = driver.execute_script("return location.hash")
    driver.find_element(By.ID, "new-members").send_keys(members)
    driver.find_element(By.ID, "new-title").send_keys(title)
    driver.find_element(By.CSS_SELECTOR, "#new-thread button").click()
    wait(driver, lambda: driver.execute_script("return location.hash") not in ("", previous) and connected(driver))
    return driver.execute_script("return decodeURIComponent(location.hash.slice(1))")


def open_thread(driver, thread_id: str) -> None:
    def listed():
        buttons = driver.find_elements(By.CSS_SELECTOR, f'#thread-list button[data-thread-id="{thread_id}"]')
        if not buttons:
            driver.find_element(By.ID, "refresh").click()
        return buttons

    wait(driver, listed)[0].click()
    wait(driver, lambda: driver.execute_script("return location.hash").endswith(thread_id) and connected(driver))


def send(driver, text: str) -> None:
    # Set, not typed: typing hundreds of words would take seconds. The page reads the field on Send.
    driver.execute_script("document.getElementById('content').value = arguments[0]", text)
    driver.find_element(By.ID, "send").click()


def last_reply(driver, skip=()) -> dict | None:
    return driver.execute_script(LAST_REPLY, list(skip))


def reply_longer_than(driver, chars: int, skip=()) -> dict:
    return wait(driver, lambda: (shown := last_reply(driver, skip)) and len(shown["text"]) > chars and shown)


def watch(drivers, done, skip=()) -> list[list[dict]]:
    """Polls each window's last reply until `done(reply)` holds in every one; returns each one's states."""
    seen = [[] for _ in drivers]

    def all_done():
        finished = True
        for driver, states in zip(drivers, seen):
            reply = last_reply(driver, skip)
            if reply is not None and (not states or states[-1] != reply):
                states.append(reply)
            finished = finished and reply is not None and done(reply)
        return finished

    wait(drivers[0], all_done)
    return seen


def present(driver) -> list[str]:
    return [person.text for person in driver.find_elements(By.CSS_SELECTOR, "#present .person")]


def notice(driver) -> str:
    return driver.find_element(By.ID, "notice").text


def stored_messages(demo: Demo, driver, thread_id: str) -> list[dict]:
    """The thread's messages from the API, with the token the page signed in with."""
    token = driver.execute_script("return sessionStorage.getItem('token')")
    response = httpx2.get(f"{demo.server.url}/threads/{thread_id}/messages",
                          headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()["data"]


# ---------------------------------------------------------------- tests

def test_a_reply_streams_token_by_token_into_both_windows_and_ends_as_the_stored_one(demo):
    assert json.loads(demo.alice.find_element(By.ID, "demo-tokens").get_attribute("textContent")).keys() == {
        "alice", "bob"}
    thread_id = new_thread(demo.alice, "bob", "Friday's release")
    assert demo.alice.find_element(By.ID, "thread-title").text == "Friday's release"
    open_thread(demo.bob, thread_id)
    assert present(demo.bob) == ["alice", "bob (you)"]
    wait(demo.alice, lambda: present(demo.alice) == ["alice (you)", "bob"])  # live: bob came after alice
    assert not demo.bob.find_element(By.ID, "members-form").is_displayed()  # owner only

    demo.alice.find_element(By.ID, "content").send_keys(CONTENT)
    demo.alice.find_element(By.ID, "send").click()
    seen = watch([demo.alice, demo.bob], lambda reply: not reply["writing"])

    user_message, reply = stored_messages(demo, demo.alice, thread_id)
    assert user_message["content"] == CONTENT
    assert reply["content"].startswith(PREFIX)
    for driver, states in zip((demo.alice, demo.bob), seen):
        assert driver.find_element(By.CSS_SELECTOR, "#messages li.user .text").text == CONTENT  # text, not markup
        assert not driver.find_elements(By.CSS_SELECTOR, "#messages b")
        final = states[-1]
        assert final["run_id"] == reply["run_id"]
        assert final["who"] == "assistant"
        assert final["text"] == reply["content"]
        partial = [state["text"] for state in states
                   if state["writing"] and 0 < len(state["text"]) < len(final["text"])]
        assert partial, f"no partial reply seen: {states}"  # it streamed, token by token
        assert all(final["text"].startswith(text) for text in partial)
    if os.environ.get("SAVE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        demo.alice.save_screenshot(str(REPO / "docs" / "demo.png"))


def test_a_window_opened_mid_reply_shows_it_from_its_start_and_stop_marks_it_cancelled_everywhere(demo):
    thread_id = new_thread(demo.alice, "bob")
    open_thread(demo.bob, thread_id)
    long_content = " ".join(f"item{i}" for i in range(400))  # 12 s of reply at 0.03 s a token
    send(demo.alice, long_content)
    before = reply_longer_than(demo.alice, 60)
    assert before["writing"]

    open_thread(demo.alice2, thread_id)
    caught_up = wait(demo.alice2, lambda: last_reply(demo.alice2))
    assert caught_up["writing"]
    assert caught_up["text"].startswith(before["text"])  # from its start, though it opened later
    assert present(demo.alice2) == ["alice (you)", "bob"]
    reply_longer_than(demo.alice2, len(caught_up["text"]))  # and goes on

    assert demo.alice.find_element(By.ID, "stop").is_displayed()
    demo.bob.find_element(By.ID, "stop").click()
    seen = watch([demo.alice, demo.bob, demo.alice2], lambda reply: not reply["writing"])
    cancelled = stored_messages(demo, demo.alice, thread_id)[-1]
    assert cancelled["cancelled"] is True
    assert len(cancelled["content"]) < len(long_content)
    for driver, states in zip((demo.alice, demo.bob, demo.alice2), seen):
        final = states[-1]
        assert final["run_id"] == cancelled["run_id"]
        assert final["cancelled"]
        assert final["mark"] == "Stopped by bob."
        assert final["text"] == cancelled["content"]
        assert not driver.find_element(By.ID, "stop").is_displayed()


def test_a_dropped_socket_comes_back_after_its_last_seq_without_losing_a_token(demo):
    thread_id = new_thread(demo.alice)
    send(demo.alice, " ".join(f"part{i}" for i in range(120)))
    states = [reply_longer_than(demo.alice, 40)]

    assert demo.alice.execute_async_script(DROP_SOCKET) == "reconnecting"
    wait(demo.alice, lambda: connected(demo.alice))
    assert "?after=" in demo.alice.execute_script("return state.ws.url")
    states.append(reply_longer_than(demo.alice, len(states[0]["text"])))
    states += watch([demo.alice], lambda reply: not reply["writing"])[0]

    reply = stored_messages(demo, demo.alice, thread_id)[-1]
    assert states[-1]["text"] == reply["content"]
    # Every state shown was a start of the reply: nothing lost, nothing twice.
    assert all(reply["content"].startswith(state["text"]) for state in states)
    assert any(state["writing"] for state in states[1:])  # it was still streaming after the reconnection


def test_assistants_answer_in_the_order_picked(demo):
    new_thread(demo.alice)
    demo.alice.find_element(By.CSS_SELECTOR, "#assistants summary").click()
    demo.alice.find_element(By.ID, "assistant-name").send_keys("poet")
    demo.alice.find_element(By.ID, "assistant-instructions").send_keys("Rhyme.")
    demo.alice.find_element(By.CSS_SELECTOR, "#new-assistant button").click()
    wait(demo.alice, lambda: "poet" in demo.alice.find_element(By.ID, "assistant-picker").text)
    boxes = {box.find_element(By.XPATH, "..").text.split(" (")[0]: box
             for box in demo.alice.find_elements(By.CSS_SELECTOR, "#assistant-picker input")}
    assert boxes["poet"].is_selected()  # a new assistant is picked at once
    boxes["assistant"].click()
    assert demo.alice.find_element(By.ID, "assistant-picker").text.split() == ["assistant", "(2)", "poet", "(1)"]

    send(demo.alice, "Two answers, please")
    replies = wait(demo.alice, lambda: (shown := demo.alice.execute_script(ALL_REPLIES)) and len(shown) == 2
                   and not any(reply["writing"] for reply in shown) and shown)
    assert [reply["who"] for reply in replies] == ["poet", "assistant"]
    assert all(reply["text"].startswith("[offline model]") for reply in replies)


def test_who_is_here_shows_live_and_typing_shows_in_the_other_windows(demo):
    thread_id = new_thread(demo.alice, "bob")
    assert present(demo.alice) == ["alice (you)"]
    open_thread(demo.bob, thread_id)
    wait(demo.alice, lambda: present(demo.alice) == ["alice (you)", "bob"])

    demo.bob.find_element(By.ID, "content").send_keys("I think we")  # typed, key by key
    wait(demo.alice, lambda: demo.alice.find_element(By.ID, "typing").text == "bob is typing…")
    assert demo.bob.find_element(By.ID, "typing").text == ""  # not to the one typing
    demo.bob.find_element(By.ID, "send").click()
    wait(demo.alice, lambda: demo.alice.find_element(By.ID, "typing").text == "")  # the message came instead
    shown = demo.alice.find_element(By.CSS_SELECTOR, "#messages li.user time")
    assert shown.get_attribute("datetime") and shown.text  # each message says when

    demo.bob.find_element(By.ID, "sign-out").click()
    wait(demo.alice, lambda: present(demo.alice) == ["alice (you)"])


def test_assistants_answer_in_rounds_chosen_next_to_the_picker(demo):
    new_thread(demo.alice)
    Select(demo.alice.find_element(By.ID, "rounds")).select_by_visible_text("2")
    send(demo.alice, "Two rounds, please")
    replies = wait(demo.alice, lambda: (shown := demo.alice.execute_script(ALL_REPLIES)) and len(shown) == 2
                   and not any(reply["writing"] for reply in shown) and shown)
    assert replies[1]["text"].endswith("(2 messages in its context)")  # the second saw the first
    Select(demo.alice.find_element(By.ID, "rounds")).select_by_visible_text("1")


def test_a_removed_member_and_a_deleted_thread_send_their_windows_back_to_the_list(demo):
    thread_id = new_thread(demo.alice, "bob")
    open_thread(demo.bob, thread_id)
    open_thread(demo.alice2, thread_id)

    members = demo.alice.find_element(By.ID, "members-input")
    members.clear()
    members.send_keys("carol")
    demo.alice.find_element(By.CSS_SELECTOR, "#members-form button").click()
    wait(demo.bob, lambda: not demo.bob.find_element(By.ID, "thread").is_displayed())  # closed with 4403
    assert notice(demo.bob) == "You were removed from that thread."
    wait(demo.bob, lambda: not demo.bob.find_elements(By.CSS_SELECTOR, f'[data-thread-id="{thread_id}"]'))
    assert demo.alice.find_element(By.ID, "thread-people").text == "Owner: alice. Members: carol."

    demo.alice.find_element(By.ID, "delete-thread").click()
    demo.alice.switch_to.alert.accept()
    wait(demo.alice2, lambda: not demo.alice2.find_element(By.ID, "thread").is_displayed())  # closed with 4404
    assert notice(demo.alice2) == "That thread was deleted."
    wait(demo.alice, lambda: notice(demo.alice) == "Thread deleted.")


def test_an_expired_token_asks_to_sign_in_again(demo):
    # Signed with the secret the server generated and keeps in its database, as `python auth.py` does.
    secret = stored_setting(f"sqlite:///{demo.server.workdir}/gainz.db", JWT_SECRET_SETTING)
    token = JWTSettings(secret=secret).mint("alice", hours=5 / 3600)
    driver = demo.alice2
    driver.find_element(By.ID, "sign-out").click()
    driver.find_element(By.ID, "token-input").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    new_thread(driver)
    wait(driver, lambda: driver.find_element(By.ID, "signin").is_displayed())  # closed with 4401
    assert notice(driver) == "Your token has expired: sign in again."
    assert driver.execute_script("return sessionStorage.getItem('token')") is None


TOOL_CALLS = """
return [...document.querySelectorAll('#messages li.tool')].map((item) => ({
  who: item.querySelector('.who').textContent, arguments: item.querySelector('.text').textContent,
  output: item.querySelector('.output') && item.querySelector('.output').textContent,
  form: !!item.querySelector('form')}));
"""


def test_tool_calls_show_in_the_conversation_and_any_member_answers_a_client_tool(demo):
    thread_id = new_thread(demo.alice, "bob")
    demo.alice.execute_script("document.querySelector('#assistants details').open = true")  # maybe open already
    demo.alice.find_element(By.ID, "assistant-name").send_keys("clerk")
    demo.alice.find_element(By.ID, "assistant-tools").send_keys(
        '["current_time", {"type": "function", "name": "lookup"}]')
    demo.alice.find_element(By.CSS_SELECTOR, "#new-assistant button").click()
    wait(demo.alice, lambda: "clerk" in demo.alice.find_element(By.ID, "assistant-picker").text)
    open_thread(demo.bob, thread_id)

    send(demo.alice, 'call lookup {"order": "7"} and call current_time')
    calls = wait(demo.bob, lambda: (shown := demo.bob.execute_script(TOOL_CALLS)) and len(shown) == 2
                 and shown[1]["output"] and shown[0]["form"] and shown)
    assert calls[0]["who"].startswith("Tool call: lookup") and calls[0]["arguments"] == '{"order": "7"}'
    assert calls[1]["who"] == "Tool call: current_time" and calls[1]["output"].startswith("→ 20")
    demo.bob.find_element(By.CSS_SELECTOR, "#messages li.tool input").send_keys("in the mail")
    demo.bob.find_element(By.CSS_SELECTOR, "#messages li.tool form button").click()

    for driver in (demo.alice, demo.bob):
        reply = wait(driver, lambda d=driver: (shown := last_reply(d)) and not shown["writing"] and shown)
        assert 'lookup returned "in the mail"' in reply["text"]
        shown = driver.execute_script(TOOL_CALLS)
        assert shown[0]["output"] == "→ in the mail" and not shown[0]["form"]
    # Reloaded, the calls come from the store, before the reply.
    demo.alice.refresh()
    wait(demo.alice, lambda: connected(demo.alice) and len(demo.alice.execute_script(TOOL_CALLS)) == 2)
    kinds = demo.alice.execute_script(
        "return [...document.querySelectorAll('#messages li')].map((item) => item.className)")
    assert kinds == ["message user", "message tool", "message tool", "message assistant"]
    assert stored_messages(demo, demo.alice, thread_id)[1]["content"] == "in the mail"
