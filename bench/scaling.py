"""How job time and driver memory grow with the number of (tiny) images, on CPU.

Each size runs in its own subprocess (so ``ru_maxrss``, a high-water mark, is that run's own): it writes
N distinct 32×32 JPEGs, starts its own local Ray, runs `pipeline.run.run_job` with ``min_size`` 32 and
synthetic weights, and reports total time, start-up, steady-state time per image (as in
`bench.throughput`) and the driver's RSS before the job and its peak. Linear time means a flat
steady-state ms/image; a driver that does not hold per-image state means a peak that does not grow with N
(except for the writer's buffer: results are committed every ``rows_per_file`` images and held until then,
which is why each size runs with the default 2048 and with 256).

    python -m bench.scaling [--sizes 200 1000 2000] [--rows-per-file 2048 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = 32


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (/proc/self/statm)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _one(n: int, *, batch_size: int, rows_per_file: int) -> dict:
    from bench.inputs import write_tiny_set
    from bench.local_ray import local_ray
    from bench.machine import contention
    from bench.throughput import job

    with tempfile.TemporaryDirectory(prefix="pfb-tiny-") as tmp:
        write_tiny_set(Path(tmp), n, size=TINY)
        with local_ray() as ray_info:
            rss_before = _rss_mib()
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            result = job(Path(tmp), min_size=TINY, batch_size=batch_size, rows_per_file=rows_per_file)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rss_after = _rss_mib()
            busy = contention()
    steady_images = result["steady_images"]
    return {
        **result,
        "ray_init_s": ray_info["ray_init_s"],
        "steady_ms_per_image": 1e3 * result["steady_s"] / steady_images if steady_images else None,
        "total_ms_per_image": 1e3 * result["total_s"] / result["images"],
        "driver_rss_before_mib": rss_before,
        "driver_peak_rss_before_job_mib": peak_before,
        "driver_peak_rss_mib": peak,
        "driver_rss_after_mib": rss_after,
        "contention": busy,
    }


def run(sizes: tuple[int, ...], *, batch_size: int = 8, rows_per_file: tuple[int, ...] = (2048, 256)) -> dict:
    """One subprocess per (rows_per_file, size); returns {"rows": [...]}, one row each."""
    rows = []
    for per_file in rows_per_file:
        for n in sizes:
            cmd = [sys.executable, "-m", "bench.scaling", "--one", str(n)]
            cmd += ["--batch-size", str(batch_size), "--rows-per-file", str(per_file)]
            start = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = {**json.loads(out), "rows_per_file": per_file, "subprocess_s": time.perf_counter() - start}
            rows.append(row)
            print(
                f"  scaling: {n} images, rows_per_file {per_file}: {row['total_s']:.1f} s total, "
                f"{row['steady_ms_per_image']:.1f} ms/image steady, driver peak {row['driver_peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return {"image_size": TINY, "min_size": TINY, "batch_size": batch_size, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-file", type=int, nargs="+", default=[2048, 256])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one, batch_size=args.batch_size, rows_per_file=args.rows_per_file[0])))
        return 0
    result = run(tuple(args.sizes), batch_size=args.batch_size, rows_per_file=tuple(args.rows_per_file))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
