"""A steady rate measured inside one run, from the moments its work completed: never a marginal between runs.

A run's *events* are ``(seconds, images)`` pairs on one clock of the run's own: the job's committed parts
reaching the driver (`run_job`'s ``on_part``, `bench.throughput.job`'s arrivals), or the plain script's model
batches as its actor finished them. The same window rule on every side (`in_run_rate`):

- the window starts at the first event at which ≥ 10 % of the run's images are done (start-up and the first
  fill are before it) and ends at the last event at which ≤ 90 % are (the tail, where readers are done and the
  model has the machine to itself, is after it);
- with several actors the window is shortened at its end to a whole multiple of ``actors`` events: parallel
  actors finish their parts in waves, and a window from one wave's first event to a later wave's last would
  count a wave's worth of images more than it timed;
- rate = images of the events after the window's first, up to and including its last ÷ the seconds between the
  two.

`job_in_run` runs the job once with parts of exactly ``rows_per_file`` images (it refuses an input count that
`pipeline.run.block_refs` would cut smaller) and gives its rate by that rule.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

LO, HI = 0.10, 0.90  # the window: from ≥ 10 % of the images done to ≤ 90 %


def in_run_rate(events: Sequence[tuple[float, int]], *, actors: int = 1, lo: float = LO, hi: float = HI) -> dict:
    """Images/s inside one run by the module's window rule; also the window's images, seconds and events.

    Raises ValueError when the window holds fewer than two events (too few parts or batches for a rate).
    """
    events = sorted(events)
    total = sum(n for _, n in events)
    done, start, end = 0, None, None
    for i, (_, n) in enumerate(events):
        done += n
        if start is None and done >= lo * total:
            start = i
        if done <= hi * total:
            end = i
    if start is None or end is None or end <= start:
        raise ValueError(f"no {lo:.0%}-{hi:.0%} window in {len(events)} events of {total} images: more parts needed")
    end -= (end - start) % actors
    if end <= start:
        raise ValueError(f"the window holds fewer than {actors} intervals ({len(events)} events): more parts needed")
    images = sum(n for _, n in events[start + 1 : end + 1])
    seconds = events[end][0] - events[start][0]
    return {
        "images_per_s": images / seconds,
        "window_images": images,
        "window_s": seconds,
        "window_events": [start, end],
        "events": len(events),
        "images": total,
    }


def check_cut(images: int, *, rows_per_file: int, actors: int) -> None:
    """Raise ValueError unless `pipeline.run.block_refs` cuts ``images`` refs into parts of ``rows_per_file`` for
    ``actors`` actors (it cuts a small job smaller, so that the part size would depend on the job's size)."""
    from pipeline.config import ResourceConfig
    from pipeline.run import BLOCKS_PER_ACTOR, block_refs

    cut = block_refs(ResourceConfig(rows_per_file=rows_per_file, max_actors=actors), images)
    if cut != rows_per_file:
        raise ValueError(
            f"{images} images with {actors} actor(s) would be cut into parts of {cut}, not {rows_per_file}: "
            f"give at least {BLOCKS_PER_ACTOR * actors * rows_per_file} images, or smaller parts"
        )


def job_in_run(
    folder: Path,
    *,
    images: int,
    rows_per_file: int,
    min_size: int | None,
    batch_size: int,
    actors: int = 1,
    cpus_per_actor: float | None = None,
) -> dict:
    """One `bench.throughput.job` on ``folder`` (``images`` files; Ray up) with parts of ``rows_per_file``, its
    in-run rate from the part arrivals (`in_run_rate`) beside the job's own figures."""
    from bench.throughput import job

    check_cut(images, rows_per_file=rows_per_file, actors=actors)
    row = job(
        folder,
        min_size=min_size,
        batch_size=batch_size,
        rows_per_file=rows_per_file,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
    )
    if row["images"] != images:
        raise RuntimeError(f"the job committed {row['images']} of {images} images")
    rate = in_run_rate(row["arrivals"], actors=actors)
    keep = ("images_error", "segments_total", "total_s", "startup_s", "actor_torch_threads", "stages")
    return {
        **rate,
        **{k: row[k] for k in keep},
        "actor_reports": row["actors"],
        "parts": row["result_batches"],
        "arrivals": [[round(t, 3), n] for t, n in row["arrivals"]],  # (s since the job's start, images)
        "part_rows": rows_per_file,
    }


def alternate(sides: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Each side once per round, in the order given, ``rounds`` rounds (slow drifts of a shared machine's load
    reach all sides alike): {side: its result of each round}."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, run in sides.items():
            results[side].append(run())
    return results


def ratios(a: Sequence[float], b: Sequence[float]) -> dict:
    """Round by round a / b, and their median."""
    each = [x / y for x, y in zip(a, b)]
    return {"per_round": each, "median": statistics.median(each)}


def emit(report: dict, table: str, *, out: Path | None, markdown: Path | None) -> None:
    """The report as one JSON line on stdout (and indented in ``out``), its table on stderr (and in ``markdown``)."""
    print(json.dumps(report), flush=True)
    print(table, file=sys.stderr, flush=True)
    for path, text in ((out, json.dumps(report, indent=2) + "\n"), (markdown, table)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
