"""`engine.cleanup._temporary`: which files of an SFTP destination's temporary directory cleanup
names and removes (the end-to-end test runs it against sshd)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from connectors.sftp import TemporaryFile
from engine.cleanup import TEMPORARY_AGE, _temporary


class _Sink:
    def __init__(self, files):
        self.files, self.removed = files, []

    def temporary_files(self):
        return self.files

    def remove_temporary_file(self, name):
        self.removed.append(name)


def _files():
    now = datetime.now(timezone.utc)
    return [TemporaryFile("old", 10, now - timedelta(seconds=TEMPORARY_AGE + 60)),
            TemporaryFile("fresh", 20, now - timedelta(seconds=60)),
            TemporaryFile("undated", 30, None)]


def test_old_files_are_named_and_removed_on_request_fresh_ones_never_undated_ones_named_only():
    sink = _Sink(_files())
    listed = _temporary(lambda name: sink, "escrow", abort=False)
    assert [(t.name, t.removed) for t in listed] == [("old", False), ("undated", False)]
    assert sink.removed == []
    listed = _temporary(lambda name: sink, "escrow", abort=True)
    assert [(t.name, t.removed) for t in listed] == [("old", True), ("undated", False)]
    assert sink.removed == ["old"]


def test_a_sink_without_a_temporary_directory_has_nothing_to_name():
    assert _temporary(lambda name: object(), "bucket", abort=True) == []
