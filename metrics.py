"""What this process has done, for Prometheus (`GET /metrics`): runs by outcome, how long they took and how
long the upstream took to send their first token, WebSockets open, events delivered, limits hit.

No label carries user data: runs count by outcome, limits by endpoint, never by user or thread. Each app has
a registry of its own (not prometheus_client's global one), so several apps in one process (tests) do not
mix their counts; with several processes (uvicorn --workers), each one exposes its own.
"""

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from assistants import ThreadEvents
from broker import Event
from hub import Hub

disable_created_metrics()  # a `_created` time beside every counter: noise for Prometheus, which counts resets itself

# Replies stream for seconds to minutes; the first token comes in well under a second, or the upstream is slow.
RUN_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
FIRST_TOKEN_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.runs = Counter("gainz_runs", "Runs ended, by outcome (completed, failed, cancelled)", ["outcome"],
                            registry=self.registry)
        self.run_seconds = Histogram("gainz_run_duration_seconds", "From a run's start to its end, by outcome",
                                     ["outcome"], buckets=RUN_SECONDS, registry=self.registry)
        self.first_token_seconds = Histogram(
            "gainz_upstream_first_token_seconds", "From a run's start to the first token of its reply",
            buckets=FIRST_TOKEN_SECONDS, registry=self.registry)
        self.sockets_open = Gauge("gainz_sockets_open", "WebSockets open on this process", registry=self.registry)
        self.events_delivered = Counter("gainz_events_delivered", "Thread events handed to this process's "
                                        "listeners (sockets, event streams, waiting requests), once per listener",
                                        registry=self.registry)
        self.limits_hit = Counter("gainz_limits_hit", "Requests and frames refused by a per-user or per-thread "
                                  "limit, by endpoint", ["endpoint"], registry=self.registry)
        ProcessCollector(registry=self.registry)

    def limit_hit(self, endpoint: object) -> None:
        self.limits_hit.labels(getattr(endpoint, "__name__", "unknown")).inc()

    def delivering(self, hub: Hub) -> Callable[[str, list[Event]], None]:
        """`hub.deliver`, counting each event once for every listener it is handed to."""
        def deliver(thread_id: str, events: list[Event]) -> None:
            self.events_delivered.inc(len(events) * len(hub.threads.get(thread_id, ())))
            hub.deliver(thread_id, events)

        return deliver


class MeasuredEvents(ThreadEvents):
    """The thread events, with each run timed from its start to its first token and to its end."""

    def __init__(self, publish: Callable[[str, dict], None], metrics: Metrics):
        super().__init__(publish)
        self.metrics = metrics
        self.started: dict[str, float] = {}  # run id -> when it started, until it ends
        self.awaiting_first_token: set[str] = set()

    async def on_run_started(self, thread_id, run_id, assistant):
        self.started[run_id] = time.monotonic()
        self.awaiting_first_token.add(run_id)
        await super().on_run_started(thread_id, run_id, assistant)

    async def on_text_delta(self, thread_id, run_id, delta):
        if run_id in self.awaiting_first_token:
            self.awaiting_first_token.discard(run_id)
            self.metrics.first_token_seconds.observe(time.monotonic() - self.started[run_id])
        await super().on_text_delta(thread_id, run_id, delta)

    async def on_run_completed(self, thread_id, run_id, message, usage):
        self._ended(run_id, "completed")
        await super().on_run_completed(thread_id, run_id, message, usage)

    async def on_run_failed(self, thread_id, run_id, error, message):
        self._ended(run_id, "failed")
        await super().on_run_failed(thread_id, run_id, error, message)

    async def on_run_cancelled(self, thread_id, run_id, by, message):
        self._ended(run_id, "cancelled")
        await super().on_run_cancelled(thread_id, run_id, by, message)

    def _ended(self, run_id: str, outcome: str) -> None:
        self.metrics.runs.labels(outcome).inc()
        self.awaiting_first_token.discard(run_id)
        started = self.started.pop(run_id, None)
        if started is not None:  # None: cancelled before it started
            self.metrics.run_seconds.labels(outcome).observe(time.monotonic() - started)
