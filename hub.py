"""Which sockets are on which thread, and a fan-out that never waits on any of them.

Each socket has its own bounded backlog drained by its own writer task, so `broadcast` only appends
and returns. A socket that falls behind has its pending `text.delta` frames of one run merged into
one (nothing is dropped); past the byte bound it is closed and removed.
"""

import asyncio
import contextlib
import json
import logging
from collections import deque

from starlette import status
from starlette.websockets import WebSocket, WebSocketDisconnect

log = logging.getLogger("gainz")

SLOW_CONSUMER_CLOSE_CODE = status.WS_1013_TRY_AGAIN_LATER
MAX_BACKLOG_CHARS = 512 * 1024


def encode(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


class Frame:
    __slots__ = ("text", "delta_event", "merged", "size")

    def __init__(self, text: str, delta_event: dict | None):
        self.text = text
        self.delta_event = delta_event  # kept for text.delta frames, which may still be merged
        self.merged: list[str] | None = None  # the deltas, once a later one was merged in
        self.size = len(text)

    def encoded(self) -> str:
        # Joined once, when written: appending to one string per merge would cost the square of the backlog.
        return self.text if self.merged is None else encode(self.delta_event | {"delta": "".join(self.merged)})


class Connection:
    """One socket on one thread: its backlog and the writer task that drains it."""

    def __init__(self, websocket: WebSocket, thread_id: str, max_backlog_chars: int):
        self.websocket = websocket
        self.thread_id = thread_id
        self.max_backlog_chars = max_backlog_chars
        self.backlog: deque[Frame] = deque()
        self.backlog_chars = 0
        self.close_code: int | None = None
        self._wakeup = asyncio.Event()
        self.endpoint = asyncio.current_task()  # serves the socket; done once the socket is closed
        self.writer = asyncio.create_task(self._write())

    def offer(self, text: str, delta_event: dict | None = None) -> bool:
        """Queue a frame without waiting; False when the backlog is over its bound."""
        if self.close_code is not None:
            return True
        last = self.backlog[-1] if self.backlog else None
        if delta_event and last and last.delta_event and last.delta_event["run_id"] == delta_event["run_id"]:
            if last.merged is None:
                last.merged = [last.delta_event["delta"]]
            last.merged.append(delta_event["delta"])
            last.size += len(delta_event["delta"])
            self.backlog_chars += len(delta_event["delta"])
        else:
            self.backlog.append(Frame(text, delta_event))
            self.backlog_chars += len(text)
            self._wakeup.set()
        return self.backlog_chars <= self.max_backlog_chars

    def close(self, code: int) -> None:
        """Stop writing, even in the middle of a send to a socket that stopped reading; the owner of
        the socket (its endpoint) sees the writer end and sends the close frame with `code`."""
        if self.close_code is None:
            self.close_code = code
            self.backlog.clear()
            self.backlog_chars = 0
            self.writer.cancel()

    async def _write(self) -> None:
        websocket = self.websocket
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                if not self.backlog:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                frame = self.backlog.popleft()
                self.backlog_chars -= frame.size
                await websocket.send_text(frame.encoded())


class Hub:
    def __init__(self, max_backlog_chars: int = MAX_BACKLOG_CHARS):
        self.max_backlog_chars = max_backlog_chars
        self.threads: dict[str, set[Connection]] = {}

    def join(self, thread_id: str, websocket: WebSocket) -> Connection:
        connection = Connection(websocket, thread_id, self.max_backlog_chars)
        self.threads.setdefault(thread_id, set()).add(connection)
        return connection

    def _remove(self, connection: Connection) -> None:
        sockets = self.threads.get(connection.thread_id)
        if sockets is not None:
            sockets.discard(connection)
            if not sockets:
                del self.threads[connection.thread_id]

    async def leave(self, connection: Connection) -> None:
        """Forget the socket and stop its writer."""
        self._remove(connection)
        connection.writer.cancel()
        await asyncio.wait([connection.writer])
        if not connection.writer.cancelled() and (error := connection.writer.exception()):
            log.error("writing to a socket failed", exc_info=error)

    def clients(self, thread_id: str) -> int:
        return len(self.threads.get(thread_id, ()))

    def send(self, connection: Connection, event: dict) -> None:
        if not connection.offer(encode(event)):
            self.drop(connection, SLOW_CONSUMER_CLOSE_CODE)

    def broadcast(self, thread_id: str, event: dict) -> None:
        sockets = self.threads.get(thread_id)
        if not sockets:
            return
        text = encode(event)
        delta_event = event if event["type"] == "text.delta" else None
        for connection in tuple(sockets):
            if not connection.offer(text, delta_event):
                self.drop(connection, SLOW_CONSUMER_CLOSE_CODE)

    def drop(self, connection: Connection, code: int) -> None:
        connection.close(code)
        self._remove(connection)

    def close_all(self, code: int) -> list[asyncio.Task]:
        """Close every socket with `code`; returns the tasks serving them, done once each is closed."""
        connections = [connection for sockets in self.threads.values() for connection in sockets]
        for connection in connections:
            self.drop(connection, code)
        return [connection.endpoint for connection in connections]
