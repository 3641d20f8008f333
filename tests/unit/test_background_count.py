"""The listing pass that gives migrate's progress its totals runs beside the copy, not before it:
its totals arrive when it is through, it stops when the copy ends first, and a failure of it is
said (logged) and changes nothing else."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

from config.models import DatasetConfig
from connectors.base import TransientError
from connectors.memory import MemoryStore
from engine.run import BackgroundCount


def _loaded(ds: DatasetConfig):
    return SimpleNamespace(config=SimpleNamespace(datasets={"d": ds}))


def _source(n: int) -> MemoryStore:
    store = MemoryStore(label="src")
    for i in range(n):
        store.add(f"in/{i:05d}.csv", b"x" * (i % 7))
    store.add("elsewhere/not-selected", b"y" * 100)
    return store


def test_the_totals_arrive_when_the_pass_is_through():
    done = threading.Event()
    figures = []

    def counted(objects, total):
        figures.append((objects, total))
        done.set()

    count = BackgroundCount(_loaded(DatasetConfig(source="s", container="c", prefix="in/", destination="d")), "d",
                            _source(2500), lambda *a: None, counted)
    assert done.wait(10)
    count.stop()
    assert figures == [(2500, sum(i % 7 for i in range(2500)))]


def test_a_copy_that_ends_first_stops_the_count_and_no_total_comes():
    release = threading.Event()
    real = _source(5000).list

    def slow_list(prefix=""):
        for i, meta in enumerate(real(prefix)):
            if i == 1500:
                release.wait(10)
            yield meta

    source = SimpleNamespace(list=slow_list, label="src")  # listed with `list` (not in pages)
    figures, so_far = [], []

    def counting(objects, total):
        so_far.append(objects)

    count = BackgroundCount(_loaded(DatasetConfig(source="s", container="c", destination="d")), "d", source,
                            counting, lambda *a: figures.append(a))
    stopper = threading.Thread(target=count.stop)
    stopper.start()
    release.set()
    stopper.join(10)
    assert not count._thread.is_alive()
    assert figures == [] and so_far in ([], [1000])


def test_a_count_that_fails_is_said_and_nothing_else_happens(caplog):
    def broken(prefix=""):
        raise TransientError("src: listing failed (503)")
        yield  # pragma: no cover

    source = SimpleNamespace(list=broken, label="src")
    figures = []
    caplog.set_level(logging.WARNING, logger="engine.run")
    count = BackgroundCount(_loaded(DatasetConfig(source="s", container="c", destination="d")), "d", source,
                            lambda *a: None, lambda *a: figures.append(a))
    count._thread.join(10)
    count.stop()
    assert figures == []
    [record] = [r for r in caplog.records if r.name == "engine.run"]
    assert "progress goes on without them" in record.getMessage() and "503" in record.getMessage()


def test_the_count_asks_a_source_for_names_and_sizes_only():
    """A source that asks each listed object for more (`source_details`: HEAD and tagging on S3,
    the metadata files on SFTP) is listed bare for the count: it needs sizes only."""
    real = _source(10).list
    asked = []

    def listing(prefix="", *, details=None):
        asked.append(details)
        return real(prefix)

    source = SimpleNamespace(list=listing, label="src", source_details=True)
    done = threading.Event()
    figures = []
    count = BackgroundCount(_loaded(DatasetConfig(source="s", container="c", prefix="in/", destination="d")), "d",
                            source, lambda *a: None, lambda *f: (figures.append(f), done.set()))
    assert done.wait(10)
    count.stop()
    assert figures == [(10, sum(i % 7 for i in range(10)))] and asked == [False]
