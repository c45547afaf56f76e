"""The run command: uvicorn serving `main:app`, with the connection limits a service on the open internet
needs and uvicorn does not give by itself.

    python serve.py [any uvicorn option: --workers 2, --host 0.0.0.0, --port 8080, --reload, ...]

What it adds (an option given on the command line wins over its default here):
- a request head must arrive whole within REQUEST_HEAD_TIMEOUT seconds (5) of connecting, or of the
  previous response on a kept-alive connection; uvicorn itself waits forever (slowloris);
- a connection answered while its request body is still arriving is closed (uvicorn keeps it for as
  long as the client trickles the body in);
- a connection whose client reads nothing of its answer (an event stream, mostly) for
  WRITE_TIMEOUT_SECONDS (30) is dropped, and the app sees the client leave;
- a WebSocket client that floods pings without reading the pongs stops being read once the pongs it
  left unread pass the transport's buffer (uvicorn would queue them without bound), and one sending
  over MAX_PINGS_PER_SECOND (100) is dropped;
- WebSocket frames over 256 KiB are refused with 1009 (the service accepts 65,536 characters a frame;
  uvicorn's default, 16 MiB, lets a few clients take gigabytes);
- the process may open as many files as its hard limit allows (one per connection); once they are all
  used, a connection it cannot accept is closed at once and the failure logged once every
  ACCEPT_ERROR_LOG_SECONDS (10), where asyncio logs a traceback per attempt;
- with --workers, a worker that refuses to start stops the server with exit code 3 (uvicorn exits 0).
`uvicorn main:app` still works, without these guards.
"""

import asyncio
import contextlib
import importlib
import logging
import math
import os
import resource
import socket
import sys
from pathlib import Path

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

REQUEST_HEAD_TIMEOUT = float(os.environ.get("REQUEST_HEAD_TIMEOUT") or 5)
WRITE_TIMEOUT_SECONDS = float(os.environ.get("WRITE_TIMEOUT_SECONDS") or 30)
MAX_PINGS_PER_SECOND = 100  # a keepalive needs a few a minute
ACCEPT_ERROR_LOG_SECONDS = 10
UVICORN_DEFAULTS = [
    "--app-dir", str(Path(__file__).resolve().parent),
    "--http", "serve:GuardedHTTP",
    "--ws", "serve:GuardedWebSocket",
    "--loop", "serve:GuardedLoop",
    "--ws-max-size", str(256 * 1024),
    "--timeout-keep-alive", "5",
    "--timeout-graceful-shutdown", "5",
]


class GuardedHTTP(H11Protocol):
    """HTTP/1.1 (h11) that closes a connection whose request head is not complete in time, or whose
    answer went out before its request body had all arrived, and drops one whose client has read nothing
    for WRITE_TIMEOUT_SECONDS while its answer waits: an event stream would otherwise wait forever to
    write, holding its user's socket slot. Dropped, not closed: closing waits for the answer to go out."""

    _head_timer = None
    _write_timer = None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _watch_for_a_head(self) -> None:
        # Waiting for a head is when both sides of h11 are idle; the deadline is set once, so a client
        # trickling a byte at a time does not move it.
        waiting = (not self.transport.is_closing() and self.conn.our_state is h11.IDLE
                   and self.conn.their_state is h11.IDLE)
        if not waiting:
            self._cancel_head_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT, self._head_too_late)

    def _head_too_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch_for_a_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self.transport.get_protocol() is self:  # not upgraded to a WebSocket meanwhile
            self._watch_for_a_head()

    def handle_websocket_upgrade(self, event) -> None:
        self._cancel_head_timer()
        self._cancel_write_timer()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            # Answered (401, 413, 408...) while the body is still arriving: the rest of it is of no use, and
            # uvicorn would keep the connection for as long as a client trickles it in.
            self.transport.close()
        super().on_response_complete()
        self._watch_for_a_head()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._expect_writes(self.transport.get_write_buffer_size())

    def _expect_writes(self, unsent: int) -> None:
        # Progress, not completion: a client reading a long answer slowly empties the buffer a little at a time.
        def check() -> None:
            if (left := self.transport.get_write_buffer_size()) < unsent:
                self._expect_writes(left)
            else:
                self._write_timer = None
                self.transport.abort()

        self._write_timer = self.loop.call_later(WRITE_TIMEOUT_SECONDS, check)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_timer()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)


class GuardedWebSocket(WebSocketsSansIOProtocol):
    """WebSockets (websockets' sans-I/O protocol) that stop reading while the client leaves its own
    frames (pongs, mostly) unread, so that a ping flood cannot grow the server's memory, and that drop a
    client sending pings by the hundred a second, which would otherwise keep a core busy answering."""

    write_paused = False
    _pings = 0
    _ping_second = 0.0

    def handle_ping(self) -> None:
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if now - self._ping_second >= 1:
            self._ping_second, self._pings = now, 0
        self._pings += 1
        if self._pings > MAX_PINGS_PER_SECOND:
            logging.getLogger("gainz").warning("a WebSocket client sent over %d pings a second: dropped",
                                               MAX_PINGS_PER_SECOND)
            self.transport.abort()
            return
        super().handle_ping()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.write_paused = False
        if not self.read_paused:
            self.transport.resume_reading()

    async def receive(self):
        message = await super().receive()  # may resume reading: not while the client does not read
        if self.write_paused:
            self.transport.pause_reading()
        return message

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        if self.transport.get_write_buffer_size():  # a close frame would never get through: drop it
            self.transport.abort()


class GuardedLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, for a process out of file descriptors. asyncio (3.11 to 3.14) then goes on trying
    every connection waiting to be accepted, each attempt logging a traceback and scheduling a retry of
    its own: thousands a second, enough to fill a disk and keep a core busy. Here a descriptor kept in
    reserve lets each waiting connection be accepted and closed at once (its client sees the connection
    end instead of waiting), and the failure is logged once every ACCEPT_ERROR_LOG_SECONDS, with a count."""

    def __init__(self) -> None:
        super().__init__()
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY)
        self._accept_errors = 0
        self._accept_error_logged = -math.inf

    def call_exception_handler(self, context: dict) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            return super().call_exception_handler(context)
        self._turn_away(context["socket"])
        self._accept_errors += 1
        if self.time() - self._accept_error_logged >= ACCEPT_ERROR_LOG_SECONDS:
            logging.getLogger("gainz").error(
                "cannot accept connections: %s (%d refused since the last report); raise the file limit "
                "(ulimit -n) or lower the connections allowed", context.get("exception"), self._accept_errors)
            self._accept_errors, self._accept_error_logged = 0, self.time()

    def _turn_away(self, listening) -> None:
        """Accept the connection that could not be, with the reserve descriptor, and close it."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            sock = socket.socket(fileno=listening.fileno())  # the listening socket itself, not a copy
            try:
                sock.accept()[0].close()
            except OSError:
                pass
            finally:
                sock.detach()
        with contextlib.suppress(OSError):  # another thread took the descriptor: next time
            self._reserve = os.open(os.devnull, os.O_RDONLY)


def main(argv: list[str]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    class Workers(Multiprocess):
        def run(self, *args, **kwargs):
            super().run(*args, **kwargs)
            if any(process.exitcode == STARTUP_FAILURE for process in self.processes):
                sys.exit(STARTUP_FAILURE)

    # The module, not `uvicorn.main`: the package replaces that name with the click command.
    cli = importlib.import_module("uvicorn.main")
    cli.Multiprocess = Workers  # type: ignore[attr-defined]  # the name its run() looks up
    cli.main.main(args=["main:app", *UVICORN_DEFAULTS, *argv], prog_name="python serve.py")


if __name__ == "__main__":
    main(sys.argv[1:])
