"""GcTuning: what survives a full collection is frozen out of later ones, and thawed again."""

from __future__ import annotations

import asyncio
import gc

from paystream.ops.gc_tuning import GcTuning


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


async def test_survivors_of_a_full_collection_are_frozen_then_thawed() -> None:
    gc.unfreeze()
    tuning = GcTuning()
    tuning.start()
    try:
        kept = [Node() for _ in range(1000)]
        assert gc.get_freeze_count() == 0
        gc.collect(2)
        await asyncio.sleep(0)  # the freeze runs from the loop, just after the collection
        assert gc.get_freeze_count() >= len(kept)

        # A cycle made after the freeze is still the collector's to find.
        a, b = Node(), Node()
        a.peer, b.peer = b, a
        del a, b
        assert gc.collect(2) >= 2

        tuning.thaw()
        assert gc.get_freeze_count() == 0
    finally:
        await tuning.stop()
        gc.unfreeze()


async def test_stop_removes_the_callback() -> None:
    tuning = GcTuning()
    tuning.start()
    await tuning.stop()
    assert tuning._after_collection not in gc.callbacks  # noqa: SLF001
