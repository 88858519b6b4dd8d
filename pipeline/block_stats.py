"""Keeps the driver's memory flat over long jobs: caps the per-block statistics Ray Data retains.

Every Ray Data operator keeps one `BlockStats` (with its `BlockExecStats`) for each block it has output, in a
list that lives as long as the dataset's execution (`MapOperator._output_blocks_stats`; ray-project/ray#66016,
still so in Ray 2.60). The list feeds only the summary printed by ``Dataset.stats()``, which this pipeline
does not use, yet it grows with every block: a few hundred bytes per image in the driver, i.e. gigabytes over
100 M images. `CapBlockStats` is a Ray Data execution callback that, at each scheduling step, trims each
operator's list to its newest ``KEEP`` entries once it holds ``CAP``: the stats summary then covers the newest
blocks only; nothing else reads these lists.

If a future Ray renames the attribute, the callback finds no list and does nothing (`capped_operators` says so;
`tests/pipeline/test_block_stats.py` fails loudly in that case, so the loss is noticed on upgrade).
"""

from __future__ import annotations

from ray.data import DataContext
from ray.data._internal.execution.execution_callback import ExecutionCallback

STATS_ATTRIBUTE = "_output_blocks_stats"  # per-operator list of BlockStats, one per output block
CAP = 2048  # entries per operator before a trim
KEEP = 1024  # newest entries kept by a trim


class CapBlockStats(ExecutionCallback):
    """Trims each operator's retained block statistics to the newest `KEEP` once they reach `CAP`."""

    def on_execution_step(self, executor) -> None:  # executor: StreamingExecutor (private type)
        for stats in _stats_lists(executor):
            if len(stats) >= CAP:
                del stats[:-KEEP]


def capped_operators(executor) -> int:
    """How many of ``executor``'s operators keep a statistics list this callback can trim."""
    return len(_stats_lists(executor))


def _stats_lists(executor) -> list[list]:
    topology = getattr(executor, "_topology", None) or {}
    lists = (getattr(op, STATS_ATTRIBUTE, None) for op in topology)
    return [stats for stats in lists if isinstance(stats, list)]


def install(context: DataContext) -> None:
    """Register `CapBlockStats` on ``context`` (once) for every dataset executed under it."""
    if CapBlockStats not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(CapBlockStats)
