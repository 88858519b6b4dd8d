"""`pipeline.block_stats`: Ray Data's per-block statistics stay bounded in the driver with the callback, and
grow with the blocks without it (the same dataset, side by side)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import ray
from ray.data import DataContext
from ray.data.block import BlockStats

from pipeline import block_stats
from pipeline.block_stats import CapBlockStats, capped_operators

BLOCKS = 400


def _identity(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


def _alive_block_stats() -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is BlockStats)


def _most_alive(callbacks: list[type]) -> tuple[int, int]:
    """(most BlockStats alive while iterating, rows seen) for a dataset of `BLOCKS` blocks of 4 rows."""
    context = DataContext.get_current()
    previous = context.custom_execution_callback_classes
    context.custom_execution_callback_classes = callbacks
    try:
        ds = ray.data.range(BLOCKS * 4).repartition(target_num_rows_per_block=4).map_batches(_identity, num_cpus=0.5)
        most, rows = 0, 0
        for i, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
            rows += len(batch["id"])
            if i % 40 == 39:
                most = max(most, _alive_block_stats())
        return max(most, _alive_block_stats()), rows
    finally:
        context.custom_execution_callback_classes = previous


def test_cap_bounds_the_retained_block_stats(ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_stats, "CAP", 40)
    monkeypatch.setattr(block_stats, "KEEP", 20)
    operators_seen: list[int] = []

    class Recording(CapBlockStats):
        def on_execution_step(self, executor) -> None:
            operators_seen.append(capped_operators(executor))
            super().on_execution_step(executor)

    gc.collect()
    uncapped, rows_uncapped = _most_alive([])
    gc.collect()
    capped, rows_capped = _most_alive([Recording])
    assert rows_uncapped == rows_capped == BLOCKS * 4  # trimming statistics loses no row
    # Ray still keeps the lists under the attribute the callback trims (fails after a rename in Ray)
    assert max(operators_seen) >= 2
    # without the cap: one per block and operator, for the whole run; with it: at most CAP per operator, plus
    # the blocks in flight
    assert uncapped >= 2 * BLOCKS and capped <= 4 * 40 + 60, (uncapped, capped)
