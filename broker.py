"""The crossing between processes: what every process serving the service must share, live.

- Thread events: `publish` gives each one the thread's next `seq`, keeps it in the thread's log of
  recent events (for clients that resume) and hands it, in `seq` order, to every process watching the
  thread, this one included (through `deliver`).
- The run in progress on each thread, so that a client joining mid-reply gets the text so far.
- Slots: the sockets (and event streams) open per user and per thread, counted across processes; they
  are also who is present on a thread (a slot on the thread names its user).
- Signals: small messages to every process (cancel a run, a thread deleted, members removed).

`memory://` keeps all of it in this process: the default, for one process. `redis://` shares it
through Redis (see `redis_broker.py`), for several processes or hosts. Both have this interface.
"""

import json
import os
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from errors import Unavailable

TERMINAL = ("run.completed", "run.failed", "run.cancelled")
UNLOGGED = ("presence", "typing")  # live only: no seq, never in the log, never replayed on resume


def encode(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def seq_birth() -> int:
    """Where a thread's `seq` starts when its counter is (re)created: the clock in microseconds. A
    counter that was lost (Redis restarted, or the log expired) starts again above every number it
    gave out before, since no thread emits a million events a second; so a `seq` is never reused
    and a client holding an old one is told to resync, never shown someone else's events."""
    return time.time_ns() // 1000


class Event:
    """One thread event, encoded once, as every listener receives it; `seq` first."""

    __slots__ = ("delta", "run_id", "seq", "text", "type")

    def __init__(self, seq: int, type: str, run_id: str | None, delta: str | None, text: str):
        self.seq, self.type, self.run_id, self.delta, self.text = seq, type, run_id, delta, text

    @classmethod
    def create(cls, seq: int, event: dict, tail: str | None = None) -> "Event":
        """`tail` is the event encoded without its opening brace (when already at hand)."""
        tail = tail if tail is not None else encode(event)[1:]
        return cls(seq, event["type"], event.get("run_id"), event.get("delta"), f'{{"seq":{seq},{tail}')

    @classmethod
    def from_text(cls, text: str) -> "Event":
        event = json.loads(text)
        return cls(event["seq"], event["type"], event.get("run_id"), event.get("delta"), text)

    @classmethod
    def unlogged(cls, event: dict) -> "Event":
        """A `presence` or `typing` frame: it has no place in the thread's order, so it carries no seq."""
        return cls(0, event["type"], None, None, encode(event))

    def fields(self) -> dict:
        return json.loads(self.text)


class BrokerUnavailable(Unavailable):
    """The shared broker (Redis) does not answer: live events cannot be joined right now."""

    message = "live events are unavailable right now; try again shortly"


@dataclass
class CatchUp:
    """What a listener joining a thread needs: the latest `seq`, the run in progress (or None), and the
    events after the `after` it asked for, or None when they are no longer all kept (resync)."""

    seq: int
    active_run: dict | None
    missed: list[Event] | None


@dataclass
class Occupied:
    """A slot taken on a thread: who is connected to it now, and how many connections its user has there."""

    present: list[dict]  # [{"user", "sockets"}]
    mine: int  # this one included: 1 for the user's first

    @property
    def clients(self) -> int:
        return sum(entry["sockets"] for entry in self.present)


def slot_member(slot: str, sub: str) -> str:
    """A slot as a thread's set holds it: with its user (a slot never holds a line break)."""
    return f"{slot}\n{sub}"


def user_of(member: str) -> str:
    return member.split("\n", 1)[1]


def present(members) -> list[dict]:
    counts = Counter(user_of(member) for member in members)
    return [{"user": user, "sockets": counts[user]} for user in sorted(counts)]


def presence_signal(thread_id: str, user: str, sockets: int, origin: str | None = None) -> dict:
    """A user's first connection to a thread opened (1) or their last closed (0); `origin`, the slot that
    opened it, is not told of itself."""
    return {"kind": "presence", "thread_id": thread_id, "user": user, "sockets": sockets, "from": origin}


@dataclass(frozen=True)
class ResumeWindow:
    events_per_thread: int = 2000  # the last N events of each thread are kept ...
    seconds: float = 300.0  # ... until this long after the thread's last event
    events_in_all: int = 200_000  # memory:// only: past this, the threads idle longest lose theirs first


class Broker(Protocol):
    process_id: str

    async def open(self, deliver: Callable[[str, list[Event]], None], on_signal: Callable[[dict], None],
                   resync: Callable[[str, int], None]) -> None: ...
    async def close(self) -> None: ...
    def publish(self, thread_id: str, event: dict) -> None: ...
    def signal(self, message: dict) -> None: ...
    async def watch(self, thread_id: str) -> None: ...
    async def unwatch(self, thread_id: str) -> None: ...
    async def catch_up(self, thread_id: str, after: int | None) -> CatchUp: ...
    async def occupy(self, sub: str, thread_id: str, slot: str, limit: int) -> Occupied | None: ...
    async def vacate(self, sub: str, thread_id: str, slot: str) -> int: ...
    async def present(self, thread_id: str) -> list[dict]: ...
    async def claim_once(self, name: str, seconds: float) -> bool: ...
    def shared_across_processes(self) -> bool: ...
    async def ping(self) -> None: ...


def new_process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class ActiveRun:
    __slots__ = ("assistant", "parts", "run_id")

    def __init__(self, run_id: str, assistant: dict):
        self.run_id, self.assistant, self.parts = run_id, assistant, list[str]()

    def as_json(self) -> dict:
        return {"run_id": self.run_id, "assistant": self.assistant, "text": "".join(self.parts)}


def follow_active_run(active: ActiveRun | None, event: dict) -> ActiveRun | None:
    """The run in progress on a thread, after `event`."""
    kind = event["type"]
    if kind == "run.started":
        return ActiveRun(event["run_id"], event["assistant"])
    if active is not None and event.get("run_id") == active.run_id:
        if kind == "text.delta":
            active.parts.append(event["delta"])
        elif kind in TERMINAL:
            return None
    return active


class ThreadLog:
    __slots__ = ("active", "events", "last_event_at", "seq")

    def __init__(self):
        self.seq = seq_birth()
        self.events: deque[tuple[float, Event]] = deque()
        self.active: ActiveRun | None = None
        self.last_event_at = time.monotonic()


class MemoryBroker:
    """Everything in this process: right for one process, and refused at start-up for several."""

    def __init__(self, window: ResumeWindow = ResumeWindow()):
        self.window = window
        self.process_id = new_process_id()
        self.logs: OrderedDict[str, ThreadLog] = OrderedDict()  # least recently active first
        self.logged = 0
        self.watched: set[str] = set()  # threads with listeners: they keep their counter when their log goes
        self.slots: dict[str, set[str]] = {}  # "user:{sub}": its slots; "thread:{id}": its slot members
        self.claims: dict[str, float] = {}  # claim_once: name -> until when (monotonic)
        self._deliver: Callable[[str, list[Event]], None] = lambda thread_id, events: None
        self._on_signal: Callable[[dict], None] = lambda message: None

    async def open(self, deliver, on_signal, resync) -> None:
        self._deliver, self._on_signal = deliver, on_signal  # nothing is ever lost on the way: no resync

    async def close(self) -> None:
        self.logs.clear()

    def shared_across_processes(self) -> bool:
        return False

    async def ping(self) -> None:
        pass  # nothing outside this process to reach

    def _log(self, thread_id: str) -> ThreadLog:
        log = self.logs.get(thread_id)
        if log is None:
            log = self.logs[thread_id] = ThreadLog()
        elif time.monotonic() - log.last_event_at > self.window.seconds:
            self._forget_events(log)
        self.logs.move_to_end(thread_id)
        return log

    def _forget_events(self, log: ThreadLog) -> None:
        self.logged -= len(log.events)
        log.events.clear()

    def publish(self, thread_id: str, event: dict) -> None:
        log = self._log(thread_id)
        log.seq += 1
        logged = Event.create(log.seq, event)
        now = log.last_event_at = time.monotonic()
        log.events.append((now, logged))
        self.logged += 1
        if len(log.events) > self.window.events_per_thread:
            log.events.popleft()
            self.logged -= 1
        log.active = follow_active_run(log.active, event)
        self._trim(now)
        self._deliver(thread_id, [logged])

    def _trim(self, now: float) -> None:
        """Drop the logs of threads idle past the window, then, over the bound in all, the idlest ones. A thread
        with a run in progress or listeners here keeps its counter (its seq goes on by one) and run record."""
        for _ in range(len(self.logs)):  # runs on every event: it looks at the front and, mostly, stops there
            thread_id, log = next(iter(self.logs.items()))
            idle = now - log.last_event_at > self.window.seconds
            if not idle and self.logged <= self.window.events_in_all:
                return
            self._forget_events(log)
            if log.active is None and thread_id not in self.watched:
                del self.logs[thread_id]
            else:
                self.logs.move_to_end(thread_id)  # kept, and out of the way of the next event's look

    def signal(self, message: dict) -> None:
        self._on_signal(message)

    async def watch(self, thread_id: str) -> None:
        self.watched.add(thread_id)

    async def unwatch(self, thread_id: str) -> None:
        self.watched.discard(thread_id)

    async def catch_up(self, thread_id: str, after: int | None) -> CatchUp:
        log = self._log(thread_id)
        active = log.active.as_json() if log.active else None
        if after is None or after == log.seq:
            return CatchUp(log.seq, active, [] if after is not None else None)
        first = log.events[0][1].seq if log.events else log.seq + 1
        if not first - 1 <= after < log.seq:
            return CatchUp(log.seq, active, None)
        return CatchUp(log.seq, active, [event for _, event in log.events if event.seq > after])

    async def occupy(self, sub: str, thread_id: str, slot: str, limit: int) -> Occupied | None:
        mine = self.slots.setdefault(f"user:{sub}", set())
        if len(mine) >= limit:
            return None
        mine.add(slot)
        on_thread = self.slots.setdefault(f"thread:{thread_id}", set())
        on_thread.add(slot_member(slot, sub))
        return Occupied(present(on_thread), sum(user_of(member) == sub for member in on_thread))

    async def vacate(self, sub: str, thread_id: str, slot: str) -> int:
        for key, member in ((f"user:{sub}", slot), (f"thread:{thread_id}", slot_member(slot, sub))):
            slots = self.slots.get(key)
            if slots is not None:
                slots.discard(member)
                if not slots:
                    del self.slots[key]
        return sum(user_of(member) == sub for member in self.slots.get(f"thread:{thread_id}", ()))

    async def present(self, thread_id: str) -> list[dict]:
        return present(self.slots.get(f"thread:{thread_id}", ()))

    async def claim_once(self, name: str, seconds: float) -> bool:
        now = time.monotonic()
        if len(self.claims) > 10_000:  # typing claims, one per user and thread: forget the lapsed ones
            self.claims = {key: until for key, until in self.claims.items() if until > now}
        if self.claims.get(name, 0.0) > now:
            return False
        self.claims[name] = now + seconds
        return True


def broker_for(url: str, window: ResumeWindow = ResumeWindow(), prefix: str = "gainz:",
               slot_seconds: float = 30.0) -> Broker:
    """`memory://` (the default) or `redis://...` / `rediss://...`; `prefix` starts every Redis key and
    channel, so that several services (or tests) can share one Redis; `slot_seconds`: how long the slots
    of a process that died stay taken (in Redis: one process cannot outlive itself)."""
    if url in ("", "memory://"):
        return MemoryBroker(window)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from redis_broker import RedisBroker  # the redis package is only needed with a redis:// URL

        return RedisBroker(url, window, prefix, slot_seconds)
    raise ValueError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {url!r}")
