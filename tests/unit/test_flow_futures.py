"""The flows' futures (flows/orchestrate.py): no shard task outlives the loop that submitted it, and
no task's failure is dropped when several fail."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

import flows.orchestrate as orchestrate
from engine.shards import PlannedShard
from flows.tasks import RunProgress


class Listed:
    """Shards as `orchestrate.ShardsAsListed` gives them: `n` shards, in two polls (the listing
    goes on after the first)."""

    def __init__(self, n: int):
        self.shards = [PlannedShard("claims", i, 1, 100) for i in range(n)]
        self.polls = 0

    @property
    def over(self) -> bool:
        return self.polls >= 2

    def poll(self) -> list[PlannedShard]:
        self.polls += 1
        half = len(self.shards) // 2
        return self.shards[:half] if self.polls == 1 else self.shards[half:]

    def listed_bytes(self) -> int:
        return 100 * len(self.shards) if self.over else 50 * len(self.shards)


def test_a_failing_submission_waits_for_the_running_shards_before_it_is_raised(monkeypatch):
    """The caller closes the run (state store, executors) when this raises: a shard still copying
    then would write into a closed run."""
    ended: list[int] = []

    def shard(run_id, dataset, n):
        time.sleep(0.3)
        ended.append(n)
        return n

    def submit(pool, run_id, dataset, n):
        if n == 3:
            raise ConnectionError("the Prefect API did not answer")
        return pool.submit(shard, run_id, dataset, n)

    monkeypatch.setattr(orchestrate, "PROGRESS_EVERY", 0.05)
    monkeypatch.setattr("flows.artifacts.update_progress_artifact", lambda artifact_id, pct: None)
    with ThreadPoolExecutor(3) as pool:
        with pytest.raises(ConnectionError):
            orchestrate._submit_shards(lambda run_id, dataset, n: submit(pool, run_id, dataset, n), 1, Listed(6), 3,
                                       "artifact", RunProgress(0, listing=True), wait_fn=wait,
                                       logger=logging.getLogger("test"))
        returned_with = sorted(ended)
    assert returned_with == [0, 1, 2]  # the three running had ended; nothing else was started


def test_a_progress_update_the_api_misses_is_said_and_the_shards_go_on(monkeypatch, caplog):
    """A run of weeks does not stop because the Prefect API missed one progress update."""
    answered: list[float] = []

    def flaky(artifact_id, pct):
        if not answered or len(answered) % 2:
            answered.append(-1.0)
            raise ConnectionError("the Prefect API did not answer")
        answered.append(pct)

    monkeypatch.setattr("flows.artifacts.update_progress_artifact", flaky)
    monkeypatch.setattr(orchestrate, "PROGRESS_EVERY", 0.02)
    with ThreadPoolExecutor(3) as pool:
        futures = orchestrate._submit_shards(lambda run_id, dataset, n: pool.submit(time.sleep, 0.1), 1, Listed(6), 3,
                                             "artifact", RunProgress(0, listing=True), wait_fn=wait,
                                             logger=logging.getLogger("test"))
    assert len(futures) == 6 and all(f.done() and f.exception() is None for f in futures.values())
    said = [r.getMessage() for r in caplog.records if r.name == "test"]
    assert said and all("could not be updated" in m and "the run goes on" in m for m in said)
    assert any(p > 0 for p in answered)  # a later update got through


class ListedLater:
    """Shards the listing makes final `after` seconds from now, `n` of them; over once they are."""

    def __init__(self, n: int, after: float):
        self.shards = [PlannedShard("claims", i, 1, 100) for i in range(n)]
        self.at = time.monotonic() + after
        self.given = False

    @property
    def over(self) -> bool:
        return self.given

    def poll(self) -> list[PlannedShard]:
        if self.given or time.monotonic() < self.at:
            return []
        self.given = True
        return self.shards

    def listed_bytes(self) -> int:
        return 100 * len(self.shards)


def test_a_shard_starts_when_the_listing_makes_it_final_and_when_a_place_frees_not_at_the_next_update(monkeypatch):
    """The loop waits for the progress update's period only when nothing else can happen: a shard
    that ends frees its place at once, and the listing's first shards are looked for often."""
    started: dict[int, float] = {}

    def shard(n):
        started[n] = time.monotonic()
        time.sleep(0.1)
        return n

    monkeypatch.setattr(orchestrate, "PROGRESS_EVERY", 30.0)  # an update would come far too late
    monkeypatch.setattr("flows.artifacts.update_progress_artifact", lambda artifact_id, pct: None)
    began = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        futures = orchestrate._submit_shards(lambda run_id, dataset, n: pool.submit(shard, n), 1, ListedLater(4, 0.3),
                                             1, "artifact", RunProgress(0, listing=True), wait_fn=wait,
                                             logger=logging.getLogger("test"))
    assert sorted(started) == [0, 1, 2, 3] and all(f.result() == n for (_, n), f in futures.items())
    assert started[0] - began < 0.3 + orchestrate.LISTING_POLL + 0.2  # looked for while the listing went on
    gaps = [started[n + 1] - started[n] for n in range(3)]  # one place: each starts when the last ended
    assert all(gap < 0.3 for gap in gaps), gaps
    assert time.monotonic() - began < 2.0


def test_every_task_ends_and_every_failure_is_kept_when_several_fail():
    release = threading.Event()

    def inventory(name):
        release.wait(5)
        if name != "scans":
            raise RuntimeError(f"dataset {name}: the source is unreachable")
        return {"dataset": name}

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(inventory, name) for name in ("claims", "scans", "imaging")]
        release.set()
        with pytest.raises(RuntimeError, match="dataset claims") as raised:
            orchestrate._every_result(futures)
        assert all(f.done() for f in futures)
    assert any("dataset imaging: the source is unreachable" in note for note in raised.value.__notes__)
    with ThreadPoolExecutor(2) as pool:
        assert orchestrate._every_result([pool.submit(lambda n=n: n) for n in range(4)]) == [0, 1, 2, 3]


def test_the_progress_grows_with_the_listing_and_says_100_only_once_it_is_over():
    progress = RunProgress(0, listing=True)
    assert progress.percent() == 0.0  # nothing final yet: not "done"
    progress.add([PlannedShard("claims", 0, 1, 100), PlannedShard("claims", 1, 1, 100)])
    progress.total_bytes = 200
    progress.shard_finished("claims", 0)
    assert progress.percent() == 50.0
    progress.shard_finished("claims", 1)
    assert progress.percent() == 99.9  # every shard so far went through, more may be listed
    progress.add([PlannedShard("claims", 2, 1, 200)])
    progress.total_bytes = 400
    assert progress.percent() == 50.0  # the share goes back as the listing grows
    progress.listing = False
    progress.shard_finished("claims", 2)
    assert progress.percent() == 100.0
    assert RunProgress(0).percent() == 100.0  # a run with nothing to copy


class Ended:
    """A listing task that has ended, as `ShardsAsListed` reads it."""

    def __init__(self, error: BaseException | None = None):
        self.error = error

    def wait(self) -> None:
        pass

    def result(self):
        if self.error is not None:
            raise self.error
        return {"dataset": "x"}


def test_a_run_stopping_on_another_error_names_a_listing_that_failed_of_itself_meanwhile():
    """The run stops on, say, the Prefect API: the listings still going stop at their next page (they
    only say so), and one that failed for its own reason at the same moment is named with the error."""
    from engine.listing import ListingStopped

    stopped = []

    class Run:
        def stop_listing(self):
            stopped.append(True)

    listed = orchestrate.ShardsAsListed(Run(), {
        "claims": Ended(ListingStopped("claims: the run stopped before the listing ended")),
        "scans": Ended(RuntimeError("dataset scans: the source is unreachable")),
        "imaging": Ended(),
    })
    error = ConnectionError("the Prefect API did not answer")
    listed.stop(error)
    assert stopped == [True]
    assert error.__notes__ == ["a listing failed too: RuntimeError: dataset scans: the source is unreachable"]
