"""Measurement script (not a test): the cost of the ref-level resume filter and de-duplication.

Two figures quoted in the README (section "Resume, exactly once, failures")::

    # seconds until the first ref leaves `pipeline.exactly_once.resume.decide` on Ray, for a Parquet manifest of N URIs
    python -m tests.pipeline.measure_resume refs --n 1000000                 # fresh: the de-duplication
    python -m tests.pipeline.measure_resume refs --n 1000000 --committed 500000  # resume
    python -m tests.pipeline.measure_resume refs --n 1000000 --plain         # no aggregation (baseline)
    # a small re-run's plan with 1 vs 4 aggregation partitions
    (`pipeline.exactly_once.resume_executors.shuffle_partitions`)
    python -m tests.pipeline.measure_resume refs --n 8 --committed 8 --partitions 1
    # peak RSS of the driver process of a resume whose N inputs are all committed already
    python -m tests.pipeline.measure_resume rss --n 100000

Fake committed parts are written with pyarrow (8192 rows each); no model runs for the refs figure, and
for the rss figure every input is committed, so the model actor starts but gets no work. Runs an embedded
Ray with 4 logical CPUs in a temporary directory; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.schema import IMAGES_SCHEMA, SEGMENTS_SCHEMA

PART_ROWS = 8192


def _uris(n: int, root: Path) -> list[str]:
    return [str(root / "img" / f"{i:09d}.jpg") for i in range(n)]


def _commit(output: Path, ids: list[str]) -> None:
    for table in ("images", "segments"):
        (output / table).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(ids), PART_ROWS):
        chunk = ids[start : start + PART_ROWS]
        images = pa.table(
            {
                "image_id": chunk,
                "source": chunk,
                "width": pa.array([1] * len(chunk), pa.int32()),
                "height": pa.array([1] * len(chunk), pa.int32()),
                "status": ["ok"] * len(chunk),
                "retryable": [False] * len(chunk),
                "num_segments": pa.array([0] * len(chunk), pa.int32()),
                "run_id": ["fake"] * len(chunk),
            },
        )
        images = pa.table([images[f.name] if f.name in images.column_names else pa.nulls(len(chunk), f.type)
                           for f in IMAGES_SCHEMA], schema=IMAGES_SCHEMA)  # fmt: skip
        name = f"part-fake-{start // PART_ROWS:06d}.parquet"
        pq.write_table(SEGMENTS_SCHEMA.empty_table(), output / "segments" / name)
        pq.write_table(images, output / "images" / name)


def measure_refs(n: int, committed: int, plain: bool, root: Path, partitions: int = 4) -> dict:
    import ray

    from pipeline.exactly_once.commit import OutputCommitter
    from pipeline.exactly_once.lease import Lease
    from pipeline.exactly_once.resume import decide
    from pipeline.exactly_once.resume_executors import OnRay
    from pipeline.inputs.sources import ResolvedInputs, manifest_rows

    uris = _uris(n, root)
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest)
    _commit(root / "out", uris[:committed])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    if plain:  # what the pipeline did before the ref-level filter: the manifest's rows as they come
        refs = ray.data.read_parquet(str(manifest), columns=["uri"]).map_batches(
            manifest_rows, batch_format="numpy", fn_kwargs={"base": str(root)}
        )
    else:
        with Lease.acquire(str(root / "out"), "measure") as lease:
            parts = OutputCommitter(str(root / "out"), "measure", lease=lease).prepare()
        inputs = ResolvedInputs([], [str(manifest)])
        committer = OutputCommitter(str(root / "out"), "measure")  # nothing to retract: no lease needed
        refs = decide(inputs, committer=committer, parts=parts, executor=OnRay(partitions=partitions)).refs
    first = None
    rows = 0
    for batch in refs.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first if first is not None else time.perf_counter() - started
        rows += batch.num_rows
    total = time.perf_counter() - started
    ray.shutdown()
    return {"refs": n, "committed": committed, "plain": plain, "partitions": partitions,
            "first_ref_s": round(first or total, 2), "all_refs_s": round(total, 2), "refs_out": rows}  # fmt: skip


def measure_rss(n: int, root: Path) -> dict:
    from pipeline.run import run_job

    uris = _uris(n, root)
    manifest = root / "manifest.txt"
    manifest.write_text("\n".join(uris) + "\n")
    _commit(root / "out", uris)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = JobConfig(
        input=InputConfig((str(manifest),)),
        output=str(root / "out"),
        model=ModelSpec(weights="synthetic"),
        inference=InferenceConfig(min_size=64, max_size=107),
        resources=ResourceConfig(device="cpu"),
    )
    started = time.perf_counter()
    summary = run_job(config, show_progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"committed": n, "skipped_committed": summary.skipped_committed, "images_ok": summary.images_ok,
            "driver_peak_rss_mib": round(peak / 1024), "rss_before_run_mib": round(before / 1024),
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["refs", "rss"])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--committed", type=int, default=0)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--partitions", type=int, default=4, help="of the resume aggregations")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pf-measure-") as tmp:
        if args.what == "refs":
            report = measure_refs(args.n, args.committed, args.plain, Path(tmp), args.partitions)
        else:
            report = measure_rss(args.n, Path(tmp))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
