"""The one place that wires the stages together and sets Ray resources.

refs (input URIs; what a resume skips or redoes is decided on Ray workers, `pipeline.resume`) -> read (CPU
tasks) -> decode + resize (CPU tasks) -> segment (actor pool, GPU or CPU) -> RLE (CPU tasks) -> gathered into
parts of ``--rows-per-file`` images -> write (CPU tasks commit each part, `pipeline.write`). The driver checks
inputs, weights and the output before any cluster work, holds the output's lease (`pipeline.lease`), and
receives one small row per committed part: no result passes through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import posixpath
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from model.checkpoint import CheckpointError, check_state_dict, fetch, read_state_dict
from model.config import get_variant
from pipeline import block_stats, resume
from pipeline.config import JobConfig, redact_uri
from pipeline.decode import decode_batch
from pipeline.lease import Lease, new_run_id
from pipeline.predict import SYNTHETIC_WEIGHTS, PanopticSegmenter
from pipeline.results import encode_results
from pipeline.resume import Counts
from pipeline.schema import RUNS_FOLDER, SUCCESS_FILE
from pipeline.sources import ResolvedInputs, read_refs, resolve_inputs
from pipeline.storage import TRANSIENT_ERRORS, describe_storage_error, publish
from pipeline.write import PART_ROW_SCHEMA, write_stage

log = logging.getLogger(__name__)

# Waiting for spot GPUs can take long: Ray's 30-minute default would kill such a job.
NO_PROGRESS_TIMEOUT_S = 6 * 3600.0
# Read, decode, RLE and write run as CPU tasks with a memory reservation: what Ray Data's memory monitor
# measured them to use (~0.6 GiB with tiny images: the process with torch and Arrow loaded) plus their blocks.
# Their resources differ from the actor's, which also keeps Ray Data from fusing them into the model actors
# (decoding there would idle the GPU and cap decode parallelism at the number of actors).
CPU_TASK_ARGS = {"num_cpus": 1, "memory": 2**30}
REFS_PER_READ_TASK = 16


class OutputError(ValueError):
    """The output cannot be written (read-only, a file, no credentials); raised before any cluster work."""


@dataclass
class RunSummary:
    run_id: str
    this_run: Counts  # committed by this run
    parts: int  # committed by this run
    skipped_committed: int  # committed before, kept
    redone: dict[str, int]  # committed before, retracted and done again, by reason
    unlisted: int  # committed before, not among this run's inputs (kept)
    quarantined: int  # unreadable parts moved aside
    totals: Counts  # the whole output after this run
    seconds: float
    parts_by_node: dict[str, int]  # parts committed by this run, by the Ray node that wrote them

    @property
    def images_ok(self) -> int:
        return self.this_run.images_ok

    @property
    def images_error(self) -> int:
        return self.this_run.images_error

    @property
    def segments(self) -> int:
        return self.this_run.segments

    @property
    def images_per_second(self) -> float:
        return self.this_run.images / self.seconds if self.seconds > 0 else 0.0

    def line(self, output: str) -> str:
        """The one-line summary the job prints."""
        run = self.this_run
        redone = "".join(f", {n} redone ({reason})" for reason, n in sorted(self.redone.items()))
        extra = f", {self.unlisted} committed images not among the inputs (kept)" if self.unlisted else ""
        extra += f", {self.quarantined} unreadable parts moved to _quarantine/" if self.quarantined else ""
        return (
            f"done: {run.images_ok} images ok, {run.images_error} errors ({run.images_retryable} retryable), "
            f"{run.segments} segments, {self.skipped_committed} already committed{redone}{extra}, "
            f"{self.images_per_second:.2f} images/s ({self.seconds:.1f} s) -> {output} now holds "
            f"{self.totals.images} images ({self.totals.images_ok} ok, {self.totals.images_error} errors, "
            f"{self.totals.images_retryable} retryable), {self.totals.segments} segments"
        )


def resolve_weights(variant: str, weights: str, *, allow_synthetic: bool) -> tuple[str, str]:
    """(weights URI or "synthetic", sha256 or "") after checking that the weights load into the variant.

    ``auto`` means the variant's official release file; when it cannot be fetched, ``allow_synthetic``
    falls back to deterministic demo weights (with a loud warning), otherwise it is an error. A file that is
    no checkpoint, or not one of this variant, raises `CheckpointError` here, on the driver.
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
    check_state_dict(get_variant(variant).config, read_state_dict(uri), what=redact_uri(uri))
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


def build_dataset(
    config: JobConfig, refs: ray.data.Dataset, *, weights: str, run_id: str, run_record: str
) -> ray.data.Dataset:
    """The lazy pipeline from ``refs`` (`pipeline.sources.REF_SCHEMA`) to one `PART_ROW_SCHEMA` row per part."""
    # Spread the (cheap) refs over many blocks so that reading and decoding run in parallel.
    ds = refs.repartition(target_num_rows_per_block=REFS_PER_READ_TASK)
    ds = ds.map_batches(
        read_refs,
        batch_format="numpy",
        batch_size=REFS_PER_READ_TASK,
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
        ds = ds.map_batches(encode_results, batch_format="pyarrow", batch_size=None, **CPU_TASK_ARGS)
    # Whole parts of rows_per_file images (the last one smaller), each committed by one write task.
    ds = ds.repartition(target_num_rows_per_block=res.rows_per_file, strict=True)
    return ds.map_batches(
        write_stage,
        batch_format="pyarrow",
        batch_size=None,
        **CPU_TASK_ARGS,
        fn_kwargs={"output": config.output, "run_id": run_id, "run_record": run_record},
    )


ROWS_PER_SHUFFLE_PARTITION = 250_000  # refs and committed rows (~100 B each) per resume-aggregation partition
MANIFEST_BYTES_PER_LINE = 32  # a low guess: more lines estimated, more partitions


def shuffle_partitions(inputs: ResolvedInputs, committed_images: int) -> int:
    """Partitions of the resume aggregations: one per ~250 k rows, at most one per cluster CPU (≤ 128).

    Each partition is an aggregator actor, whose start-up dominates small plans: planning 5 refs took 16.5 s
    with 4 partitions and 8.4 s with 1 on a 2-core machine (a re-run with nothing to do: 15.0 vs 3.4 s).
    A Parquet manifest counts its footer's rows, a text one its bytes (a HEAD); one that cannot be sized
    counts as large.
    """
    rows = len(inputs.refs) + committed_images
    for manifest in inputs.manifests:
        try:
            fs, path = fsspec.core.url_to_fs(manifest)
            if manifest.lower().endswith(".parquet"):
                with fs.open(path, "rb") as f:
                    rows += pq.ParquetFile(f).metadata.num_rows
            else:
                rows += int(fs.size(path) or 0) // MANIFEST_BYTES_PER_LINE
        except (OSError, ValueError, pa.ArrowException, *TRANSIENT_ERRORS):
            rows += ROWS_PER_SHUFFLE_PARTITION * 128
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(128, cpus, -(-rows // ROWS_PER_SHUFFLE_PARTITION)))


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


class ClusterError(RuntimeError):
    """The cluster can never run the job as asked (e.g. GPUs requested where no node can have one)."""


def check_gpu_supply() -> None:
    """With GPUs requested: fine when the cluster has some; a visible "waiting" line when an autoscaler may add
    them; `ClusterError` when nothing can (no GPU, and no autoscaler, or one whose node types have none)."""
    if ray.cluster_resources().get("GPU", 0) > 0:
        return
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    limits = state.get_max_resources_from_cluster_config()  # the node types of an autoscaler that reports them
    if limits is not None and not limits.get("GPU"):
        raise ClusterError(
            "--device cuda: no node type of this cluster's autoscaler has GPUs (ray status); add a GPU node type "
            "or use --device cpu"
        )
    if limits is None and not _autoscaler_can_launch(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)):
        raise ClusterError(
            "--device cuda: this cluster has no GPU and no autoscaler that could add one (ray status); run on a "
            "cluster with GPU workers (cluster.yaml, jobs/k8s/) or use --device cpu"
        )
    log.warning(
        "waiting for GPU workers: the cluster has none yet; the autoscaler is asked for them (`ray status` shows "
        "it starting them)"
    )


def _autoscaler_can_launch(status: bytes | None) -> bool:
    """Whether the (v1) autoscaler's status names node types it could launch: a cluster started without an
    autoscaling config (``ray start``, an embedded local Ray) runs it read-only, its node types being the
    running nodes themselves (``node_<id>``)."""
    if not status:
        return False
    report = json.loads(status).get("autoscaler_report") or {}
    types = {
        *(report.get("active_nodes") or {}),
        *(report.get("idle_nodes") or {}),
        *(report.get("pending_launches") or {}),
    }
    return any(not name.startswith("node_") for name in types)


def take_lease(output: str, run_id: str, *, take_over: bool) -> Lease:
    """The output's lease; an output that cannot be written raises `OutputError` (one line)."""
    try:
        return Lease.acquire(output, run_id, take_over=take_over)
    except TRANSIENT_ERRORS as exc:  # read-only, a file where a folder should be, no credentials, no such bucket
        raise OutputError(describe_storage_error(f"the output {redact_uri(output)}", exc)) from exc


def run_job(
    config: JobConfig,
    *,
    allow_synthetic: bool = False,
    show_progress: bool = True,
    take_over_lease: bool = False,
    allow_mixed_settings: bool = False,
    verbose: bool = False,
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Run the whole job; re-running with the same output resumes it (`pipeline.resume` states the rules).

    Raises before any cluster work: `pipeline.sources.InputError`, `model.checkpoint.CheckpointError`,
    `OutputError`, `pipeline.lease.LeaseHeld`, `pipeline.resume.SettingsChanged`, `ClusterError`. Ray Data's
    own messages (execution plans, memory advice) are shown only with ``verbose``. ``on_part`` is called with
    each committed part's `PART_ROW_SCHEMA` row as it reaches the driver (progress, benchmarks).
    """
    started = time.perf_counter()
    inputs = resolve_inputs(config.input, output=config.output)  # bad inputs fail here, before any cluster work
    weights, sha256 = resolve_weights(config.model.variant, config.model.weights, allow_synthetic=allow_synthetic)
    run_id = new_run_id()
    fs, root = fsspec.core.url_to_fs(config.output)
    root = root.rstrip("/")
    settings = resume.model_settings(config, sha256)
    lease = take_lease(config.output, run_id, take_over=take_over_lease)
    record = _run_record(config, run_id, weights, sha256, settings)
    try:
        resume.check_settings(resume.read_run_records(fs, root), settings, allow=allow_mixed_settings)
        parts = resume.prepare_output(fs, root)
        if resume.fits_locally(inputs, parts):  # a small output: planned here, Ray only if there is work
            state = _inspect(config.output, parts, run_id=run_id, local=True)
            plan = resume.plan_locally(inputs, output=config.output, parts=state.parts)
        else:
            _start_ray(config, verbose=verbose)
            state = _inspect(config.output, parts, run_id=run_id, local=False)
            partitions = shuffle_partitions(inputs, state.totals.images)
            plan = resume.plan(inputs, output=config.output, parts=state.parts, partitions=partitions)
        lease.raise_if_lost()
        this_run, parts_by_node = Counts(), {}
        if plan.known_total != 0:
            _start_ray(config, verbose=verbose)
            refs = plan.refs if isinstance(plan.refs, ray.data.Dataset) else ray.data.from_arrow(plan.refs)
            dataset = build_dataset(config, refs, weights=weights, run_id=run_id, run_record=json.dumps(record))
            bar = _progress_bar(plan.known_total, enabled=show_progress)
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.cast(PART_ROW_SCHEMA).to_pylist():  # one small row per committed part
                    this_run.add(row)
                    parts_by_node[row["node_id"]] = parts_by_node.get(row["node_id"], 0) + 1
                    if on_part is not None:
                        on_part(row)
                    bar.update(row["images_ok"] + row["images_error"])
                lease.raise_if_lost()
            bar.close()
        totals = Counts()
        for counts, sign in ((state.totals, 1), (plan.retracted, -1), (this_run, 1)):
            totals.add(counts, sign)
        summary = RunSummary(
            run_id,
            this_run,
            sum(parts_by_node.values()),
            plan.skipped,
            dict(plan.retracted_by_reason),
            plan.unlisted,
            len(state.quarantined),
            totals,
            time.perf_counter() - started,
            parts_by_node,
        )
        _finish(fs, root, record, summary)
        return summary
    except BaseException as exc:
        _record_failure(fs, root, record, exc)
        raise
    finally:
        lease.release()


def _start_ray(config: JobConfig, *, verbose: bool) -> None:
    """Join or start Ray, set up Ray Data, and check that the GPUs asked for can exist (all idempotent)."""
    init_ray()
    _configure_ray_data(verbose=verbose)
    if use_gpus(config.resources.device):
        check_gpu_supply()


def _configure_ray_data(*, verbose: bool) -> None:
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    context.execution_options.verbose_progress = False
    context.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    context.enable_progress_bars = False  # one bar of our own, counted in images
    block_stats.install(context)  # Ray Data's per-block stats would grow the driver with every image


def _inspect(output: str, parts: list[str], *, run_id: str, local: bool) -> resume.OutputState:
    """The committed parts' counts, read from their footers (here when ``local``, else by Ray workers);
    unreadable parts quarantined."""
    state = resume.OutputState()
    if not parts:
        return state
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if local:
        rows = resume.inspect_parts({"path": parts}, output=output).to_pylist()
    else:
        paths = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=min(len(parts), 64))
        rows = paths.map_batches(resume.inspect_parts, batch_format="numpy", fn_kwargs={"output": output}).iter_rows()
    for row in rows:
        if row["problem"]:
            resume.quarantine(fs, root, row["path"], run_id=run_id, problem=row["problem"])
            state.quarantined.append(posixpath.basename(row["path"]))
        else:
            state.parts.append(row["path"])
            state.totals.add(row)
    state.parts.sort()
    return state


def _run_record(config: JobConfig, run_id: str, weights: str, sha256: str, settings: dict) -> dict:
    return {
        "run_id": run_id,
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [redact_uri(a) for a in sys.argv],
        "config": config.to_dict(),
        "settings": settings,
        "weights": {"uri": redact_uri(weights), "sha256": sha256},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
    }


def _finish(fs: fsspec.AbstractFileSystem, root: str, record: dict, summary: RunSummary) -> None:
    """``_SUCCESS`` (this run's counts and the output's totals), and this run's record completed if it
    committed anything."""
    report = {
        "run_id": summary.run_id,
        "this_run": {**asdict(summary.this_run), "parts": summary.parts, "skipped_committed": summary.skipped_committed,
                     "redone": summary.redone, "unlisted": summary.unlisted, "quarantined": summary.quarantined,
                     "seconds": summary.seconds},
        "output": {**asdict(summary.totals), "images": summary.totals.images},
    }  # fmt: skip
    path = posixpath.join(root, RUNS_FOLDER, f"{summary.run_id}.json")
    if fs.exists(path):
        finished = {**record, "status": "finished", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report}
        publish(fs, path, json.dumps(finished, indent=2, default=str).encode())
    publish(fs, posixpath.join(root, SUCCESS_FILE), json.dumps(report, indent=2, default=str).encode())


def _record_failure(fs: fsspec.AbstractFileSystem, root: str, record: dict, exc: BaseException) -> None:
    """Mark this run's record failed, when it committed something (best effort: the run is failing)."""
    path = posixpath.join(root, RUNS_FOLDER, f"{record['run_id']}.json")
    try:
        if fs.exists(path):
            failed = {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            publish(fs, path, json.dumps(failed, indent=2, default=str).encode())
    except Exception as inner:  # never hide the run's own error behind this one
        log.warning("could not mark run %s failed in %s: %s", record["run_id"], path, inner)


def _progress_bar(total: int | None, *, enabled: bool):
    from tqdm.auto import tqdm

    class Bar(tqdm):
        """tqdm whose close() does not draw the final count again when the last update drew it (in a log, where
        a drawing does not overwrite the previous one, the final line appeared twice)."""

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            if self._closing and msg is None and self.last_print_n == self.n:
                return True  # drawn already: close() only ends the line
            return super().display(msg, pos)

        def close(self) -> None:
            self._closing = True
            super().close()

    Bar._closing = False
    return Bar(total=total, unit="img", desc="segmenting", disable=not enabled, smoothing=0.1)
