"""The one place that wires the stages together and sets Ray resources.

read (CPU tasks) -> decode + resize (CPU tasks) -> segment + RLE (actor pool, GPU or CPU) -> the driver
commits Parquet parts as results stream in (`pipeline.write`). Inputs and weights are checked before any
cluster work starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass

import ray
import torch

from model.checkpoint import CheckpointError, fetch
from model.config import get_variant
from pipeline.config import JobConfig, redact_uri
from pipeline.decode import decode_batch
from pipeline.predict import SYNTHETIC_WEIGHTS, PanopticSegmenter
from pipeline.sources import ResolvedInputs, manifest_rows, read_refs, resolve_inputs
from pipeline.write import RUN_CONFIG_FILE, SUCCESS_FILE, OutputWriter

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


def build_dataset(config: JobConfig, inputs: ResolvedInputs, *, weights: str, committed: set[str]) -> ray.data.Dataset:
    """The lazy Ray Data pipeline for ``inputs`` (image ids in ``committed`` are skipped)."""
    parts = []
    refs = [r for r in inputs.refs if not (r["kind"] == "file" and r["uri"] in committed)]
    if refs:
        parts.append(ray.data.from_items(refs))
    for manifest in inputs.manifests:
        if manifest.lower().endswith(".parquet"):
            listing = ray.data.read_parquet(manifest, columns=["uri"])
        else:
            listing = ray.data.read_text(manifest)
        parts.append(listing.map_batches(manifest_rows, batch_format="numpy"))
    if not parts:
        return ray.data.from_items([])
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Spread the (cheap) refs over many blocks so that reading and decoding run in parallel.
    ds = ds.repartition(target_num_rows_per_block=16)
    ds = ds.map_batches(
        read_refs,
        batch_format="numpy",
        batch_size=16,
        **CPU_TASK_ARGS,
        fn_kwargs={"bytes_column": config.input.bytes_column, "id_column": config.input.id_column},
    )
    if committed:
        ds = ds.map_batches(_drop_committed, batch_format="numpy", fn_kwargs={"committed": committed}, **CPU_TASK_ARGS)
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
    return ds.map_batches(
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
        },
    )


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


def _drop_committed(batch: dict, committed: set[str]) -> dict:
    keep = [i for i, image_id in enumerate(batch["image_id"]) if str(image_id) not in committed]
    return {k: v[keep] for k, v in batch.items()}


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
    committed = writer.committed_image_ids()
    writer.write_json(RUN_CONFIG_FILE, _run_record(config, weights, sha256))

    init_ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.verbose_progress = False
    context.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    context.enable_progress_bars = False  # one bar of our own, counted in images
    dataset = build_dataset(config, inputs, weights=weights, committed=committed)

    known_total = sum(1 for r in inputs.refs if r["kind"] == "file" and r["uri"] not in committed)
    bar = _progress_bar(
        known_total if not inputs.manifests and all(r["kind"] == "file" for r in inputs.refs) else None,
        enabled=show_progress,
    )
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.add(batch)
        bar.update(batch.num_rows)
    writer.flush()
    bar.close()

    seconds = time.perf_counter() - started
    summary = RunSummary(
        writer.counts["images_ok"], writer.counts["images_error"], writer.counts["segments"], len(committed), seconds
    )
    writer.write_json(SUCCESS_FILE, {**writer.counts, "skipped_committed": len(committed), "seconds": seconds})
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
