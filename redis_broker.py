"""The broker through Redis (`REDIS_URL=redis://...`), for several processes or hosts: see broker.py.

Per thread, Redis holds a counter (the thread's `seq`), a Stream of its recent events (the log clients
resume from, capped at RESUME_EVENTS entries, each entry's id its `seq`) and the run in progress; these
expire RESUME_SECONDS after the thread's last event, the counter a day after. A Lua script does all of
it per event, then PUBLISHes the event on the thread's channel, so `seq` order is publication order. A Stream rather
than a list or a sorted set: it reads a range by id (`XRANGE (after +`) and trims itself on append.

Every process watching a thread subscribes to its channel and hands the hub its events in `seq`
order: its own come back from the script at once (one round trip, not two), the others' through
pub/sub. An event that arrives ahead of its turn waits a moment for the ones before it, which are
then read from the Stream, or, if Redis lost them, replaced by a `resync`. Sockets count in sorted
sets that expire unless their process renews them, so a process that dies frees its users' slots; a
thread's set names each slot's user, so it is also who is present, and the processes watching the
thread sweep out the dead ones' slots, announcing the users who left with them.
Keys are built inside the scripts: one Redis (or a Sentinel pair), not a Redis Cluster.
"""

import asyncio
import contextlib
import heapq
import json
import logging
from collections import deque
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from broker import (
    BrokerUnavailable,
    CatchUp,
    Event,
    Occupied,
    ResumeWindow,
    encode,
    new_process_id,
    presence_signal,
    present,
    slot_member,
)

log = logging.getLogger("gainz")

PREFIX = "gainz:"
BATCH = 512  # events per script call
MAX_PENDING = 50_000  # events waiting for Redis while it is away; past it the oldest are dropped
GAP_WAIT = 0.2  # seconds an event waits for the ones before it, from another process, before asking the Stream
SLOT_SECONDS = 30.0  # a socket's slot lasts this long unless its process renews it, every third of that
RECONNECT_CHECK_SECONDS = 1
# Commands at once on one process's connections (a crowd of sockets joining sends a few each); past that, a
# command waits up to CONNECTION_WAIT_SECONDS for one to be free. redis-py's default pool fails it instead, with
# the same error as a Redis that is down.
CONNECTIONS = 100
CONNECTION_WAIT_SECONDS = 10

PUBLISH = """
local prefix, ttl, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local seqs = {}
for i = 4, #ARGV, 5 do
  local thread, kind, run, extra, tail = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local key = prefix .. 't:' .. thread
  local seq_key, log_key, run_key, text_key = key .. ':seq', key .. ':log', key .. ':run', key .. ':text'
  if redis.call('EXISTS', seq_key) == 0 then  -- born at the clock in microseconds: see broker.seq_birth
    local now = redis.call('TIME')
    redis.call('SET', seq_key, string.format('%.0f', now[1] * 1000000 + now[2]))
  end
  local seq = string.format('%.0f', redis.call('INCR', seq_key))  -- %.0f: exact digits, no exponent
  local text = '{"seq":' .. seq .. ',' .. tail
  redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', text)
  if kind == 'run.started' then
    redis.call('HSET', run_key, 'run_id', run, 'assistant', extra)
    redis.call('SET', text_key, '')
  elseif kind == 'text.delta' then
    redis.call('APPEND', text_key, extra)
  elseif kind == 'run.completed' or kind == 'run.failed' or kind == 'run.cancelled' then
    if redis.call('HGET', run_key, 'run_id') == run then redis.call('DEL', run_key, text_key) end
  end
  for _, k in ipairs({log_key, run_key, text_key}) do redis.call('PEXPIRE', k, ttl) end
  redis.call('EXPIRE', seq_key, 86400)  -- the counter outlives the log: a thread's seq goes on by one
  redis.call('PUBLISH', key, text)
  seqs[#seqs + 1] = seq
end
return seqs
"""

SNAPSHOT = """
local key, after, maxlen = ARGV[1] .. 't:' .. ARGV[2], ARGV[3], tonumber(ARGV[4])
local seq_key = key .. ':seq'
if redis.call('EXISTS', seq_key) == 0 then
  local now = redis.call('TIME')
  redis.call('SET', seq_key, string.format('%.0f', now[1] * 1000000 + now[2]), 'EX', 86400)
end
local seq = redis.call('GET', seq_key)
local run = redis.call('HMGET', key .. ':run', 'run_id', 'assistant')
-- false (nil to the caller): nothing read, for a client ahead of the counter or further behind than the
-- log keeps; whatever its number, a resume point costs at most the log's length
local missed = false
if after ~= '' then
  local behind = tonumber(seq) - tonumber(after)
  if behind == 0 then
    missed = {}
  elseif behind > 0 and behind <= maxlen then
    missed = redis.call('XRANGE', key .. ':log', '(' .. after .. '-0', '+', 'COUNT', behind)
  end
end
return {seq, run[1] or '', run[2] or '', redis.call('GET', key .. ':text') or '', missed}
"""

USER_OF = """
local function user_of(member) return string.sub(member, string.find(member, '\\n', 1, true) + 1) end
local function count_of(key, sub)
  local count = 0
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if user_of(member) == sub then count = count + 1 end
  end
  return count
end
"""

# A thread's set drops a lapsed slot only in SWEEP, which announces its user's leaving: counts that decide
# an announcement (`mine`, what VACATE returns) take lapsed slots in, the list of who is present does not.
OCCUPY = USER_OF + """
local user_key, thread_key, slot, sub = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit, seconds = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = redis.call('TIME')
now = now[1] + now[2] / 1000000
redis.call('ZREMRANGEBYSCORE', user_key, '-inf', now)
if redis.call('ZCARD', user_key) >= limit then return -1 end
redis.call('ZADD', user_key, now + seconds, slot)
redis.call('ZADD', thread_key, now + seconds, slot .. '\\n' .. sub)
redis.call('PEXPIRE', user_key, math.ceil(seconds * 1000))
redis.call('PEXPIRE', thread_key, math.ceil(seconds * 1000))
return {count_of(thread_key, sub), redis.call('ZRANGEBYSCORE', thread_key, now, '+inf')}
"""

VACATE = USER_OF + """
redis.call('ZREM', ARGV[1], ARGV[3])
redis.call('ZREM', ARGV[2], ARGV[4])
return count_of(ARGV[2], ARGV[5])
"""

PRESENT = """
local now = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', ARGV[1], now[1] + now[2] / 1000000, '+inf')
"""

SWEEP = USER_OF + """
local now = redis.call('TIME')
now = now[1] + now[2] / 1000000
local gone = {}
for i = 1, #ARGV do
  local lapsed = redis.call('ZRANGEBYSCORE', ARGV[i], '-inf', now)
  if #lapsed > 0 then
    redis.call('ZREMRANGEBYSCORE', ARGV[i], '-inf', now)
    local left = {}
    for _, member in ipairs(redis.call('ZRANGE', ARGV[i], 0, -1)) do left[user_of(member)] = true end
    for _, member in ipairs(lapsed) do
      local sub = user_of(member)
      if not left[sub] then
        left[sub] = true
        gone[#gone + 1] = i
        gone[#gone + 1] = sub
      end
    end
  end
end
return gone
"""

RENEW = """
local now = redis.call('TIME')
local until_ = now[1] + now[2] / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', ARGV[i], until_, ARGV[i + 1])
  redis.call('PEXPIRE', ARGV[i], math.ceil(tonumber(ARGV[1]) * 1000))
end
return 1
"""


class Follow:
    """This process's reading of one thread: the last seq handed on, and what came ahead of its turn."""

    __slots__ = ("expected", "gap_check", "held", "seqs_held")

    def __init__(self):
        self.expected: int | None = None  # None until the first listener's catch-up says where we are
        self.held: list[tuple[int, Event]] = []
        self.seqs_held: set[int] = set()
        self.gap_check: asyncio.TimerHandle | None = None


class RedisBroker:
    def __init__(self, url: str, window: ResumeWindow = ResumeWindow(), prefix: str = PREFIX,
                 slot_seconds: float = SLOT_SECONDS):
        self.url, self.window, self.prefix, self.slot_seconds = url, window, prefix, slot_seconds
        self.process_id = new_process_id()
        self.redis = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(
            url, max_connections=CONNECTIONS, timeout=CONNECTION_WAIT_SECONDS, decode_responses=True,
            socket_connect_timeout=2, health_check_interval=10))
        self.pubsub = self.redis.pubsub()
        self._publish = self.redis.register_script(PUBLISH)
        self._snapshot = self.redis.register_script(SNAPSHOT)
        self._occupy = self.redis.register_script(OCCUPY)
        self._vacate = self.redis.register_script(VACATE)
        self._present = self.redis.register_script(PRESENT)
        self._sweep = self.redis.register_script(SWEEP)
        self._renew = self.redis.register_script(RENEW)
        self.pending: deque[tuple[str, dict, str]] = deque()
        self.lost_threads: set[str] = set()  # their pending events were dropped: they get a resync
        self.follows: dict[str, Follow] = {}
        self.slots: dict[str, tuple[str, str, str]] = {}  # slot -> (user key, thread key, its member there)
        self.healthy = True
        self._confirmed: dict[str, asyncio.Event] = {}  # channel -> set once Redis says it is subscribed
        self._background: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self._wakeup = asyncio.Event()
        self._all_published = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._deliver: Callable[[str, list[Event]], None] = lambda thread_id, events: None
        self._on_signal: Callable[[dict], None] = lambda message: None
        self._resync: Callable[[str, int], None] = lambda thread_id, seq: None

    def shared_across_processes(self) -> bool:
        return True

    async def ping(self) -> None:
        await self.redis.ping()

    def _thread_key(self, thread_id: str) -> str:
        return f"{self.prefix}t:{thread_id}"

    async def open(self, deliver, on_signal, resync) -> None:
        self._deliver, self._on_signal, self._resync = deliver, on_signal, resync
        try:
            await self.redis.ping()
            await self.pubsub.subscribe(self.prefix + "signals")
        except RedisError as error:
            raise RuntimeError(f"REDIS_URL: cannot reach Redis ({error})") from None
        self._tasks = [asyncio.create_task(task) for task in (self._publisher(), self._reader(), self._renewer())]

    async def close(self) -> None:
        if self.pending and self.healthy:  # what is still waiting to be published, while Redis answers
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_published.wait(), 2)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            for slot, (user_key, thread_key, member) in self.slots.items():
                await self.redis.zrem(user_key, slot)
                await self.redis.zrem(thread_key, member)
        with contextlib.suppress(RedisError, OSError, RuntimeError):
            await self.pubsub.aclose()
        await self.redis.aclose()

    # ------------------------------------------------------------ publishing

    def publish(self, thread_id: str, event: dict) -> None:
        self.pending.append((thread_id, event, encode(event)[1:]))
        if len(self.pending) > MAX_PENDING:
            self.lost_threads.add(self.pending.popleft()[0])
        self._wakeup.set()

    async def _publisher(self) -> None:
        while True:
            try:
                await self._publish_pending()
            except Exception:  # as with the reader: stopping would lose every event from then on
                log.exception("publishing events failed")
                await asyncio.sleep(RECONNECT_CHECK_SECONDS)

    async def _publish_pending(self) -> None:
        delay = 0.05
        while True:
            if not self.pending:
                self._all_published.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                self._all_published.clear()
            for thread_id in list(self.lost_threads):
                self.pending.appendleft((thread_id, {"type": "resync", "thread_id": thread_id},
                                         encode({"type": "resync", "thread_id": thread_id})[1:]))
                self.lost_threads.discard(thread_id)
            batch = [self.pending[index] for index in range(min(BATCH, len(self.pending)))]
            args: list[str | int] = [self.prefix, int(self.window.seconds * 1000), self.window.events_per_thread]
            for thread_id, event, tail in batch:
                kind = event["type"]
                extra = (event["delta"] if kind == "text.delta"
                         else encode(event["assistant"]) if kind == "run.started" else "")
                args += [thread_id, kind, event.get("run_id") or "", extra, tail]
            try:
                seqs = await self._publish(args=args)
            except (RedisError, OSError) as error:
                self._unhealthy("publishing", error)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            delay = 0.05
            for _ in batch:
                self.pending.popleft()
            by_thread: dict[str, list[Event]] = {}
            for (thread_id, event, tail), seq in zip(batch, seqs, strict=True):
                by_thread.setdefault(thread_id, []).append(Event.create(int(seq), event, tail))
            for thread_id, events in by_thread.items():
                self._receive(thread_id, events)

    def signal(self, message: dict) -> None:
        self._on_signal(message)  # this process at once, the others through Redis
        text = json.dumps(message | {"origin": self.process_id})
        task = asyncio.create_task(self._send_signal(text))
        self._background.add(task)
        task.add_done_callback(self._sent)

    async def _send_signal(self, text: str) -> None:
        await self.redis.publish(self.prefix + "signals", text)

    def _sent(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._unhealthy("sending a signal", task.exception())

    # ------------------------------------------------------------ receiving, in seq order

    async def _reader(self) -> None:
        while True:
            try:
                await self._read_one()
            except (RedisError, OSError) as error:
                self._unhealthy("reading events", error)
                await asyncio.sleep(RECONNECT_CHECK_SECONDS)
            except Exception:  # a reader that stopped would lose every event from then on, silently
                log.exception("handling an event from Redis failed")

    async def _read_one(self) -> None:
        message = await self.pubsub.get_message(timeout=1.0)
        if not self.healthy:
            await self._recover()
        if message is not None:
            self._handle(message)

    def _handle(self, message: dict) -> None:
        if message["type"] == "subscribe" and message["channel"] in self._confirmed:
            self._confirmed[message["channel"]].set()
        if message["type"] != "message":
            return
        channel, data = message["channel"], message["data"]
        if channel == self.prefix + "signals":
            signal = json.loads(data)
            if signal.pop("origin", None) != self.process_id:
                self._on_signal(signal)
            return
        thread_id = channel.removeprefix(self.prefix + "t:")
        follow = self.follows.get(thread_id)
        # Parse only what is new: the seq leads the text, and this process's own events come back too.
        seq = int(data[7:data.index(",")])
        if follow is not None and (follow.expected is None or seq > follow.expected):
            self._receive(thread_id, [Event.from_text(data)])

    def _receive(self, thread_id: str, events: list[Event]) -> None:
        follow = self.follows.get(thread_id)
        if follow is None:
            return
        for event in events:
            if (follow.expected is None or event.seq > follow.expected) and event.seq not in follow.seqs_held:
                heapq.heappush(follow.held, (event.seq, event))
                follow.seqs_held.add(event.seq)
        self._hand_on(thread_id, follow)

    def _hand_on(self, thread_id: str, follow: Follow) -> None:
        if follow.expected is None:
            return
        ready = []
        while follow.held and follow.held[0][0] <= follow.expected + 1:
            seq, event = heapq.heappop(follow.held)
            follow.seqs_held.discard(seq)
            if seq == follow.expected + 1:
                ready.append(event)
                follow.expected = seq
        if ready:
            self._deliver(thread_id, ready)
        if follow.held and follow.gap_check is None:
            follow.gap_check = asyncio.get_running_loop().call_later(
                GAP_WAIT, lambda: self._in_background(self._fill_gap(thread_id, follow)))

    def _in_background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fill_gap(self, thread_id: str, follow: Follow) -> None:
        """Events came ahead of their turn and the ones before them did not come: read those from the
        Stream; if Redis no longer has them, tell the listeners to resync and go on from there."""
        follow.gap_check = None
        if self.follows.get(thread_id) is not follow or not follow.held or follow.expected is None:
            return
        first_held = follow.held[0][0]
        gap = first_held - 1 - follow.expected
        entries: list | None = []
        # More than the log keeps cannot all be there: a restarted Redis counts on from far ahead.
        if gap <= self.window.events_per_thread:
            try:
                entries = await self.redis.xrange(self._thread_key(thread_id) + ":log", f"{follow.expected + 1}-0",
                                                  f"{first_held - 1}-0", count=gap)
            except (RedisError, OSError) as error:
                self._unhealthy("reading the event log", error)
        missed = [Event.from_text(str(fields["e"])) for _, fields in entries or () if fields]
        if len(missed) != gap:
            self._resync(thread_id, first_held - 1)
            follow.expected = first_held - 1
            missed = []
        self._receive(thread_id, missed)

    def _unhealthy(self, doing: str, error: BaseException | None) -> None:
        if self.healthy:
            log.warning("Redis is unreachable (%s: %s); live events wait for it, runs go on", doing, error)
        self.healthy = False

    async def _recover(self) -> None:
        """Redis answers again: every watched thread checks what it missed meanwhile."""
        self.healthy = True
        log.warning("Redis is back: catching up the threads this process follows")
        # The channels of threads followed since it went away, and no longer those left meanwhile. Not
        # waiting for Redis to confirm (this task reads the confirmations): an event published before the
        # subscription holds is read from the Stream when the next one comes.
        followed = {self._thread_key(thread_id) for thread_id in self.follows} | {self.prefix + "signals"}
        with contextlib.suppress(RedisError, OSError):  # down again: the next recovery tries again
            if missing := followed - set(self.pubsub.channels):
                await self.pubsub.subscribe(*missing)
            if left := set(self.pubsub.channels) - followed:
                await self.pubsub.unsubscribe(*left)
        for thread_id, follow in list(self.follows.items()):
            with contextlib.suppress(BrokerUnavailable):  # down again: the next recovery tries again
                catch_up = await self.catch_up(thread_id, follow.expected)
                if self.follows.get(thread_id) is not follow:
                    continue
                if catch_up.missed is None and follow.expected is not None:
                    self._resync(thread_id, catch_up.seq)
                    follow.expected = catch_up.seq
                self._receive(thread_id, catch_up.missed or [])

    # ------------------------------------------------------------ watching and catching up

    async def watch(self, thread_id: str) -> None:
        """Subscribe to the thread's channel, and wait until Redis has: the catch-up that follows must not
        miss an event published in between."""
        if thread_id in self.follows:
            return
        self.follows[thread_id] = Follow()  # kept if Redis is away: the recovery subscribes to it
        if not self.healthy:
            raise BrokerUnavailable()
        channel = self._thread_key(thread_id)
        confirmed = self._confirmed[channel] = asyncio.Event()
        try:
            await self.pubsub.subscribe(channel)
            async with asyncio.timeout(5):
                await confirmed.wait()
        except (RedisError, OSError, TimeoutError) as error:
            self._unhealthy("subscribing", error)
            raise BrokerUnavailable() from None
        finally:
            self._confirmed.pop(channel, None)

    async def unwatch(self, thread_id: str) -> None:
        follow = self.follows.pop(thread_id, None)
        if follow is not None:
            if follow.gap_check is not None:
                follow.gap_check.cancel()
            if self.healthy:  # else the recovery unsubscribes
                await self.pubsub.unsubscribe(self._thread_key(thread_id))

    async def catch_up(self, thread_id: str, after: int | None) -> CatchUp:
        try:
            seq, run_id, assistant, text, entries = await self._snapshot(args=[
                self.prefix, thread_id, "" if after is None else str(after), self.window.events_per_thread])
        except (RedisError, OSError) as error:
            self._unhealthy("catching up", error)
            raise BrokerUnavailable() from None
        seq = int(seq)
        active = {"run_id": run_id, "assistant": json.loads(assistant), "text": text} if run_id else None
        follow = self.follows.get(thread_id)
        if follow is not None and follow.expected is None:
            follow.expected = seq
            self._receive(thread_id, [])
        if after is None or entries is None:
            return CatchUp(seq, active, None)
        missed = [Event.from_text(fields[1]) for _, fields in entries]  # raw from the script: [id, ["e", text]]
        # The entries' ids are distinct seqs in (after, seq]: all there, or only partly kept (resync).
        return CatchUp(seq, active, missed if len(missed) == seq - after else None)

    # ------------------------------------------------------------ sockets

    def _socket_keys(self, sub: str, thread_id: str) -> tuple[str, str]:
        return f"{self.prefix}sockets:user:{sub}", f"{self.prefix}sockets:thread:{thread_id}"

    async def occupy(self, sub: str, thread_id: str, slot: str, limit: int) -> Occupied | None:
        user_key, thread_key = self._socket_keys(sub, thread_id)
        try:
            taken = await self._occupy(args=[user_key, thread_key, slot, sub, limit, self.slot_seconds])
        except (RedisError, OSError) as error:
            self._unhealthy("counting sockets", error)
            raise BrokerUnavailable() from None
        if taken == -1:
            return None
        self.slots[slot] = (user_key, thread_key, slot_member(slot, sub))
        mine, members = taken
        return Occupied(present(members), mine)

    async def vacate(self, sub: str, thread_id: str, slot: str) -> int:
        if self.slots.pop(slot, None) is None:
            return 0
        user_key, thread_key = self._socket_keys(sub, thread_id)
        return await self._vacate(args=[user_key, thread_key, slot, slot_member(slot, sub), sub])

    async def present(self, thread_id: str) -> list[dict]:
        try:
            return present(await self._present(args=[self._socket_keys("", thread_id)[1]]))
        except (RedisError, OSError) as error:
            self._unhealthy("reading who is present", error)
            raise BrokerUnavailable() from None

    async def _renewer(self) -> None:
        while True:
            await asyncio.sleep(self.slot_seconds / 3)
            with contextlib.suppress(RedisError, OSError):
                args: list = [self.slot_seconds]
                for slot, (user_key, thread_key, member) in list(self.slots.items()):
                    args += [user_key, slot, thread_key, member]
                if len(args) > 1:
                    await self._renew(args=args)
                await self._sweep_lapsed_slots()

    async def _sweep_lapsed_slots(self) -> None:
        """The slots of processes that died lapse; the users who were connected only through them have left."""
        thread_ids = list(self.follows)
        if not thread_ids:
            return
        gone = await self._sweep(args=[self._socket_keys("", thread_id)[1] for thread_id in thread_ids])
        for index, sub in zip(gone[::2], gone[1::2], strict=True):
            self.signal(presence_signal(thread_ids[int(index) - 1], sub, 0))

    async def claim_once(self, name: str, seconds: float) -> bool:
        claimed = await self.redis.set(f"{self.prefix}once:{name}", self.process_id, nx=True,
                                       px=max(1, int(seconds * 1000)))
        return bool(claimed)

