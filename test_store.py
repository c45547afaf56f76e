"""The store on both engines (SQLite in a temporary file, a real PostgreSQL in a schema of its own):
schema, assistants per owner, threads and access, paging, the run queue, leases and limits. Two Store
objects on one database stand in for two processes."""

import asyncio
import os
import time
from unittest.mock import ANY

import pytest

from store import (
    MIGRATIONS,
    BadPage,
    Conflict,
    LeaseLost,
    LimitReached,
    Limits,
    NotFound,
    Page,
    Store,
    database_for,
    stored_setting,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def open_store(database_url):
    """Stores on the test database (call it again for a second 'process'); all closed at the end."""
    opened = []

    async def make(limits: Limits = Limits()) -> Store:
        store = Store(database_for(database_url), limits)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store):
    return await open_store()


async def expire_lease(store: Store, thread_id: str) -> None:
    """As if the lease's time had run out (the runner stopped renewing it)."""
    await store.db.transaction(lambda tx: tx.run("UPDATE threads SET runner_until = ? WHERE id = ?",
                                                 time.time() - 1, thread_id))


async def shared_default(store: Store):
    return await store.ensure_shared("assistant", "model-a", "Be helpful.")


# ---------------------------------------------------------------- schema and settings

async def test_the_schema_is_created_once_and_a_newer_one_is_refused(open_store, store):
    await store.migrate()  # again: nothing to do
    async def one_version_ahead(tx):
        assert (await tx.one("SELECT version FROM schema_version"))["version"] == len(MIGRATIONS)
        await tx.run("UPDATE schema_version SET version = ?", len(MIGRATIONS) + 1)
    await store.db.transaction(one_version_ahead)
    with pytest.raises(RuntimeError, match="newer than this code"):
        await open_store()


async def test_a_setting_is_made_once_even_when_processes_race_for_it(open_store):
    stores = [await open_store() for _ in range(3)]
    results = await asyncio.gather(*(store.setting("secret", lambda n=n: f"value-{n}")
                                     for n, store in enumerate(stores * 3)))
    assert len({value for value, _ in results}) == 1
    assert sum(made for _, made in results) == 1


def test_reading_a_setting_never_creates_the_database(tmp_path):
    url = f"sqlite:///{tmp_path}/absent.db"
    assert stored_setting(url, "jwt_secret") is None
    assert not (tmp_path / "absent.db").exists()


async def test_only_one_process_holds_the_database_unless_told_otherwise(open_store):
    first, second = await open_store(), await open_store()
    assert await first.db.hold_process_lock()
    assert not await second.db.hold_process_lock()


def test_database_urls_are_checked():
    for url in ("mysql://x", "sqlite://", "gainz.db"):
        with pytest.raises(ValueError, match="DATABASE_URL"):
            database_for(url)
    assert database_for("sqlite:////tmp/x.db").path == "/tmp/x.db"
    assert database_for("sqlite:///x.db").path == "x.db"


# ---------------------------------------------------------------- assistants

async def test_assistants_belong_to_their_owner_and_hide_a_shared_namesake(store):
    shared = await shared_default(store)
    mine, created = await store.create_or_load_assistant("alice", "assistant", "model-b", "Alice's own.")
    assert created
    assert mine.owner == "alice"
    assert (await store.find_assistant("alice", "assistant")).id == mine.id
    assert (await store.find_assistant("bob", "assistant")).id == shared.id
    assert (await store.find_assistant("alice", shared.id)).id == shared.id  # by id, the shared one is still there
    with pytest.raises(NotFound):
        await store.find_assistant("bob", mine.id)
    listed = await store.list_assistants("bob", Page())
    assert [assistant.id for assistant in listed.data] == [shared.id]
    hidden = await store.list_assistants("alice", Page())
    assert [assistant.id for assistant in hidden.data] == [mine.id]  # her own hides the shared namesake


async def test_create_or_load_returns_the_existing_assistant_unchanged(store):
    first, created = await store.create_or_load_assistant("alice", "poet", "m", "Rhyme.")
    again, created_again = await store.create_or_load_assistant("alice", "poet", "other", "Prose.")
    assert (created, created_again) == (True, False)
    assert again == first


async def test_racing_creates_make_one_assistant(open_store):
    stores = [await open_store() for _ in range(2)]
    results = await asyncio.gather(*(store.create_or_load_assistant("alice", "racer", "m", "")
                                     for store in stores * 5))
    assert len({assistant.id for assistant, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_a_user_may_own_only_so_many_assistants(open_store):
    store = await open_store(Limits(assistants_per_user=3))
    for n in range(3):
        await store.create_or_load_assistant("alice", f"a{n}", "m", "")
    with pytest.raises(LimitReached, match="at most 3"):
        await store.create_or_load_assistant("alice", "a3", "m", "")
    await store.create_or_load_assistant("bob", "a3", "m", "")  # per user
    await store.delete_assistant("alice", "a0")
    await store.create_or_load_assistant("alice", "a3", "m", "")


async def test_only_the_owner_deletes_an_assistant_and_shared_ones_stay(store):
    shared = await shared_default(store)
    mine, _ = await store.create_or_load_assistant("alice", "poet", "m", "")
    for sub, ref in (("bob", mine.id), ("alice", shared.id), ("alice", "assistant")):
        with pytest.raises(NotFound):
            await store.delete_assistant(sub, ref)
    await store.delete_assistant("alice", "poet")
    with pytest.raises(NotFound):
        await store.find_assistant("alice", mine.id)


async def test_a_declared_shared_assistant_follows_its_declaration(store):
    first = await store.ensure_shared("helper", "m1", "One.", assistant_id="asst_kept")
    assert first.id == "asst_kept"
    updated = await store.ensure_shared("helper", "m2", "Two.", update=True)
    assert (updated.id, updated.model, updated.instructions) == ("asst_kept", "m2", "Two.")
    unchanged = await store.ensure_shared("helper", "m3", "Three.")
    assert unchanged.model == "m2"


# ---------------------------------------------------------------- threads

async def test_a_foreign_thread_and_a_missing_one_are_the_same_not_found(store):
    thread = await store.create_thread("alice", ["bob", "bob", "alice"], None)
    assert thread.members == ("bob",)
    assert (await store.visible_thread(thread.id, "bob")).id == thread.id
    errors = []
    for thread_id, sub in ((thread.id, "carol"), ("thread_missing", "alice")):
        with pytest.raises(NotFound) as raised:
            await store.visible_thread(thread_id, sub)
        errors.append(raised.value.message)
    assert errors[0] == errors[1]


async def test_members_change_and_lose_access_at_once(store):
    thread = await store.create_thread("alice", ["bob", "carol"], "plans")
    changed, removed = await store.update_thread(thread.id, "alice", ["carol", "dave"], "new plans")
    assert removed == {"bob"}
    assert (changed.members, changed.title) == (("carol", "dave"), "new plans")
    with pytest.raises(NotFound):
        await store.visible_thread(thread.id, "bob")
    assert (await store.visible_thread(thread.id, "dave")).id == thread.id
    with pytest.raises(NotFound):
        await store.update_thread(thread.id, "carol", [], None)  # only the owner


async def test_a_deleted_thread_takes_its_messages_and_runs_with_it(store):
    assistant = await shared_default(store)
    thread = await store.create_thread("alice", ["bob"], None)
    await store.submit(thread.id, "alice", "hello", [assistant])
    with pytest.raises(NotFound):
        await store.delete_thread(thread.id, "bob")
    await store.delete_thread(thread.id, "alice")
    with pytest.raises(NotFound):
        await store.visible_thread(thread.id, "alice")
    assert (await store.list_messages(thread.id, Page())).data == []
    assert await store.threads_waiting_for_a_runner() == []


async def test_threads_list_the_most_recently_updated_first_and_take_their_title_from_the_first_message(store):
    threads = [await store.create_thread("alice", ["bob"] if n % 2 else [], None) for n in range(4)]
    await store.submit(threads[1].id, "alice", "  an   early  question that is long " + "x" * 100, [])
    listed = await store.list_threads("alice", Page())
    assert listed.data[0].id == threads[1].id
    assert listed.data[0].title.startswith("an early question that is long")
    assert len(listed.data[0].title) <= 80
    assert [thread.id for thread in (await store.list_threads("bob", Page())).data] == [threads[1].id, threads[3].id]


async def test_a_user_may_own_only_so_many_threads(open_store):
    store = await open_store(Limits(threads_per_user=2))
    for _ in range(2):
        await store.create_thread("alice", [], None)
    with pytest.raises(LimitReached):
        await store.create_thread("alice", [], None)


# ---------------------------------------------------------------- paging

async def test_pages_walk_forwards_and_backwards_without_gaps_or_repeats(store):
    thread = await store.create_thread("alice", [], None)
    ids = [(await store.submit(thread.id, "alice", f"m{n}", [])).message.id for n in range(7)]
    page, seen = Page(limit=3), []
    while True:
        listing = await store.list_messages(thread.id, page)
        seen += [message.id for message in listing.data]
        if not listing.has_more:
            break
        page = Page(limit=3, after=seen[-1])
    assert seen == ids
    newest_first = await store.list_messages(thread.id, Page(limit=3, order="desc"))
    assert [message.id for message in newest_first.data] == ids[::-1][:3]
    assert newest_first.has_more
    before = await store.list_messages(thread.id, Page(limit=2, before=ids[4]))
    assert [message.id for message in before.data] == ids[2:4]
    assert before.has_more
    between = await store.list_messages(thread.id, Page(after=ids[1], before=ids[5]))
    assert [message.id for message in between.data] == ids[2:5]
    assert not between.has_more


async def test_a_page_cursor_from_another_list_is_refused(store):
    mine = await store.create_thread("alice", [], None)
    theirs = await store.create_thread("bob", [], None)
    message = (await store.submit(theirs.id, "bob", "secret", [])).message
    with pytest.raises(BadPage, match="after"):
        await store.list_messages(mine.id, Page(after=message.id))
    with pytest.raises(BadPage, match="before"):
        await store.list_threads("alice", Page(before=theirs.id))


# ---------------------------------------------------------------- runs

async def test_runs_wait_in_arrival_order_and_each_thread_bounds_its_queue(open_store):
    store = await open_store(Limits(waiting_runs_per_thread=3))
    assistant = await shared_default(store)
    thread = await store.create_thread("alice", ["bob"], None)
    first = await store.submit(thread.id, "alice", "one", [assistant, assistant])
    await store.submit(thread.id, "bob", "two", [assistant])
    with pytest.raises(LimitReached) as full:
        await store.submit(thread.id, "bob", "three", [assistant])
    assert full.value.retry_after
    assert [message.content for message in (await store.list_messages(thread.id, Page())).data] == ["one", "two"]
    started, _ = await store.start_next_run(thread.id, "p1", 30)
    assert started.id == first.runs[0].id


async def test_a_user_bounds_their_runs_across_threads_even_when_processes_race(open_store):
    stores = [await open_store(Limits(runs_per_user=4)) for _ in range(2)]
    assistant = await shared_default(stores[0])
    threads = [await stores[0].create_thread("alice", [], None) for _ in range(6)]
    outcomes = await asyncio.gather(*(store.submit(thread.id, "alice", "hi", [assistant])
                                      for store, thread in zip(stores * 3, threads)), return_exceptions=True)
    assert sum(not isinstance(outcome, Exception) for outcome in outcomes) == 4
    assert all(isinstance(outcome, LimitReached) for outcome in outcomes if isinstance(outcome, Exception))
    await stores[0].submit(threads[0].id, "bob", "hi", [assistant])  # another user is not affected


async def test_one_process_runs_a_thread_until_its_lease_runs_out(open_store):
    first, second = await open_store(), await open_store()
    assistant = await shared_default(first)
    thread = await first.create_thread("alice", [], None)
    submission = await first.submit(thread.id, "alice", "hi", [assistant])
    run, _ = await first.start_next_run(thread.id, "p1", 30)
    with pytest.raises(LeaseLost):
        await second.start_next_run(thread.id, "p2", 30)
    await expire_lease(first, thread.id)
    again, _ = await second.start_next_run(thread.id, "p2", 30)
    assert (again.id, again.attempts) == (submission.runs[0].id, 2)  # cut off once: it runs again
    with pytest.raises(LeaseLost):
        await first.finish_run(run, "p1", "completed", reply="too late")
    with pytest.raises(LeaseLost):
        await first.renew_thread(thread.id, "p1", 30)
    reply, following = await second.finish_run(again, "p2", "completed", reply="in time",
                                               usage={"input_tokens": 3, "output_tokens": 2}, next_lease=30)
    assert (reply.run_id, following) == (again.id, None)  # none left: the thread is let go
    (ended,) = await second.runs([again.id])
    assert (ended.status, ended.reply_id, ended.usage) == ("completed", reply.id,
                                                           {"input_tokens": 3, "output_tokens": 2})
    assert await first.start_next_run(thread.id, "p1", 30) is None
    assert [m.content for m in (await second.list_messages(thread.id, Page())).data] == ["hi", "in time"]


async def test_a_runs_end_starts_the_next_run_or_lets_the_thread_go(open_store):
    first, second = await open_store(), await open_store()
    assistant = await shared_default(first)
    thread = await first.create_thread("alice", [], None)
    submission = await first.submit(thread.id, "alice", "hi", [assistant, assistant])
    one, _ = await first.start_next_run(thread.id, "p1", 30)
    _, (two, _) = await first.finish_run(one, "p1", "completed", reply="one", next_lease=30)
    assert ([one.id, two.id], two.status) == ([run.id for run in submission.runs], "active")
    with pytest.raises(LeaseLost):  # still the first process's
        await second.start_next_run(thread.id, "p2", 30)
    later = await first.submit(thread.id, "alice", "more", [assistant])
    assert await first.finish_run(two, "p1", "completed", reply="two") == (ANY, None)  # stopping: let go
    three, _ = await second.start_next_run(thread.id, "p2", 30)
    assert three.id == later.runs[0].id


async def test_threads_left_by_a_stopped_process_are_found_again(store):
    assistant = await shared_default(store)
    thread = await store.create_thread("alice", [], None)
    await store.submit(thread.id, "alice", "hi", [assistant])
    assert await store.threads_waiting_for_a_runner() == [thread.id]
    await store.start_next_run(thread.id, "p1", 30)
    assert await store.threads_waiting_for_a_runner() == []
    await expire_lease(store, thread.id)  # the process died
    assert await store.threads_waiting_for_a_runner() == [thread.id]


async def test_cancelling_a_queued_run_ends_it_and_an_active_one_is_marked_for_its_runner(store):
    assistant = await shared_default(store)
    thread = await store.create_thread("alice", ["bob"], None)
    submission = await store.submit(thread.id, "alice", "hi", [assistant, assistant])
    active_id, queued_id = (run.id for run in submission.runs)
    await store.start_next_run(thread.id, "p1", 30)
    queued = await store.request_cancel(thread.id, queued_id, "bob")
    assert (queued.status, queued.cancelled_by) == ("cancelled", "bob")
    active = await store.request_cancel(thread.id, active_id, "bob")
    assert (active.status, active.cancelled_by) == ("active", "bob")
    assert await store.renew_thread(thread.id, "p1", 30) == {active_id: "bob"}
    partial, _ = await store.finish_run(active, "p1", "cancelled", reply="half a")
    assert partial.cancelled is True
    with pytest.raises(Conflict):
        await store.request_cancel(thread.id, active_id, "alice")
    other = await store.create_thread("bob", [], None)
    with pytest.raises(NotFound):
        await store.request_cancel(other.id, queued_id, "bob")
    assert await store.start_next_run(thread.id, "p1", 30) is None


async def test_the_sqlite_file_is_readable_by_its_owner_only(tmp_path):
    store = Store(database_for(f"sqlite:///{tmp_path}/private.db"))
    await store.open()
    await store.close()
    assert os.stat(tmp_path / "private.db").st_mode & 0o077 == 0
