"""freeze_setup: what a process built before serving is left out of later collections."""

from __future__ import annotations

import gc
import weakref

from processor.heap import freeze_setup


class Node:
    other: Node | None = None


def test_set_up_objects_are_frozen_and_set_up_garbage_is_collected_first() -> None:
    gc.unfreeze()
    kept = [Node() for _ in range(1_000)]
    garbage = Node()
    garbage.other = garbage  # a cycle only the collector frees
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_setup()
        assert gone() is None  # collected, not frozen for good
        assert gc.get_freeze_count() >= len(kept)
        # Collections no longer visit what was there; what is made afterwards they do.
        later = Node()
        tracked = {id(each) for each in gc.get_objects()}
        assert id(kept[0]) not in tracked and id(later) in tracked
    finally:
        gc.unfreeze()
