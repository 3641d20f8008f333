"""`engine.endpoints.DestinationSinks`: each destination's sink opened once, paced once the run's
pacers exist (those already open included), every one closed at the end, a failing close logged."""

from __future__ import annotations

import logging

import pytest

from engine import endpoints
from engine.endpoints import DestinationSinks


class FakeSink:
    def __init__(self, destination: str, pacer, fail_close: bool = False):
        self.destination, self.pacer, self.label = destination, pacer, f"fake:{destination}"
        self.closed = 0
        self._fail_close = fail_close

    def close(self) -> None:
        self.closed += 1
        if self._fail_close:
            raise OSError("the connection was already gone")


class Unpaced:
    """A sink without a `pacer` (an SFTP store's) and without `close`."""

    def __init__(self, destination: str):
        self.destination = destination


@pytest.fixture
def opened(monkeypatch) -> list:
    made: list = []

    def open_sink(loaded, destination, *, pacer):
        sink = Unpaced(destination) if destination == "sftp" else FakeSink(destination, pacer, destination == "bad")
        made.append(sink)
        return sink

    monkeypatch.setattr(endpoints, "open_sink", open_sink)
    return made


def test_each_destination_is_opened_once_and_paced_once_there_are_pacers(opened):
    sinks = DestinationSinks(loaded=None)
    first = sinks("a")
    assert sinks("a") is first and first.pacer is endpoints.UNPACED and sinks("sftp") is opened[1]
    sinks.pace(lambda destination: f"pacer of {destination}")
    assert first.pacer == "pacer of a" and not hasattr(opened[1], "pacer")  # already open: paced now
    assert sinks("b").pacer == "pacer of b"  # opened after: paced from the start
    assert [s.destination for s in opened] == ["a", "sftp", "b"]


def test_close_closes_every_sink_and_logs_one_that_fails(opened, caplog):
    with DestinationSinks(loaded=None) as sinks:
        for name in ("a", "bad", "sftp", "c"):
            sinks(name)
    with caplog.at_level(logging.WARNING):
        sinks.close()  # again: nothing left to close
    assert [s.closed for s in opened if isinstance(s, FakeSink)] == [1, 1, 1]
    assert sinks.opened() == []
    with caplog.at_level(logging.WARNING):
        with DestinationSinks(loaded=None) as again:
            again("bad")
    assert "destination `bad`: closing fake:bad failed (the connection was already gone)" in caplog.text
