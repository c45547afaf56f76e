"""Which listeners are on which thread in this process, and a fan-out that never waits on any of them.

A listener is a WebSocket, an event stream (SSE) or a request waiting for its runs. Each has its own
bounded backlog, so delivering an event only appends and returns. A listener that falls behind has
its pending `text.delta` frames of one run merged into one (nothing is dropped); past the bound it
is closed; a run's final event never counts against the bound. With a coalescing window, a socket
sends at most one `text.delta` frame per window: deltas that come sooner merge into the next frame the
same way. The broker hands the hub each
thread's events in `seq` order, from whichever process published them; the hub knows nothing of
where they came from.
"""

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from starlette import status
from starlette.websockets import WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from broker import TERMINAL, UNLOGGED, Broker, BrokerUnavailable, CatchUp, Event, encode, presence_signal
from errors import LimitReached

log = logging.getLogger("gainz")

SLOW_CONSUMER_CLOSE_CODE = status.WS_1013_TRY_AGAIN_LATER
WS_REMOVED_FROM_THREAD = 4403
WS_THREAD_DELETED = 4404
CLIENT_GONE = (WebSocketDisconnect, ClientDisconnected, OSError)  # a client that left mid-send: nothing to report
MAX_BACKLOG_CHARS = 512 * 1024
TYPING_SECONDS = 2.0  # at most one `typing` per user and thread this often, service-wide


def counted(event: Event) -> int:
    """The characters an event counts against a listener's bound. A run's final event counts none: it
    carries the whole reply, so counting it would close a client that kept up with a long reply just as
    the reply ends. A client that does not keep up is closed by the run's deltas, which count, and the
    final event's text is encoded once for every listener, so holding it costs each only a reference."""
    return 0 if event.type in TERMINAL else len(event.text)


class TooManySockets(LimitReached):
    def __init__(self, limit: int):
        super().__init__(f"at most {limit} sockets per user")


class Closed(Exception):
    """The listener was closed; `code` says why (a WebSocket close code)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Frame:
    """A frame waiting in one listener's backlog; a `text.delta` one may still take in later deltas."""

    __slots__ = ("deltas", "event", "seq", "size")

    def __init__(self, event: Event):
        self.event = event
        self.deltas: list[str] | None = None  # once a later delta of the same run was merged in
        self.seq = event.seq
        self.size = counted(event)

    @property
    def type(self) -> str:
        return self.event.type

    @property
    def run_id(self) -> str | None:
        return self.event.run_id

    def merge(self, event: Event) -> int:
        if self.deltas is None:
            self.deltas = [self.event.delta or ""]
        self.deltas.append(event.delta or "")
        self.seq = event.seq  # a merged delta carries its last delta's seq
        self.size += len(event.delta or "")
        return len(event.delta or "")

    def text(self, thread_id: str) -> str:
        if self.deltas is None:
            return self.event.text
        # Joined once, when sent: appending to one string per merge would cost the square of the backlog.
        return encode({"seq": self.seq, "type": "text.delta", "thread_id": thread_id, "run_id": self.event.run_id,
                       "delta": "".join(self.deltas)})


class Connection:
    """One listener on one thread: its backlog, drained by whoever serves the listener (`get`) or, for a socket,
    sent as it fills (`serving`). An idle socket holds no task, future or queue of its own: the writer runs only
    while there is something to send, and the socket's own task reads the client's frames."""

    __slots__ = ("_send", "_waiter", "backlog", "backlog_chars", "close_code", "coalesce_seconds", "endpoint",
                 "expiry", "floor", "held", "held_chars", "interrupted", "live", "max_backlog_chars", "next_delta_at",
                 "reading", "slot", "sub", "thread_id", "writer")

    def __init__(self, thread_id: str, sub: str, max_backlog_chars: int, coalesce_seconds: float = 0.0):
        self.thread_id = thread_id
        self.sub = sub
        self.max_backlog_chars = max_backlog_chars
        self.coalesce_seconds = coalesce_seconds
        self.backlog: deque[Frame] | None = None  # only while it holds frames: an empty deque takes 600 bytes
        self.backlog_chars = 0
        self.floor: int | None = None  # events up to this seq are covered; None: still joining, hold them
        self.held: list[Event] | None = None
        self.held_chars = 0
        self.close_code: int | None = None
        self.slot: str | None = None  # a socket or event stream: the slot it holds, and it hears presence and typing
        self.live = True  # False: joined while the broker was down, so its events may never come
        self.endpoint = asyncio.current_task()  # serves the listener; done once it has closed it
        self.writer: asyncio.Task | None = None  # a socket's, while it has frames to send (or once it failed)
        self.next_delta_at = 0.0  # with a coalescing window: the loop time before which no text.delta is sent
        self.reading = False  # the endpoint is in its `serving` block: closing the listener interrupts it
        self.interrupted = False
        self.expiry: asyncio.TimerHandle | None = None
        self._send: Callable[[str], Awaitable[None]] | None = None
        self._waiter: asyncio.Future | None = None  # `get` waiting for a frame

    def start(self, floor: int, first: list[Event]) -> None:
        """Begin with `first` (thread.joined, then what the client missed); then the events after `floor`."""
        held, self.held, self.held_chars, self.floor = self.held, None, 0, floor
        for event in first:
            self.send_now(event)
        for event in held or ():
            self.offer(event)

    def offer(self, event: Event) -> bool:
        """Queue a thread event without waiting, unless already covered; False when over the bound."""
        if self.close_code is not None:
            return True
        if self.floor is None:
            if self.held is None:
                self.held = []
            self.held.append(event)
            self.held_chars += counted(event)
            return self.held_chars <= self.max_backlog_chars
        if event.type in UNLOGGED:
            return self.send_now(event)
        if event.seq <= self.floor:
            return True
        self.floor = event.seq
        return self.send_now(event)

    def send_now(self, event: Event) -> bool:
        """Queue a frame whatever its seq: `resync`, or an `error` for this listener alone."""
        if self.backlog is None:
            self.backlog = deque()
        last = self.backlog[-1] if self.backlog else None
        if (event.type == "text.delta" and last is not None and last.type == "text.delta"
                and last.run_id == event.run_id):
            self.backlog_chars += last.merge(event)  # the writer takes a frame out before sending it
        else:
            frame = Frame(event)
            self.backlog.append(frame)
            self.backlog_chars += frame.size
            self._wake()
            if self._send is not None and self.writer is None:
                self.writer = asyncio.create_task(self._write())
        return self.backlog_chars <= self.max_backlog_chars

    def note(self, event: dict) -> None:
        """A frame for this listener alone (an `error` reply to its own bad frame)."""
        self.send_now(Event(self.floor or 0, event["type"], None, None, encode(event)))

    async def get(self, within: float | None = None) -> Frame | None:
        """The next frame; None if none came `within` so many seconds; raises Closed once the listener is closed."""
        while not self.backlog:
            if self.close_code is not None:
                raise Closed(self.close_code)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, within)
            except TimeoutError:
                return None
            finally:
                self._waiter = None
        return self._take()

    def _take(self) -> Frame:
        assert self.backlog
        frame = self.backlog.popleft()
        self.backlog_chars -= frame.size
        if not self.backlog:
            self.backlog = None
        return frame

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def serving(self, send: Callable[[str], Awaitable[None]], until: float, expired_code: int) -> "Connection":
        """A socket's life once accepted, as a `with` block around the loop that reads the client's frames: its
        frames go to `send` as they come, until the client leaves or the listener is closed, which interrupts
        the block (and ends it quietly); at `until` (unix time) it is closed with `expired_code`. Afterwards
        `close_code` is the code to close the socket with (None when the client left)."""
        self._send = send
        self.expiry = asyncio.get_running_loop().call_later(max(0.0, until - time.time()), self.close, expired_code)
        return self

    def __enter__(self) -> "Connection":
        if self.backlog:
            self.writer = asyncio.create_task(self._write())
        self.reading = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> bool:
        self.reading = False
        self._send = None
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        # Interrupted by `_interrupt` (and by nothing else): the block ends as if it had returned.
        return (kind is asyncio.CancelledError and self.interrupted and self.endpoint is not None
                and self.endpoint.uncancel() == 0)

    def _interrupt(self) -> None:
        """The endpoint's `serving` block ends: it stops reading the client's frames."""
        if self.reading and not self.interrupted and self.endpoint is not None:
            if asyncio.current_task() is self.endpoint:
                # Not now but once it waits: a task that cancelled itself and then left the block without waiting
                # would carry the cancellation into its clean-up (Python 3.11's uncancel does not clear it).
                asyncio.get_running_loop().call_soon(self._interrupt)
                return
            self.interrupted = True
            self.endpoint.cancel()

    async def _write(self) -> None:
        """Send the backlog's frames, then end: a socket has a writer only while it has frames to send."""
        loop = asyncio.get_running_loop()
        try:
            while self.backlog and self._send is not None:
                if self.coalesce_seconds and len(self.backlog) == 1 and self.backlog[0].type == "text.delta":
                    wait = self.next_delta_at - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)  # the coalescing window: deltas that come meanwhile merge into it
                        continue
                frame = self._take()
                if self.coalesce_seconds and frame.type == "text.delta":
                    self.next_delta_at = loop.time() + self.coalesce_seconds
                await self._send(frame.text(self.thread_id))
        except CLIENT_GONE:
            self._send = None  # the client left mid-send: nothing to report, and nothing more to send
            self._interrupt()
            return
        except Exception:
            self._send = None  # kept as the writer: whoever ends the membership logs the failure
            self._interrupt()
            raise
        self.writer = None

    def close(self, code: int) -> None:
        """Stop delivering, even in the middle of a send to a socket that stopped reading; whoever serves
        the listener sees `get` raise Closed (or its `serving` block end) and closes it with `code`."""
        if self.close_code is None:
            self.close_code = code
            self.backlog = None
            self.backlog_chars = 0
            self._wake()
            if self.writer is not None:
                self.writer.cancel()
            self._interrupt()


class Membership:
    """One listener's place on a thread, for an `async with` block: it joins on entering and leaves on leaving,
    however the block ends. A class, not a generator: an idle socket keeps it for as long as it stays open."""

    __slots__ = ("after", "connection", "hub", "occupied", "socket_limit")

    def __init__(self, hub: "Hub", connection: Connection, socket_limit: int | None = None, after: int | None = None):
        self.hub, self.connection, self.socket_limit, self.after = hub, connection, socket_limit, after
        self.occupied = False

    async def __aenter__(self) -> Connection:
        hub, connection = self.hub, self.connection
        # First: what comes while it joins (others' presence included) waits for it.
        hub.threads.setdefault(connection.thread_id, set()).add(connection)
        try:
            if connection.slot is None:  # a request waiting for its runs: it only listens
                await self._listen()
            else:
                assert self.socket_limit is not None
                await self._join(self.socket_limit)
        except BaseException:
            await self._leave()
            raise
        return connection

    async def _join(self, socket_limit: int) -> None:
        hub, connection = self.hub, self.connection
        thread_id, sub, slot = connection.thread_id, connection.sub, connection.slot
        assert slot is not None
        occupied = await hub.broker.occupy(sub, thread_id, slot, socket_limit)
        if occupied is None:
            raise TooManySockets(socket_limit)
        self.occupied = True
        if occupied.mine == 1:
            hub.broker.signal(presence_signal(thread_id, sub, 1, slot))
        catch_up = await hub._watch(connection, self.after)
        first = [Event.create(catch_up.seq, {
            "type": "thread.joined", "thread_id": thread_id, "clients": occupied.clients,
            "present": occupied.present, "active_run": catch_up.active_run})]
        if self.after is not None and catch_up.missed is None:
            first.append(hub.resync_event(thread_id, catch_up.seq))
        hub._start(connection, catch_up.seq, first + (catch_up.missed or []))

    async def _listen(self) -> None:
        try:
            catch_up = await self.hub._watch(self.connection, None)
        except BrokerUnavailable:
            catch_up, self.connection.live = CatchUp(0, None, None), False
        self.hub._start(self.connection, catch_up.seq, [])

    async def __aexit__(self, *exc_info: object) -> None:
        await self._leave()

    async def _leave(self) -> None:
        """Out of the thread, its slot given back; its writer, if any, done."""
        hub, connection = self.hub, self.connection
        thread_id, sub, slot = connection.thread_id, connection.sub, connection.slot
        if self.occupied:
            assert slot is not None
            with contextlib.suppress(Exception):  # the broker may be down: the slot then lapses by itself
                if await hub.broker.vacate(sub, thread_id, slot) == 0:
                    hub.broker.signal(presence_signal(thread_id, sub, 0, slot))
        connection.close(status.WS_1000_NORMAL_CLOSURE)
        hub._remove(connection)
        if thread_id not in hub.threads:
            # A watch still in flight is undone by this: whoever joins next must start a new one.
            hub._watching.pop(thread_id, None)
            with contextlib.suppress(Exception):  # the broker may be down: nothing to undo then
                await hub.broker.unwatch(thread_id)
        if connection.writer is not None:
            await asyncio.wait([connection.writer])
            if not connection.writer.cancelled() and (error := connection.writer.exception()):
                log.error("writing to a socket failed", exc_info=error)


class Hub:
    def __init__(self, broker: Broker, max_backlog_chars: int = MAX_BACKLOG_CHARS, coalesce_seconds: float = 0.0):
        self.broker = broker
        self.max_backlog_chars = max_backlog_chars
        self.coalesce_seconds = coalesce_seconds
        self.threads: dict[str, set[Connection]] = {}
        self._watching: dict[str, asyncio.Future] = {}  # thread id -> the broker's watch of it, while in flight
        self._slots = itertools.count()
        self.closed_with: int | None = None  # once close_all: every listener that joins later is closed so too

    def joined(self, thread_id: str, sub: str, socket_limit: int, after: int | None = None) -> Membership:
        """A socket or event stream on the thread for an `async with` block. It takes one of the user's slots, counts
        in `clients` and `present`, hears `presence` and `typing`, and begins with `thread.joined` and, with
        `after`, every event it missed (or `resync`)."""
        connection = Connection(thread_id, sub, self.max_backlog_chars, self.coalesce_seconds)
        connection.slot = f"{self.broker.process_id}:{next(self._slots)}"
        return Membership(self, connection, socket_limit, after)

    def listening(self, thread_id: str, sub: str) -> Membership:
        """Hear the thread's events from the next one on, for an `async with` block: a request waiting for its own
        runs. While the broker is down it hears nothing, and learns from the store that its runs ended."""
        return Membership(self, Connection(thread_id, sub, self.max_backlog_chars, self.coalesce_seconds))

    async def _watch(self, connection: Connection, after: int | None) -> CatchUp:
        """Once the broker watches the thread, what this listener missed since `after`. Listeners joining at once
        share the one watch in flight: none may catch up before it is confirmed, or it would miss what is
        published in between."""
        thread_id = connection.thread_id
        watching = self._watching.get(thread_id)
        if watching is None:
            watching = self._watching[thread_id] = asyncio.ensure_future(self.broker.watch(thread_id))
            watching.add_done_callback(lambda done: self._watching.pop(thread_id, None)
                                       if self._watching.get(thread_id) is done else None)
        await asyncio.shield(watching)
        return await self.broker.catch_up(thread_id, after)

    def _start(self, connection: Connection, seq: int, first: list[Event]) -> None:
        connection.start(seq, first)
        if self.closed_with is not None:  # joined while the service stops: its server would close it with 1012
            connection.close(self.closed_with)

    async def typing(self, connection: Connection) -> None:
        """The user is typing: the thread's other clients hear of it, once per TYPING_SECONDS at most."""
        with contextlib.suppress(Exception):  # a hint, not worth an error: dropped when the broker is down
            if await self.broker.claim_once(f"typing:{connection.thread_id}:{connection.sub}", TYPING_SECONDS):
                self.broker.signal({"kind": "typing", "thread_id": connection.thread_id, "user": connection.sub,
                                    "from": connection.slot})

    def announce(self, signal: dict) -> None:
        """A `presence` or `typing` signal, from any process, to this one's clients of the thread (but the one
        it came from): a frame with no seq, that no resume replays."""
        thread_id = signal["thread_id"]
        fields = ("user", "sockets") if signal["kind"] == "presence" else ("user",)
        event = Event.unlogged({"type": signal["kind"], "thread_id": thread_id} | {key: signal[key] for key in fields})
        for connection in tuple(self.threads.get(thread_id, ())):
            if connection.slot is not None and connection.slot != signal.get("from") and not connection.offer(event):
                self.drop(connection, SLOW_CONSUMER_CLOSE_CODE)

    @staticmethod
    def resync_event(thread_id: str, seq: int) -> Event:
        return Event.create(seq, {"type": "resync", "thread_id": thread_id})

    def _remove(self, connection: Connection) -> None:
        listeners = self.threads.get(connection.thread_id)
        if listeners is not None:
            listeners.discard(connection)
            if not listeners:
                del self.threads[connection.thread_id]

    def deliver(self, thread_id: str, events: list[Event]) -> None:
        """The broker's events for the thread, in seq order, to every listener on it."""
        for connection in tuple(self.threads.get(thread_id, ())):
            for event in events:
                if not connection.offer(event):
                    self.drop(connection, SLOW_CONSUMER_CLOSE_CODE)
                    break

    def resync(self, thread_id: str, seq: int) -> None:
        """Events of the thread up to `seq` were lost on the way (the broker was down): every listener
        is told to reload, then gets the events after `seq`."""
        event = self.resync_event(thread_id, seq)
        for connection in tuple(self.threads.get(thread_id, ())):
            if connection.floor is not None:
                connection.floor = max(connection.floor, seq)
                connection.send_now(event)

    def drop(self, connection: Connection, code: int) -> None:
        connection.close(code)
        self._remove(connection)

    # ------------------------------------------------------------ what changes a thread's membership, on every process

    def thread_deleted(self, thread_id: str) -> None:
        """Close the thread's listeners with 4404, on every process."""
        self.broker.signal({"kind": "thread.deleted", "thread_id": thread_id})

    def members_removed(self, thread_id: str, subs: set[str]) -> None:
        """Close the listeners of members who lost the thread with 4403, on every process."""
        if subs:
            self.broker.signal({"kind": "members.removed", "thread_id": thread_id, "subs": sorted(subs)})

    def on_signal(self, message: dict) -> None:
        """A signal from any process (this one included); those of other kinds are the engine's."""
        kind = message.get("kind")
        if kind == "thread.deleted":
            self.close_thread(message["thread_id"], WS_THREAD_DELETED)
        elif kind == "members.removed":
            self.close_thread(message["thread_id"], WS_REMOVED_FROM_THREAD, set(message["subs"]))
        elif kind in ("presence", "typing"):
            self.announce(message)

    def close_thread(self, thread_id: str, code: int, subs: set[str] | None = None) -> None:
        """Close the thread's listeners (only those of `subs`, if given) with `code`."""
        for connection in tuple(self.threads.get(thread_id, ())):
            if subs is None or connection.sub in subs:
                self.drop(connection, code)

    def close_all(self, code: int) -> list[asyncio.Task]:
        """Close every listener with `code`; returns the tasks serving them, each done once it has sent its
        client the close (a socket's close frame, an event stream's end, a waiting request's answer)."""
        self.closed_with = code
        connections = [connection for listeners in self.threads.values() for connection in listeners]
        for connection in connections:
            self.drop(connection, code)
        return [connection.endpoint for connection in connections if connection.endpoint is not None]
