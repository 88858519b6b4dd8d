"""The job on the real model on CPU with different actor layouts on this node: images/s per (actors × CPUs each).

Each layout ``AxC`` (``--layouts``, default ``1x2,2x1``: the pipeline's own choice on this node, 1 actor of half
the local Ray's 4 logical CPUs, vs two 1-CPU actors) runs `pipeline.run.run_job` (`bench.in_run.job_in_run`)
with ``--min-actors = --max-actors = A`` and ``--cpus-per-actor C`` (C torch threads per actor: Ray sets
OMP_NUM_THREADS) on the same ``--images`` files of ``--photo-size`` (`bench.inputs.write_image_set`: ``tiny`` or
``HEIGHTxWIDTH``), synthetic weights, ``--min-size``, ``--batch-size``, parts of exactly ``--rows-per-file``
(at least 4 × A parts: `pipeline.run.block_refs`). The rate is measured inside each run, from the parts'
arrivals at the driver (`bench.in_run.in_run_rate`: 10 %-90 % of the images, whole waves of A parts).
``--rounds`` rounds, the layouts in turn; per layout each round's images/s, the median, and its ratio to the
first layout (per round, median). One local Ray (4 logical CPUs); run it under ``flock /tmp/pf-ray-tests.lock``.
One JSON document to stdout (and ``--out``), a markdown table to stderr (and ``--markdown``)::

    flock /tmp/pf-ray-tests.lock .venv/bin/python -m bench.cpu_layout --layouts 1x2,2x1 --images 512 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from functools import partial
from pathlib import Path


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """``"1x2,2x1"`` -> [(1, 2), (2, 1)] (actors, CPUs per actor); ValueError naming a malformed entry."""
    layouts = []
    for entry in text.split(","):
        actors, _, cpus = entry.strip().partition("x")
        if not (actors.isdigit() and cpus.isdigit() and int(actors) > 0 and int(cpus) > 0):
            raise ValueError(f"a layout is ACTORSxCPUS (e.g. 2x1), got {entry!r}")
        layouts.append((int(actors), int(cpus)))
    return layouts


def markdown(report: dict) -> str:
    names = list(report["layouts"])
    rounds = len(report["layouts"][names[0]]["images_per_s"])
    head = " | ".join(f"round {r + 1}" for r in range(rounds))
    lines = [
        f"| layout (actors × CPUs) | {head} | median (images/s) | / {names[0]} (median of rounds) |",
        "|---|" + "---:|" * (rounds + 2),
    ]
    for name, layout in report["layouts"].items():
        each = " | ".join(f"{x:.2f}" for x in layout["images_per_s"])
        lines.append(f"| {name} | {each} | {layout['median']:.2f} | {layout['over_first']['median']:.3f} |")
    s = report["settings"]
    note = (
        f"{s['images']} images of {s['photo_size']}, min_size {s['min_size']}, batch {s['batch_size']}, parts of "
        f"{s['rows_per_file']}; rate inside each run from the part arrivals."
    )
    return "\n".join([*lines, "", note]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=parse_layouts, default=parse_layouts("1x2,2x1"), help="e.g. 1x2,2x1,1x4,4x1")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--photo-size", default="480x640", help="'tiny' (32×32) or HEIGHTxWIDTH")
    parser.add_argument("--rows-per-file", type=int, default=64)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)

    from bench.in_run import alternate, check_cut, emit, job_in_run, ratios
    from bench.inputs import write_image_set
    from bench.local_ray import NUM_CPUS, local_ray
    from bench.machine import contention, describe

    for actors, cpus in args.layouts:  # before any run
        if actors * cpus > NUM_CPUS:
            raise ValueError(f"layout {actors}x{cpus} reserves more than the local Ray's {NUM_CPUS} CPUs")
        check_cut(args.images, rows_per_file=args.rows_per_file, actors=actors)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "markdown")}
    report: dict = {"machine": describe(), "settings": settings}
    folder = Path(tempfile.mkdtemp(prefix="pfb-layout-"))
    try:
        write_image_set(folder, args.images, args.photo_size)
        run = partial(
            job_in_run,
            folder,
            images=args.images,
            rows_per_file=args.rows_per_file,
            min_size=args.min_size,
            batch_size=args.batch_size,
        )
        sides = {f"{a}x{c}": partial(run, actors=a, cpus_per_actor=float(c)) for a, c in args.layouts}
        with local_ray():
            rounds = alternate(sides, args.rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rates = {name: [r["images_per_s"] for r in runs] for name, runs in rounds.items()}
    first = rates[next(iter(rates))]
    report["layouts"] = {
        name: {
            "images_per_s": rate,
            "median": statistics.median(rate),
            "over_first": ratios(rate, first),
            "torch_threads": sorted({t["torch_threads"] for r in rounds[name] for t in r["actor_reports"]}),
            "rounds": rounds[name],
        }
        for name, rate in rates.items()
    }
    report["contention_after"] = contention()
    emit(report, markdown(report), out=args.out, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
