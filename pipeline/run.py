"""The one place that wires the job together and sets Ray resources.

refs (input URIs; what a resume skips or redoes: `pipeline.exactly_once.resume`) -> work blocks (what one actor call
gets, `work_blocks`) -> the block call (`pipeline.segmenting.block_call.BlockSegmenter` on an actor pool, GPU or CPU:
read, decode, segment, RLE and commit parts of ``--rows-per-file`` images, pipelined inside the actor). The plan has one
operator after the refs, so Ray Data's per-block cost is paid once per work block; refs and part rows are all that cross
the object store. The driver checks inputs, weights and the output before any cluster work, holds the output's lease
(`pipeline.exactly_once.lease`), starts the run in one call (`pipeline.exactly_once.resume.start`: settings check,
clean-up, inspection, the plan and its retractions, in the driver or on Ray), drives the commit protocol's hooks
(`pipeline.exactly_once.commit`, which own every write and its lease check), and receives one small row per committed
part: no result passes through it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col
from tqdm.auto import tqdm

from pipeline import block_stats
from pipeline.bottleneck import StageTotals
from pipeline.config import JobConfig, ResourceConfig, redact_uri
from pipeline.error_budget import ErrorBudget, ErrorBudgetExceeded
from pipeline.exactly_once import resume, run_records
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease, new_run_id
from pipeline.inputs.sources import left_out_text, resolve_inputs
from pipeline.inputs.storage import TRANSIENT_ERRORS, describe_storage_error
from pipeline.run_summary import RunSummary
from pipeline.schema import PART_ROW_SCHEMA, Counts
from pipeline.segmenting.block_call import BlockSegmenter
from pipeline.segmenting.poison import start_flight_recorder
from pipeline.segmenting.resources import ActorLayout, actor_layout, check_gpu_supply, use_gpus
from pipeline.segmenting.weights import resolve_weights

# Waiting for spot GPUs can take long: Ray's 30-minute default would kill such a job.
NO_PROGRESS_TIMEOUT_S = 6 * 3600.0
# Ray restarts a dead model actor and retries its block call. Each death is spent on poison isolation
# (`pipeline.segmenting.poison`): an input that kills every actor that reads it (a crashing codec, out of memory)
# costs two
# deaths and gets an error row; bounded, so that a work block whose actors keep dying with nothing in flight (nodes
# lost again and again) fails the job instead of running forever.
BLOCK_CALL_RETRIES = 32  # a poison costs two deaths (in its window, then alone), and a call queued behind a
# dying one on the same actor loses a retry too: room for about a dozen poisoned images per block
BLOCKS_PER_ACTOR = 4  # a small job is cut into at least this many work blocks per actor, so that every actor works


class OutputError(ValueError):
    """The output cannot be written (read-only, a file, no credentials); raised before any cluster work."""


# Ray's own start-up lines ("Started a local Ray instance", the note that token authentication is on by default):
# shown with --verbose only. Their errors still show.
_RAY_START_LOGGERS = ("ray._private.worker", "ray._private.authentication.authentication_token_setup")


def init_ray(*, verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start an embedded local Ray."""
    if ray.is_initialized():
        return
    quiet = [] if verbose else [logging.getLogger(name) for name in _RAY_START_LOGGERS]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # Some Ray Data operators stall with fewer than 4 logical CPUs; small machines get 4.
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


# Ray Data hands each map worker actor its DataContext and map transformer as ObjectRefs (`ray.put` in its
# ActorPoolMapOperator, whatever the constructor arguments), and the actor may restart: Ray's driver then logs
# an ERROR, once per process, that a restart would fail were those objects lost (ray-project/ray#53727). Ray
# Data holds both refs, owned by the driver, for the whole run: they are lost only with the driver's node, and
# the job with it. A line that alarms at every job's start and never applies: `_spend_restart_notice`.
RESTART_NOTICE = "has constructor arguments in the object store and max_restarts > 0"


@functools.cache
def _spend_restart_notice() -> None:
    """Spend Ray's once-per-process `RESTART_NOTICE` on a probe actor made under a captured stderr (the line
    is logged as the actor is made) and killed at once; anything else written meanwhile is passed on."""

    class RestartNoticeProbe:  # local: pickled by value, so that a worker started for it never imports torch
        def __init__(self, unused: object) -> None:
            pass

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            probe_class = ray.remote(num_cpus=0, max_restarts=1)(RestartNoticeProbe)
            probe = probe_class.remote(ray.put(None))  # an argument in the object store
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        ray.kill(probe)
        captured.seek(0)
        lines = captured.read().decode(errors="replace").splitlines(keepends=True)
    sys.stderr.write("".join(line for line in lines if RESTART_NOTICE not in line))


def block_refs(resources: ResourceConfig, files: int, *, actors: int | None = None) -> int:
    """File refs (one image each) per work block, given the ``files`` to do: ``--rows-per-file`` (one block call
    commits about one part), fewer for few files (`BLOCKS_PER_ACTOR` blocks per actor), so that the part size
    never leaves actors idle. A tar / Parquet shard is a work block of its own (`work_blocks`). ``actors``: the
    pool's largest size (`pipeline.segmenting.resources.actor_layout`; default ``--max-actors``, else 1)."""
    actors = actors or resources.max_actors or 1
    return max(1, min(resources.rows_per_file, -(-files // (BLOCKS_PER_ACTOR * actors))))


def work_blocks(refs: ray.data.Dataset | pa.Table, *, rows: int) -> ray.data.Dataset:
    """Refs (`pipeline.inputs.sources.REF_SCHEMA`) as a dataset of work blocks (what one actor call gets): up to
    ``rows`` file refs in a block, a tar / Parquet shard in a block of its own. A table (refs known on the driver) is
    cut here; a dataset (refs planned on the workers) is split by kind and each kind re-blocked by Ray in a streaming
    pass, so it is read once per kind (`pipeline.exactly_once.resume.decide` on Ray hands one whose shuffles are
    done)."""
    if isinstance(refs, ray.data.Dataset):
        is_file = col("kind") == "file"
        files = refs.filter(expr=is_file).repartition(target_num_rows_per_block=rows, strict=True)
        shards = refs.filter(expr=~is_file).repartition(target_num_rows_per_block=1, strict=True)
        return files.union(shards)
    files = refs.filter(pc.equal(refs.column("kind"), "file"))
    shards = refs.filter(pc.not_equal(refs.column("kind"), "file"))
    blocks = [files.slice(start, rows) for start in range(0, files.num_rows, rows)]
    blocks += [shards.slice(i, 1) for i in range(shards.num_rows)]
    return ray.data.from_arrow(blocks or [refs])


def build_dataset(
    config: JobConfig,
    blocks: ray.data.Dataset,
    *,
    weights: str,
    committer: OutputCommitter,
    flight_recorder: Any = None,
    layout: ActorLayout | None = None,
) -> ray.data.Dataset:
    """The lazy plan from ``blocks`` (`work_blocks`) to one `PART_ROW_SCHEMA` row per committed part;
    ``flight_recorder`` (`pipeline.segmenting.poison.start_flight_recorder`) turns on poison isolation; ``layout``: the
    actor pool (default: `pipeline.segmenting.resources.actor_layout` of the config)."""
    res = config.resources
    use_gpu = use_gpus(res.device)
    layout = layout or actor_layout(res, use_gpu=use_gpu)
    cpus = layout.cpus
    with warnings.catch_warnings():
        # Ray 2.60 deprecates `ray_remote_args_fn` for 2.64 without a named replacement for an actor's task
        # retries; pyproject pins ray < 2.61, and users need not see it.
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        return blocks.map_batches(
            BlockSegmenter,
            batch_format="pyarrow",
            batch_size=None,  # one call per work block
            compute=ray.data.ActorPoolStrategy(min_size=layout.min_actors, max_size=layout.max_actors),
            num_gpus=res.num_gpus if use_gpu else 0,
            num_cpus=cpus,
            ray_remote_args_fn=_bounded_retries,  # each new actor's options (Ray Data's own default retries forever)
            fn_constructor_kwargs={  # the frozen config sections each actor needs (`BlockSegmenter`)
                "model": replace(config.model, weights=weights),  # the driver's resolved checkpoint
                "device": "cuda" if use_gpu else "cpu",
                "inference": config.inference,
                "input": config.input,
                "resources": res,
                "cpus": cpus,
                "committer": committer,  # pickled as (output, run id): the lease stays here
                "failures": config.failures,
                "flight_recorder": flight_recorder,  # an actor handle: the record survives this actor's death
            },
        )


def _bounded_retries() -> dict[str, Any]:
    return {"max_task_retries": BLOCK_CALL_RETRIES}


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
    """Run the whole job; re-running with the same output resumes it (`pipeline.exactly_once.commit` and
    `pipeline.exactly_once.resume_decision` state the rules).

    Raises before any cluster work: `pipeline.inputs.sources.InputError`, `model.checkpoint.CheckpointError`,
    `OutputError`, `pipeline.exactly_once.lease.LeaseHeld`, `pipeline.exactly_once.run_records.SettingsChanged`,
    `ClusterError`. Ray Data's own messages (execution plans, memory advice) are shown only with ``verbose``.
    ``on_part`` is called with each committed part's `PART_ROW_SCHEMA` row as it reaches the driver (progress,
    benchmarks). Raises `pipeline.error_budget.ErrorBudgetExceeded` (one line) when more than ``--max-error-rate`` of
    the latest ``--error-window`` images failed: the run is marked failed, the parts committed so far stay.
    """
    started = time.perf_counter()
    inputs = resolve_inputs(  # bad inputs fail here, before any cluster work
        config.input, output=config.output, read_timeout_s=config.failures.read_timeout_s
    )
    weights, sha256 = resolve_weights(config.model.variant, config.model.weights, allow_synthetic=allow_synthetic)
    run_id = new_run_id()
    record = run_records.new_record(config, run_id, weights=weights, sha256=sha256)
    lease = take_lease(config.output, run_id, take_over=take_over_lease)
    committer = OutputCommitter(config.output, run_id, lease=lease, snapshots=config.snapshots)
    try:
        state, plan = resume.start(
            committer,
            inputs,
            settings=record["settings"],
            allow_mixed_settings=allow_mixed_settings,
            retry_poisoned=config.failures.retry_poisoned,
            start_ray=functools.partial(_start_ray, config, verbose=verbose),
        )
        # what readers see from now on: the parts kept, retracted rows gone (`pipeline.exactly_once.snapshots`)
        committer.snapshot("start", only_if_changed=plan.known_total == 0)
        this_run, parts_by_node, errors_by_kind = Counts(), {}, {}
        stages: StageTotals | None = None
        if plan.known_total != 0:
            _start_ray(config, verbose=verbose)
            use_gpu = use_gpus(config.resources.device)
            stages = StageTotals(gpu=use_gpu)  # where the actors' time goes
            layout = actor_layout(config.resources, use_gpu=use_gpu)
            rows = block_refs(config.resources, plan.files_to_do, actors=layout.max_actors)
            blocks = work_blocks(plan.refs, rows=rows)
            recorder = start_flight_recorder()  # poison isolation (`pipeline.segmenting.poison`)
            dataset = build_dataset(
                config, blocks, weights=weights, committer=committer, flight_recorder=recorder, layout=layout
            )
            committer.on_write_start(record)  # the record before any row of this run; no _SUCCESS older than them
            bar = _progress_bar(plan.known_total, enabled=show_progress)
            failures = config.failures
            budget = ErrorBudget(max_error_rate=failures.max_error_rate, error_window=failures.error_window)
            # no prefetch: each part's row reaches the bar, `on_part` and the lease check as soon as it exists
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                for row in batch.cast(PART_ROW_SCHEMA).to_pylist():  # one small row per committed part
                    committer.committed(row)  # readers see it at the next snapshot
                    this_run.add(row)
                    parts_by_node[row["node_id"]] = parts_by_node.get(row["node_id"], 0) + 1
                    if on_part is not None:
                        on_part(row)
                    bar.update(row["images_ok"] + row["images_error"])
                    budget.add(row)
                    stages.add(row)
                    for kind in row["error_kinds"] or ():
                        errors_by_kind[kind["kind"]] = errors_by_kind.get(kind["kind"], 0) + kind["count"]
                    if budget.exceeded():  # a systematic failure: stop rather than write an error row per image
                        bar.close()
                        raise ErrorBudgetExceeded(budget.verdict())
                committer.raise_if_lost()
            bar.close()
        totals = Counts()
        for counts, sign in ((state.totals, 1), (plan.retracted, -1), (this_run, 1)):
            totals.add(counts, sign)
        summary = RunSummary(
            run_id=run_id,
            this_run=this_run,
            parts=sum(parts_by_node.values()),
            skipped_committed=plan.skipped,
            redone=dict(plan.retracted_by_reason),
            unlisted=plan.unlisted,
            quarantined=len(state.quarantined),
            totals=totals,
            seconds=time.perf_counter() - started,
            parts_by_node=parts_by_node,
            left_out=left_out_text(inputs.left_out, inputs.left_out_examples) if inputs.left_out else "",
            errors_by_kind=errors_by_kind,
            stages=stages.report() if stages is not None else {},
        )
        committer.on_write_complete(summary.report())
        return summary
    except BaseException as exc:
        committer.on_write_failed(exc)
        raise
    finally:
        lease.release()


def _start_ray(config: JobConfig, *, verbose: bool) -> None:
    """Join or start Ray (without `RESTART_NOTICE` unless ``verbose``), set up Ray Data, and check that the GPUs
    asked for can exist (all idempotent)."""
    init_ray(verbose=verbose)
    if not verbose:
        _spend_restart_notice()
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


class _ProgressBar(tqdm):
    """tqdm whose close() does not draw the final count again when the last update drew it (in a log, where a
    drawing does not overwrite the previous one, the final line appeared twice)."""

    _closing = False

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._closing and msg is None and self.last_print_n == self.n:
            return True  # drawn already: close() only ends the line
        return super().display(msg, pos)

    def close(self) -> None:
        self._closing = True
        super().close()


def _progress_bar(total: int | None, *, enabled: bool) -> _ProgressBar:
    return _ProgressBar(total=total, unit="img", desc="segmenting", disable=not enabled, smoothing=0.1)
