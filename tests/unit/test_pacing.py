"""Pacing: shared token buckets in the state database, the adaptive window of requests in flight,
the bandwidth timetable (its clock injected), and what the configuration and the CLI accept."""

from __future__ import annotations

import logging
import multiprocessing
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from config.bandwidth import parse_bandwidth
from engine.pacing import AdaptiveWindow, Bandwidth, LocalLeaser, SharedRate, Throttling
from engine.state import StateStore
from flows.cli import main
from flows.progress import ProgressDisplay
from tests.pacing_spender import spend
from tests.unit.test_config import PROD, variant, write

PARIS = ZoneInfo("Europe/Paris")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- the shared bucket ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path):
    url = (str(tmp_path / "state.db") if request.param == "sqlite"
           else request.getfixturevalue("postgres").create_database(f"pacing_{abs(hash(str(tmp_path))) % 10**8}"))
    StateStore(url).close()  # the tables made once, before two processes open them
    return url


def test_two_processes_share_one_request_rate_through_the_state_database(state_url):
    """Two processes taking from the same limit of 40/s for 2 s get about 80 tokens together,
    not 80 each: the bucket is one row, leased in batches by a single UPDATE."""
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    workers = [ctx.Process(target=spend, args=(state_url, "put s3://lab/bucket", 40.0, 2.0, start, out))
               for _ in range(2)]
    for w in workers:
        w.start()
    taken = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    # Together at most 40/s over the same 2 s, plus one lease of 4 each; each got its share.
    assert all(n > 10 for n in taken), taken
    assert 60 <= sum(taken) <= 2 * 40 + 2 * 4 + 2, taken


def test_a_lease_beyond_the_tokens_there_says_how_long_to_wait(tmp_path):
    store = StateStore(tmp_path / "state.db")
    try:
        # A new bucket starts empty: 5 tokens at 10/s are there after 0.5 s.
        assert store.lease_tokens("get s3://x/b", 10.0, 5.0, 5.0) == pytest.approx(0.5, abs=0.05)
        # Reserved ahead: the next 5 wait behind them.
        assert store.lease_tokens("get s3://x/b", 10.0, 5.0, 5.0) == pytest.approx(1.0, abs=0.05)
        # Another bucket is another row.
        assert store.lease_tokens("put s3://x/b", 10.0, 5.0, 1.0) == pytest.approx(0.1, abs=0.05)
    finally:
        store.close()


def test_a_process_leases_a_tenth_of_a_second_at_a_time():
    leases = []

    class Recording(LocalLeaser):
        def lease_tokens(self, name, rate, burst, amount):
            leases.append(amount)
            return super().lease_tokens(name, rate, burst, amount)

    clock = _Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    limit = SharedRate("put x", lambda: 300.0, Recording(clock), sleep=sleep)
    for _ in range(300):
        limit.take()
    assert leases == [30.0] * 10  # ten leases for 300 requests, not 300
    assert clock.now == pytest.approx(1.0)  # 300 requests at 300/s


# ---- requests in flight -----------------------------------------------------------------------


def test_throttling_halves_the_requests_in_flight_once_then_they_climb_back(caplog):
    clock = _Clock()
    window = AdaptiveWindow("destination `ovh`", 8, clock=clock)
    caplog.set_level(logging.INFO, logger="engine.pacing")

    def answer(throttled=None):
        window.enter()
        window.leave(throttled)

    answer("SlowDown (HTTP 503)")
    assert (window.limit, window.throttling()) == (4, Throttling("destination `ovh`", 4, 8))
    answer("SlowDown (HTTP 503)")  # an answer to a request sent before the cut: nothing new
    assert window.limit == 4
    clock.now = 1.5
    answer("SlowDown (HTTP 503)")
    assert window.limit == 2
    for second in (3, 4.5, 6):  # down to one, and no line more while it stays there
        clock.now = second
        answer("SlowDown (HTTP 503)")
    assert window.limit == 1
    answer()
    for _ in range(1 + 2 + 3 + 4 + 5 + 6 + 7 - 1):  # one more after each window's worth of calm answers
        answer()
    assert window.limit == 8 and window.throttling() is None
    for _ in range(20):
        answer()
    assert window.limit == 8  # never above the ceiling
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.pacing"]
    assert lines[:3] == [f"destination `ovh`: throttled (SlowDown (HTTP 503)), {n}/8 requests in flight"
                         for n in (4, 2, 1)]
    assert lines[3:] == [f"destination `ovh`: no throttling for {n - 1} answers, {n}/8 requests in flight"
                         for n in range(2, 9)]  # one line per change, none per request


def test_a_thread_never_holds_two_places():
    """An attempt whose end was never reported (an SDK error between send and answer) leaves its
    place to the thread's next attempt, not lost for good."""
    window = AdaptiveWindow("source `az`", 2)
    window.enter()
    window.enter()  # the same thread again: its place already
    window.leave(None)
    window.leave(None)  # nothing more to give back
    window.enter()
    window.enter()
    window.leave(None)


def test_a_place_given_back_wakes_one_waiting_thread_not_all():
    """Threads waiting for a place in the window are woken as places free up, one per place: each
    gets in, none is left waiting, and none wakes only to find the window full again."""
    import threading
    import time

    window = AdaptiveWindow("s3:x", 1)
    wakes = []

    class Counting(threading.Condition):
        def wait(self, timeout=None):
            woke = super().wait(timeout)
            wakes.append(threading.current_thread().name)
            return woke

    window._cond = Counting()
    window.enter()
    entered = []

    def one():
        window.enter()
        entered.append(threading.current_thread().name)
        time.sleep(0.01)
        window.leave(None)

    threads = [threading.Thread(target=one, name=f"t{i}") for i in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(window._cond._waiters) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    window.leave(None)
    for t in threads:
        t.join(10)
    assert sorted(entered) == [f"t{i}" for i in range(5)] and window._in_flight == 0
    assert len(wakes) == 5, wakes  # all woken at each place given back: 5 + 4 + 3 + 2 + 1


def test_the_progress_line_names_what_is_throttled():
    import io

    display = ProgressDisplay(io.StringIO())
    display.start("claims", 10, 1000)
    display.update(500, 5, 0, throttling=(Throttling("destination `ovh`", 4, 8),), force=True)
    line = display.stream.getvalue().splitlines()[-1]
    assert line.startswith("claims: 500 B / 1000 B (50%)")
    assert line.endswith("; destination `ovh` throttled: 4/8 in flight")


# ---- bandwidth --------------------------------------------------------------------------------


def test_a_timetable_switches_at_its_times_in_its_zone():
    table = parse_bandwidth("08:00,1M 19:00,off 12:30,512KiB")
    at = lambda h, m: datetime(2026, 12, 2, h, m, tzinfo=PARIS)  # noqa: E731
    assert table.rate_at(at(7, 59), PARIS) is None  # before the first switch: yesterday's last, off
    assert table.rate_at(at(8, 0), PARIS) == 1_000_000
    assert table.rate_at(at(12, 30), PARIS) == 512 * 1024
    assert table.rate_at(at(19, 0), PARIS) is None
    # 07:30 UTC is 08:30 in Paris in December.
    assert table.rate_at(datetime(2026, 12, 2, 7, 30, tzinfo=timezone.utc), PARIS) == 1_000_000
    assert parse_bandwidth("20M").rate_at(at(3, 0), PARIS) == 20_000_000


def test_the_bandwidth_follows_the_timetable_while_running(caplog):
    """The clock is injected: the limit switches at 08:00 and at 19:00 without waiting for them."""
    now = [datetime(2026, 12, 2, 7, 59, tzinfo=PARIS)]
    bandwidth = Bandwidth(parse_bandwidth("08:00,1M 19:00,off"), PARIS, clock=lambda: now[0])
    slept: list[float] = []
    limit = SharedRate("bandwidth p", bandwidth.rate, LocalLeaser(), min_lease=64 * 1024, sleep=slept.append)
    caplog.set_level(logging.INFO, logger="engine.pacing")
    limit.take(5_000_000)
    assert slept == []  # off before 08:00
    now[0] = datetime(2026, 12, 2, 8, 0, tzinfo=PARIS)
    limit.take(1_000_000)
    assert sum(slept) == pytest.approx(1.0, abs=0.05)  # 1 MB at 1 MB/s
    now[0] = datetime(2026, 12, 2, 19, 0, tzinfo=PARIS)
    limit.take(50_000_000)
    assert sum(slept) == pytest.approx(1.0, abs=0.05)
    assert [r.getMessage() for r in caplog.records if r.name == "engine.pacing"] == [
        "bandwidth limit now off (08:00,1M 19:00,off, Europe/Paris)",
        "bandwidth limit now 976.6 KiB/s (08:00,1M 19:00,off, Europe/Paris)",
        "bandwidth limit now off (08:00,1M 19:00,off, Europe/Paris)",
    ]


@pytest.mark.parametrize("text, problem", [
    ("8h,50M", "`8h,50M` is not an entry `HH:MM,RATE`"),
    ("25:00,1M", "25:00 is not a time of day"),
    ("08:00,fast", "`fast` is not a rate"),
    ("08:00,1M 08:00,off", "08:00 is given twice"),
    ("100", "below 1 KiB/s"),
])
def test_a_bandwidth_that_cannot_be_read_is_one_sentence_with_an_example(tmp_path, text, problem, capsys):
    path = write(tmp_path, variant(transfer={"bandwidth": text}))
    assert main(["migrate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "field `transfer.bandwidth`" in err and problem in err and '"08:00,50M 19:00,off"' in err
    assert main(["restore", "--config", str(write(tmp_path, PROD)), "-d", "claims", "--to", str(tmp_path / "out"),
                 "--bwlimit", text]) == 2
    err = capsys.readouterr().err
    assert f"--bwlimit {text!r}" in err and problem in err and '"08:00,50M 19:00,off"' in err


def test_a_time_zone_that_does_not_exist_is_refused(tmp_path, capsys):
    path = write(tmp_path, variant(transfer={"bandwidth_timezone": "Europe/Atlantis"}))
    assert main(["migrate", "--config", str(path)]) == 2
    assert "field `transfer.bandwidth_timezone`: 'Europe/Atlantis' is not a time zone name" in capsys.readouterr().err
