"""The start of a run and the resume: what a run does with an output it finds, as a plan of refs to read, with
the retractions applied.

`start` is the one start of a run, in this order: the settings check
(`pipeline.exactly_once.run_records.check_settings`: a
run may only resume an output made with the same model settings), the commit protocol's start
(`pipeline.exactly_once.commit`: clean-up, then each committed part inspected and an unreadable one quarantined), the
decision and its retractions, all under the run's lease. A re-run over the same output (or a run over an output
made by earlier runs) reads only what is not committed yet or must be redone;
`pipeline.exactly_once.resume_decision` states
the rules and decides, row by row, in one place. `decide` runs that decision as one composition over an
executor (`pipeline.exactly_once.resume_executors`): in the driver for a small output whose inputs the driver listed (a
re-run with nothing to do then starts no cluster at all), else on Ray workers (one hash shuffle by URI, so the
driver never holds committed ids). It then retracts what it decided to redo (the committer's `retract` hook,
fenced by the lease part by part) before the run commits anything, and returns the refs to read. Lines of text
manifests are not re-checked for changes (a HEAD request per committed object would cost more than the resume
itself); listed files and shards are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from pipeline.exactly_once import resume_executors, run_records
from pipeline.exactly_once.inspection import OutputState, committed_rows, inspect_output
from pipeline.exactly_once.resume_decision import (
    DO,
    PLAN_SCHEMA,
    RETRACT,
    SKIP,
    UNLISTED,
    committed_file_keys,
    decide_file_keys,
    decide_members,
    file_ref_keys,
    files_to_do,
    group_shards,
    listed_shard_rows,
    shard_skips,
    tally,
)
from pipeline.exactly_once.resume_executors import InDriver, OnRay, PlanExecutor, Source
from pipeline.exactly_once.retraction import retraction_rows
from pipeline.inputs.sources import REF_SCHEMA, ResolvedInputs, as_refs, manifest_base, manifest_rows
from pipeline.schema import Counts

if TYPE_CHECKING:
    import ray.data

    from pipeline.exactly_once.commit import OutputCommitter


@dataclass
class Plan:
    refs: ray.data.Dataset | pa.Table  # `REF_SCHEMA`: what to read (a table when planned in the driver)
    known_total: int | None  # refs to do, when known without running the plan
    skipped: int = 0  # committed rows kept
    retracted: Counts = field(default_factory=Counts)
    retracted_by_reason: dict[str, int] = field(default_factory=dict)
    unlisted: int = 0
    files_to_do: int = 0  # file refs done anew or again

    def count(self, tallies: Iterable[dict[str, Any]]) -> None:
        """Add `pipeline.exactly_once.resume_decision.tally` rows (several rows of one key are summed)."""
        for row in tallies:
            action, n = row["action"], int(row["n"])
            self.skipped += n if action == SKIP else 0
            self.unlisted += n if action == UNLISTED else 0
            self.files_to_do += n if row["kind"] == "file" and action in (DO, RETRACT) else 0
            if action == RETRACT:
                self.retracted_by_reason[row["reason"]] = self.retracted_by_reason.get(row["reason"], 0) + n


class Start(NamedTuple):
    """What a run found in its output and what it will do."""

    state: OutputState  # the committed parts read back (quarantined ones left out), before the retractions
    plan: Plan


def start(
    committer: OutputCommitter,
    inputs: ResolvedInputs,
    *,
    settings: dict[str, Any],
    allow_mixed_settings: bool = False,
    retry_poisoned: bool = False,
    start_ray: Callable[[], None],
) -> Start:
    """The start of a run on ``committer``'s output, before its first commit: the settings check against the
    output's run records (``settings``: this run's, `pipeline.exactly_once.run_records.SettingsChanged` unless they
    match or ``allow_mixed_settings``), `OutputCommitter.prepare`, the committed parts inspected (each unreadable one
    quarantined), then the plan, with its retractions applied. In the driver when `fits_locally`, else on Ray
    (``start_ray`` is called first). Raises `pipeline.exactly_once.lease.LeaseLost` when the run lost its lease on
    the way
    (every change to the output is fenced by the committer)."""
    run_records.check_settings(run_records.read_run_records(committer.out), settings, allow=allow_mixed_settings)
    parts = committer.prepare()
    local = fits_locally(inputs, parts)
    if not local:
        start_ray()
    state = inspect_output(committer, parts, local=local)
    if local:
        plan = decide(inputs, committer=committer, parts=state.parts, executor=InDriver(),
                      retry_poisoned=retry_poisoned)  # fmt: skip
    elif not state.parts and not inputs.manifests:  # a fresh run over listed inputs: the listing is the plan
        plan = _listing_plan(_Listing(inputs))
    else:
        executor = OnRay(partitions=resume_executors.shuffle_partitions(inputs, state.totals.images))
        plan = decide(inputs, committer=committer, parts=state.parts, executor=executor, retry_poisoned=retry_poisoned)
    committer.raise_if_lost()
    return Start(state, plan)


LOCAL_PLAN_MAX_PARTS = 16  # up to this many committed parts (and no manifest), the driver plans on its own


def fits_locally(inputs: ResolvedInputs, parts: list[str]) -> bool:
    """Whether the driver may plan this run on its own (`InDriver`): a small output, inputs all listed by the
    driver."""
    return len(parts) <= LOCAL_PLAN_MAX_PARTS and not inputs.manifests


class _Listing:
    """This run's listed refs, without repeats: files, shards, and each shard's (version, size)."""

    def __init__(self, inputs: ResolvedInputs) -> None:
        listed = {r["uri"]: r for r in inputs.refs}
        self.files = [r for r in listed.values() if r["kind"] == "file"]
        self.shards = [r for r in listed.values() if r["kind"] != "file"]
        self.shard_versions = {r["uri"]: (r.get("version"), r.get("size")) for r in self.shards}


def _listing_plan(listing: _Listing) -> Plan:
    """The plan of a fresh run over listed inputs, on Ray: its refs stream at once, no shuffle."""
    listed = listing.files + listing.shards
    refs = as_refs(pa.Table.from_pylist(listed)) if listed else REF_SCHEMA.empty_table()
    known = len(listing.files) if not listing.shards else None
    return Plan(refs, known_total=known, files_to_do=len(listing.files))


def decide(
    inputs: ResolvedInputs,
    *,
    committer: OutputCommitter,
    parts: list[str],
    executor: PlanExecutor,
    retry_poisoned: bool = False,
) -> Plan:
    """The refs to do, with the retractions applied, given the committed ``parts``: one composition of the
    decision's stage functions over ``executor`` (`InDriver` or `OnRay`: the same `Plan` from both).

    With ``retry_poisoned``, images that killed their worker twice are redone. On Ray, a run pays one hash
    shuffle of its file refs with the committed rows (README "Resume"), and keeps the resulting plan (~100 B
    per input) in the object store while it runs.
    """
    listing = _Listing(inputs)
    committed = None
    if parts:
        paths: Source = [{"path": p} for p in parts]
        committed = executor.each(committed_rows, [paths], batch_format="numpy", batch_size=8,
                                  output=committer.out.uri, retry_poisoned=retry_poisoned)  # fmt: skip
    file_refs: list[Source] = [listing.files] if listing.files else []
    file_refs += _manifest_refs(inputs.manifests)  # on Ray only (`fits_locally`)
    keys = [executor.each(committed_file_keys, [committed])] if committed is not None else []
    keys += [executor.each(file_ref_keys, file_refs)] if file_refs else []
    decisions = [executor.by_key(decide_file_keys, keys, key="uri")] if keys else []  # a URI's rows in one call
    if committed is not None:
        decisions.append(executor.each(decide_members, [committed], shards=listing.shard_versions))
    decided = executor.keep(decisions) if decisions else PLAN_SCHEMA.empty_table()

    result = Plan(refs=REF_SCHEMA.empty_table(), known_total=None)
    result.count(executor.rows(executor.each(tally, [decided])))
    if result.retracted_by_reason:  # before anything is committed
        retractions = executor.each(retraction_rows, [decided])
        for row in executor.rows(executor.by_key(committer.retract, [retractions], key="part")):
            result.retracted.add(row)
            committer.retracted(row)  # the next snapshot lists the new part, not the old one
    refs = [executor.each(files_to_do, [decided])]
    if listing.shards:
        shard_rows = [executor.each(listed_shard_rows, [listing.shards]), executor.each(shard_skips, [decided])]
        refs.append(executor.by_key(group_shards, shard_rows, key="uri", keep=True))  # one row per shard: read
        # twice by `pipeline.run.work_blocks`
    else:
        result.known_total = result.files_to_do
    result.refs = executor.union(refs)
    return result


def _manifest_refs(manifests: list[str]) -> list[ray.data.Dataset]:
    """The file refs of each manifest, read and normalised by Ray workers."""
    if not manifests:
        return []
    import ray.data

    datasets = []
    for manifest in manifests:
        if manifest.lower().endswith(".parquet"):
            listing = ray.data.read_parquet(manifest, columns=["uri"])
        else:
            listing = ray.data.read_text(manifest)
        datasets.append(
            listing.map_batches(manifest_rows, batch_format="numpy", fn_kwargs={"base": manifest_base(manifest)})
        )
    return datasets
