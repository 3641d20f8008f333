"""The process-level settings a run makes: the collector's long-lived objects frozen while runs are open."""

from __future__ import annotations

import gc
import weakref

from engine.allocator import freeze_long_lived, thaw_long_lived


def test_long_lived_objects_stay_frozen_until_the_last_open_run_ends():
    held = [object() for _ in range(3)]  # alive when the first run opens
    assert gc.get_freeze_count() == 0
    freeze_long_lived()
    try:
        frozen = gc.get_freeze_count()
        assert frozen >= len(held)
        freeze_long_lived()  # a second run of the same process (shards of a flow, a test)
        thaw_long_lived()  # ... ends: the first is still open
        assert gc.get_freeze_count() >= frozen
    finally:
        thaw_long_lived()
    assert gc.get_freeze_count() == 0
    thaw_long_lived()  # one call too many changes nothing
    assert gc.get_freeze_count() == 0


def test_a_cycle_frozen_with_a_run_is_collected_once_it_ended():
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # alive when the run opens: frozen with it
    gone = weakref.ref(a)
    freeze_long_lived()
    del a, b
    gc.collect()
    assert gone() is not None  # frozen: out of the collector's reach while the run is open
    thaw_long_lived()
    gc.collect()
    assert gone() is None
