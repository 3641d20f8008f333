"""How fast a run talks to its endpoints: request rates, requests in flight, bandwidth.

Three limits, one owner (docs/DESIGN.md, "Pacing"):

- **Request rates** per destination bucket (the provider profile's `request_rates`: `put`, `get`,
  `total`, lowered per destination with `provider_overrides`) and per source account (the source's
  `request_rate`), shared by every thread and every process of a run. Each limit is a token bucket
  in the state database (`StateStore.lease_tokens`: one row, one UPDATE on the database's clock);
  each process takes tokens from a local cache it refills a batch at a time (a tenth of a second's
  worth), so the database sees about ten leases a second per limit and process, never one per
  request. SQLite shares a run's limits between the processes of one host (the flows' shard
  processes), PostgreSQL between hosts (shard workers).
- **Requests in flight** per endpoint and process, adaptive (AIMD): halved when the endpoint
  answers SlowDown / ServerBusy / 503 / 429 (at most once a second: the answers to requests sent
  before the cut say nothing new), then raised by one after each window's worth of answers without
  throttling, up to what the transfer settings open. One log line per change; the progress line
  shows the endpoints below their ceiling.
- **Bandwidth**, bytes per second of the bodies a run's destinations carry (a migration's uploads,
  a restore's downloads; the source's reads are not counted again), one rate or a timetable in a
  time zone (`config.bandwidth`), shared by the run's processes like a request rate.

The connectors know none of this: each gets an `EndpointPacer` (`connectors.base.RequestPacer`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Callable, Mapping, Protocol, Sequence
from zoneinfo import ZoneInfo

from config.bandwidth import BandwidthTimetable
from config.models import LoadedConfig
from config.policy import destination_profile
from config.sizes import format_size

log = logging.getLogger(__name__)

# Tokens a process takes from a shared limit at once: this many seconds' worth at its rate.
LEASE_SECONDS = 0.1
# The smallest bandwidth lease, in bytes (a body goes out in chunks of a few KiB).
MIN_BYTES_LEASE = 64 * 1024
# After a cut of the requests in flight, throttling answers are not acted on for this long (s).
CUT_COOLDOWN = 1.0


class TokenLeaser(Protocol):
    def lease_tokens(self, name: str, rate: float, burst: float, amount: float) -> float:
        """Reserve `amount` tokens of `name` (refilled at `rate`/s up to `burst`); the seconds to wait."""
        ...


class LocalLeaser:
    """`TokenLeaser` within one process (a run without a state store: tests, one-off commands)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def lease_tokens(self, name: str, rate: float, burst: float, amount: float) -> float:
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(name, (0.0, now))
            tokens = min(burst, tokens + max(0.0, now - at) * rate) - amount
            self._buckets[name] = (tokens, now)
        return max(0.0, -tokens / rate)


class SharedRate:
    """A limit of `rate()` tokens per second on `name` (None: no limit now), shared through
    `leaser` with every other process that uses the same name. Thread-safe; `take` blocks."""

    def __init__(self, name: str, rate: Callable[[], float | None], leaser: TokenLeaser, *,
                 min_lease: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.name = name
        self._rate = rate
        self._leaser = leaser
        self._min_lease = min_lease
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = 0.0  # leased by this process and not spent yet

    def take(self, amount: float = 1.0) -> None:
        """Spend `amount` tokens, leasing (and waiting for) more when this process has too few."""
        rate = self._rate()
        if rate is None:
            return
        with self._lock:  # threads queue here: the one that leases waits for all of them
            if self._tokens < amount:
                batch = max(self._min_lease, rate * LEASE_SECONDS, amount - self._tokens)
                self._sleep(self._leaser.lease_tokens(self.name, rate, batch, batch))
                self._tokens += batch
            self._tokens -= amount


@dataclass(frozen=True)
class Throttling:
    """An endpoint whose requests in flight are below their ceiling after throttling answers."""

    label: str
    in_flight: int  # allowed now
    ceiling: int  # allowed when the endpoint does not throttle

    def sentence(self) -> str:
        return f"throttled: {self.in_flight}/{self.ceiling} in flight"


class AdaptiveWindow:
    """The requests this process may have in flight to one endpoint, between 1 and `ceiling`:
    halved on a throttling answer, raised by one after `limit` answers without throttling.

    A thread holds at most one place (it sends one request at a time): a place an attempt took and
    never gave back (an SDK error between send and answer) is reused by the thread's next attempt.
    """

    def __init__(self, label: str, ceiling: int, *, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log):
        self.label = label
        self.ceiling = max(1, ceiling)
        self.limit = self.ceiling
        self._clock = clock
        self._log = logger
        self._cond = threading.Condition()
        self._in_flight = 0
        self._calm = 0  # answers without throttling since the last change
        self._cut_at: float | None = None
        self._held = threading.local()

    def enter(self) -> None:
        if getattr(self._held, "place", False):
            return
        with self._cond:
            while self._in_flight >= self.limit:
                self._cond.wait()
            self._in_flight += 1
        self._held.place = True

    def leave(self, throttled: str | None) -> None:
        if not getattr(self._held, "place", False):
            return
        self._held.place = False
        with self._cond:
            self._in_flight -= 1
            if throttled is not None:
                self._throttled(throttled)
            else:
                self._calm += 1
                if self.limit < self.ceiling and self._calm >= self.limit:
                    self.limit += 1
                    self._calm = 0
                    self._log.info("%s: no throttling for %d answers, %d/%d requests in flight", self.label,
                                   self.limit - 1, self.limit, self.ceiling)
            # As many waiting threads as there are places free, not all of them: the others would
            # only wake to find the window full again (the lock, the GIL and a context switch each).
            free = self.limit - self._in_flight
            if free > 0:
                self._cond.notify(free)

    def _throttled(self, what: str) -> None:
        self._calm = 0
        now = self._clock()
        if self._cut_at is not None and now - self._cut_at < CUT_COOLDOWN:
            return
        self._cut_at = now
        if self.limit == 1:  # as low as it goes: nothing changes, nothing to say
            return
        self.limit //= 2
        self._log.warning("%s: throttled (%s), %d/%d requests in flight", self.label, what, self.limit, self.ceiling)

    def throttling(self) -> Throttling | None:
        """This endpoint's state when it is below its ceiling, else None."""
        limit = self.limit
        return Throttling(self.label, limit, self.ceiling) if limit < self.ceiling else None


class EndpointPacer:
    """The `connectors.base.RequestPacer` of one endpoint in one process: the shared rates that
    apply to each kind of request, its adaptive window, and the run's bandwidth when this endpoint
    carries the bodies it limits."""

    def __init__(self, rates: Mapping[str, Sequence[SharedRate]], window: AdaptiveWindow,
                 bandwidth: SharedRate | None = None):
        self._rates = rates
        self.window = window
        self._bandwidth = bandwidth
        self.paces_bytes = bandwidth is not None

    def request_starts(self, kind: str) -> None:
        for rate in self._rates.get(kind, ()):
            rate.take()
        self.window.enter()

    def request_ended(self, throttled: str | None) -> None:
        self.window.leave(throttled)

    def body_bytes(self, nbytes: int) -> None:
        if self._bandwidth is not None and nbytes > 0:
            self._bandwidth.take(nbytes)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Bandwidth:
    """The run's bandwidth limit now: the timetable read on `clock` (an aware datetime) in `zone`.
    Logs one line when the limit in force changes."""

    def __init__(self, timetable: BandwidthTimetable, zone: tzinfo, *, clock: Callable[[], datetime] = _now):
        self.timetable = timetable
        self.zone = zone
        self._clock = clock
        self._shown: tuple[bool, int | None] = (False, None)

    def rate(self) -> float | None:
        rate = self.timetable.rate_at(self._clock(), self.zone)
        if self._shown != (True, rate):
            self._shown = (True, rate)
            log.info("bandwidth limit now %s (%s, %s)", f"{format_size(rate)}/s" if rate else "off",
                     self.timetable.text, self.zone)
        return rate


class RunPacing:
    """Every pacer of one run in one process: one per endpoint, made on first use.

    `leaser`: where the shared limits live (the run's `StateStore`, or a `LocalLeaser`).
    `ceiling`: the requests in flight the transfer settings open per endpoint (the adaptive
    windows start there). `bandwidth`: the limit on the bodies the destinations carry (a
    migration's uploads, a restore's downloads), None for none."""

    def __init__(self, loaded: LoadedConfig, leaser: TokenLeaser, ceiling: int, *,
                 bandwidth: Bandwidth | None = None):
        self.loaded = loaded
        self._leaser = leaser
        self._ceiling = ceiling
        self._lock = threading.Lock()
        self._pacers: dict[tuple[str, str], EndpointPacer] = {}
        project = loaded.config.project
        self._bandwidth = (SharedRate(f"bandwidth {project}", bandwidth.rate, leaser, min_lease=MIN_BYTES_LEASE)
                           if bandwidth is not None and not bandwidth.timetable.unlimited else None)

    def for_sink(self, destination: str) -> EndpointPacer:
        """The pacer of a destination bucket: its profile's request rates, shared by name with
        every run that writes to the same bucket of the same endpoint."""
        def make() -> EndpointPacer:
            dest = self.loaded.config.destinations[destination]
            rates = destination_profile(self.loaded, destination).request_rates
            where = f"{getattr(dest, 'endpoint_url', None) or dest.host}/{dest.bucket}"
            shared = {kind: self._rate(f"{kind} {where}", getattr(rates, kind))
                      for kind in ("put", "get", "total")}
            per_kind = {kind: [r for r in (shared[kind], shared["total"]) if r is not None] for kind in ("put", "get")}
            return EndpointPacer(per_kind, AdaptiveWindow(f"destination `{destination}`", self._ceiling),
                                 self._bandwidth)
        return self._pacer("sink", destination, make)

    def for_source(self, source: str) -> EndpointPacer:
        """The pacer of a source account: its `request_rate`, shared with every run that reads it."""
        def make() -> EndpointPacer:
            src = self.loaded.config.sources[source]
            where = (getattr(src, "account_url", None) or getattr(src, "endpoint_url", None)
                     or f"{self.loaded.config.project}/sources.{source}")
            total = self._rate(f"total {where}", getattr(src, "request_rate", None))
            kinds = {kind: [total] if total is not None else [] for kind in ("put", "get")}
            return EndpointPacer(kinds, AdaptiveWindow(f"source `{source}`", self._ceiling))
        return self._pacer("source", source, make)

    def throttling(self) -> tuple[Throttling, ...]:
        """The endpoints below their ceiling now, for the progress line."""
        with self._lock:
            pacers = list(self._pacers.values())
        return tuple(t for t in (p.window.throttling() for p in pacers) if t is not None)

    def _pacer(self, kind: str, name: str, make: Callable[[], EndpointPacer]) -> EndpointPacer:
        with self._lock:
            if (kind, name) not in self._pacers:
                self._pacers[(kind, name)] = make()
            return self._pacers[(kind, name)]

    def _rate(self, name: str, rate: float | None) -> SharedRate | None:
        return None if rate is None else SharedRate(name, lambda: rate, self._leaser)


def run_bandwidth(loaded: LoadedConfig, timetable: BandwidthTimetable | None, *,
                  clock: Callable[[], datetime] = _now) -> Bandwidth | None:
    """`timetable` (the configuration's `transfer.bandwidth`, or the command line's `--bwlimit`)
    read in the configuration's `transfer.bandwidth_timezone`; None for no limit."""
    if timetable is None:
        return None
    return Bandwidth(timetable, ZoneInfo(loaded.config.transfer.bandwidth_timezone), clock=clock)
