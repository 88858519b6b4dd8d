"""The one place that wires the stages together and sets Ray resources.

refs (input URIs; on resume or with manifests, de-duplicated and filtered against the committed parts by
hash aggregations on Ray workers) -> read (CPU tasks) -> decode + resize (CPU tasks) -> segment + RLE (actor
pool, GPU or CPU) -> the driver commits Parquet parts as results stream in (`pipeline.write`). Inputs and
weights are checked before any cluster work starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import ray
import torch
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data.aggregate import Max, Unique

from model.checkpoint import CheckpointError, fetch
from model.config import get_variant
from pipeline import block_stats
from pipeline.config import JobConfig, redact_uri
from pipeline.decode import decode_batch
from pipeline.predict import SYNTHETIC_WEIGHTS, PanopticSegmenter, encode_results
from pipeline.sources import (
    ResolvedInputs,
    as_refs,
    file_ref_keys,
    files_to_do,
    manifest_rows,
    read_refs,
    resolve_inputs,
)
from pipeline.write import (
    RUN_CONFIG_FILE,
    SUCCESS_FILE,
    OutputWriter,
    committed_file_keys,
    committed_rows,
    committed_shard_members,
)

log = logging.getLogger(__name__)

# Waiting for spot GPUs can take long: Ray's 30-minute default would kill such a job.
NO_PROGRESS_TIMEOUT_S = 6 * 3600.0
# Read and decode run as CPU tasks with a memory reservation for the decoded images. Their resources differ from
# the actor's, which also keeps Ray Data from fusing them into the model actors (decoding there would idle the
# GPU and cap decode parallelism at the number of actors).
CPU_TASK_ARGS = {"num_cpus": 1, "memory": 512 * 2**20}


@dataclass(frozen=True)
class RunSummary:
    images_ok: int
    images_error: int
    segments: int
    skipped_committed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        done = self.images_ok + self.images_error
        return done / self.seconds if self.seconds > 0 else 0.0


def resolve_weights(variant: str, weights: str, *, allow_synthetic: bool) -> tuple[str, str]:
    """(weights URI or "synthetic", sha256 or "") after checking that the weights can be read.

    ``auto`` means the variant's official release file; when it cannot be fetched, ``allow_synthetic``
    falls back to deterministic demo weights (with a loud warning), otherwise it is an error.
    """
    if weights == SYNTHETIC_WEIGHTS:
        return SYNTHETIC_WEIGHTS, ""
    uri = get_variant(variant).url if weights == "auto" else weights
    try:
        path = fetch(uri)
    except CheckpointError:
        if weights == "auto" and allow_synthetic:
            log.warning(
                "\n%s\nWARNING: the official weights (%s) cannot be fetched. Running with DETERMINISTIC RANDOM\n"
                "weights instead: the pipeline works, but the segments are MEANINGLESS.\n%s",
                "!" * 100,
                uri,
                "!" * 100,
            )
            return SYNTHETIC_WEIGHTS, ""
        raise
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return uri, digest.hexdigest()


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start an embedded local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # Some Ray Data operators stall with fewer than 4 logical CPUs; small machines get 4.
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)


def build_refs(inputs: ResolvedInputs, *, committed: ray.data.Dataset | None) -> ray.data.Dataset:
    """The refs still to do (`pipeline.sources.REF_SCHEMA`), each input once, computed on Ray workers.

    ``committed`` holds the {"image_id", "source"} rows of the committed ``images`` parts (None: a fresh run).
    Nothing here reads image bytes, and the driver never holds committed ids:

    - file refs (listed, or lines of manifests): one hash aggregation by URI over the refs and the committed
      files' ids keeps each URI once and drops committed ones. A fresh run without manifests skips it (the
      driver de-duplicates its own listing) and starts streaming at once; a manifest can repeat URIs, so a
      run with manifests always pays this blocking shuffle of the refs (README: "Resume").
    - shard refs (tar / Parquet, always from the driver's listing): on resume, one hash aggregation by shard
      gathers its committed image ids into ``skip``, left out by `read_refs` (the shard's bytes are read again:
      a tar has no index of its members).
    """
    listed = list({ref["uri"]: ref for ref in inputs.refs}.values())  # the driver's listing, without repeats
    files = [ref for ref in listed if ref["kind"] == "file"]
    shards = {ref["uri"]: ref["kind"] for ref in listed if ref["kind"] != "file"}
    file_parts = [ray.data.from_items(files)] if files else []
    for manifest in inputs.manifests:
        if manifest.lower().endswith(".parquet"):
            listing = ray.data.read_parquet(manifest, columns=["uri"])
        else:
            listing = ray.data.read_text(manifest)
        file_parts.append(listing.map_batches(manifest_rows, batch_format="numpy"))
    parts = []
    if file_parts:
        file_refs = _union(file_parts)
        if committed is None and not inputs.manifests:
            parts.append(file_refs.map_batches(as_refs, batch_format="pyarrow"))
        else:
            keys = file_refs.map_batches(file_ref_keys, batch_format="pyarrow")
            if committed is not None:
                keys = keys.union(committed.map_batches(committed_file_keys, batch_format="pyarrow"))
            aggregated = keys.groupby("uri", num_partitions=_shuffle_partitions()).aggregate(
                Max("listed", alias_name="listed", zero_factory=lambda: 0),
                Max("committed", alias_name="committed", zero_factory=lambda: 0),
            )
            parts.append(aggregated.map_batches(files_to_do, batch_format="pyarrow"))
    if shards:
        shard_refs = ray.data.from_items([{"uri": uri, "kind": kind, "image_id": None} for uri, kind in shards.items()])
        if committed is not None:
            members = committed.map_batches(
                committed_shard_members, batch_format="pyarrow", fn_kwargs={"kinds": shards}
            )
            shard_refs = (
                shard_refs.map_batches(_typed_shard_refs, batch_format="pyarrow")
                .union(members)
                .groupby(["uri", "kind"], num_partitions=_shuffle_partitions())
                .aggregate(Unique("image_id", alias_name="skip", ignore_nulls=True))
            )
        parts.append(shard_refs.map_batches(as_refs, batch_format="pyarrow"))
    return _union(parts) if parts else ray.data.from_items([])


def committed_dataset(fs: fsspec.AbstractFileSystem, parts: list[str]) -> ray.data.Dataset | None:
    """The {"image_id", "source"} rows of the committed ``images`` parts, read by Ray workers (None if none)."""
    if not parts:
        return None
    return ray.data.read_parquet(parts, columns=["image_id", "source"], filesystem=PyFileSystem(FSSpecHandler(fs)))


def count_committed(fs: fsspec.AbstractFileSystem, parts: list[str]) -> int:
    """Rows of the committed ``images`` parts, from their Parquet footers read by Ray workers."""
    if not parts:
        return 0
    paths = ray.data.from_items([{"path": p} for p in parts])
    return int(paths.map_batches(committed_rows, batch_format="numpy", fn_kwargs={"fs": fs}).sum("num_rows") or 0)


def build_dataset(
    config: JobConfig, inputs: ResolvedInputs, *, weights: str, committed: ray.data.Dataset | None = None
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline for ``inputs`` (what ``committed`` holds is skipped, see `build_refs`)."""
    ds = build_refs(inputs, committed=committed)
    # Spread the (cheap) refs over many blocks so that reading and decoding run in parallel.
    ds = ds.repartition(target_num_rows_per_block=16)
    ds = ds.map_batches(
        read_refs,
        batch_format="numpy",
        batch_size=16,
        **CPU_TASK_ARGS,
        fn_kwargs={"bytes_column": config.input.bytes_column, "id_column": config.input.id_column},
    )
    ds = ds.map_batches(
        decode_batch,
        batch_format="numpy",
        batch_size=8,
        **CPU_TASK_ARGS,
        fn_kwargs={"max_pixels": config.input.max_pixels, "inference": config.inference},
    )
    res = config.resources
    use_gpu = use_gpus(res.device)
    actor_cpus = res.num_cpus_per_actor if use_gpu else cpu_actor_cpus(res.max_actors)
    ds = ds.map_batches(
        PanopticSegmenter,
        batch_format="numpy",
        batch_size=res.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        num_gpus=res.num_gpus if use_gpu else 0,
        num_cpus=actor_cpus,
        fn_constructor_kwargs={
            "variant": config.model.variant,
            "weights": weights,
            "inference": config.inference,
            "device": "cuda" if use_gpu else "cpu",
            "encode_rle": res.rle_on == "actor",
        },
    )
    if res.rle_on == "workers":  # RLE on CPU tasks: the actor goes on to its next batch meanwhile
        ds = ds.map_batches(encode_results, batch_format="numpy", **CPU_TASK_ARGS)
    return ds


def _union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _typed_shard_refs(batch: pa.Table) -> pa.Table:
    """Shard refs {"uri", "kind", "image_id": None} with ``image_id`` typed as string, as the members are."""
    return batch.set_column(2, "image_id", pa.nulls(batch.num_rows, pa.string()))


def _shuffle_partitions() -> int:
    """Partitions of the ref aggregations: one per cluster CPU (≥ 2, ≤ 128); refs are small rows."""
    return max(2, min(128, int(ray.cluster_resources().get("CPU", 2))))


def use_gpus(device: str) -> bool:
    """Whether the model actors request GPUs.

    ``cuda`` always does, without looking at the cluster's current resources: on an autoscaling cluster whose
    GPU workers start at zero, the request is what makes the autoscaler add them. ``auto`` uses GPUs when the
    cluster has some now (use ``cuda`` on clusters that scale GPU workers from zero); ``cpu`` never does.
    """
    if device == "cuda":
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def cpu_actor_cpus(max_actors: int) -> float:
    """CPUs for one CPU-only model actor (torch runs as many threads as its actor reserves: Ray sets
    OMP_NUM_THREADS): half of the cluster's CPUs shared by the actors, leaving the rest to reading and
    decoding, but at most half of the biggest live node's, so that an actor fits on one node beside a decode
    task (also after a node is lost). A node-spanning request would never be scheduled: the job would hang."""
    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    return max(1.0, min(sum(node_cpus) // (2 * max_actors), max(node_cpus, default=0.0) // 2))


def run_job(config: JobConfig, *, allow_synthetic: bool = False, show_progress: bool = True) -> RunSummary:
    """Run the whole job; re-running with the same output resumes it (see `pipeline.write`)."""
    started = time.perf_counter()
    inputs = resolve_inputs(config.input)  # bad inputs fail here, before any cluster work
    weights, sha256 = resolve_weights(config.model.variant, config.model.weights, allow_synthetic=allow_synthetic)
    writer = OutputWriter(
        config.output,
        run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        rows_per_file=config.resources.rows_per_file,
    )
    writer.clear_success()
    writer.remove_orphans()
    committed_parts = writer.committed_parts()  # names only: ~100 B per part, never the ids in them
    writer.write_json(RUN_CONFIG_FILE, _run_record(config, weights, sha256))

    init_ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.verbose_progress = False
    context.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    context.enable_progress_bars = False  # one bar of our own, counted in images
    block_stats.install(context)  # Ray Data's per-block stats would grow the driver with every image
    committed = committed_dataset(writer.fs, committed_parts)
    dataset = build_dataset(config, inputs, weights=weights, committed=committed)

    # Known up front only for a fresh run over listed files; on resume the filter runs on the workers.
    only_listed_files = not inputs.manifests and all(r["kind"] == "file" for r in inputs.refs)
    known_total = len({r["uri"] for r in inputs.refs}) if only_listed_files and not committed_parts else None
    bar = _progress_bar(known_total, enabled=show_progress)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.add(batch)
        bar.update(batch.num_rows)
    writer.flush()
    bar.close()

    skipped = count_committed(writer.fs, committed_parts)
    seconds = time.perf_counter() - started
    summary = RunSummary(
        writer.counts["images_ok"], writer.counts["images_error"], writer.counts["segments"], skipped, seconds
    )
    writer.write_json(SUCCESS_FILE, {**writer.counts, "skipped_committed": skipped, "seconds": seconds})
    return summary


def _run_record(config: JobConfig, weights: str, sha256: str) -> dict:
    return {
        "config": config.to_dict(),
        "weights": {"uri": redact_uri(weights), "sha256": sha256},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
    }


def _progress_bar(total: int | None, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="segmenting", disable=not enabled, smoothing=0.1)
