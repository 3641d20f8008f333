"""Paths that could lose or overwrite an object without a word: a source object named like
exitplan's own files, and a listed object whose row the state store could not write being taken
for an object gone from the source (and its copy deleted)."""

from __future__ import annotations

import pytest

from connectors.base import ObjectMeta, SinkLimits
from connectors.memory import MemoryStore
from engine import state as st
from engine.placement import DoesNotFit, place
from engine.run import handle_removed
from engine.state import StateStore

LIMITS = SinkLimits(min_part_size=5 * 1024 * 1024)


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "state.db")
    yield s
    s.close()


def test_an_object_is_never_placed_where_exitplan_keeps_its_keyset_and_manifest():
    """With no `dest_prefix`, a source blob named `_exitplan/<project>/keyset.json` used to be
    written over the keyset copy next to the data (and verify and restore skipped it)."""
    meta = ObjectMeta(key="_exitplan/acme/keyset.json", size=10, etag="e")
    with pytest.raises(DoesNotFit, match=r"where exitplan keeps its own files \(keyset copies, the audit manifest\); "
                                         "give the dataset a `dest_prefix`"):
        place(meta, "", "", LIMITS)
    assert place(meta, "", "data/", LIMITS).dest_key == "data/_exitplan/acme/keyset.json"


def test_a_listed_object_without_a_row_is_not_taken_for_one_gone_from_the_source(store):
    """Run 2 listed both objects, but the state store failed as it recorded `b`: `b` must not
    look deleted at the source, nor its copy be deleted with --delete-removed."""
    sink = MemoryStore()
    first = store.start_run("migrate")
    for key in ("a", "b"):
        oid = store.add_object(first, "d", key, "e", 1, dest_key=f"x/{key}", state=st.IN_PROGRESS)
        store.transition(oid, st.UPLOADED, dest_etag="t")
        sink.add(f"x/{key}", b"1")
    second = store.start_run("migrate")
    store.add_object(second, "d", "a", "e", 1, dest_key="x/a", state=st.UNCHANGED)  # b's row was lost

    removed = handle_removed(store, second, "d", sink, delete=True, listed=2)
    assert (removed.count, removed.deleted) == (0, 0)
    assert removed.not_looked_for.startswith("1 of the 2 objects this run listed have no row in the state store")
    assert sorted(sink.keys()) == ["x/a", "x/b"]

    # With every listed object recorded, what is gone is found and deleted as before.
    removed = handle_removed(store, second, "d", sink, delete=True, listed=1)
    assert (removed.count, removed.deleted, removed.not_looked_for) == (1, 1, None)
    assert sorted(sink.keys()) == ["x/a"]
