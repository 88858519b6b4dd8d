"""The resume: what a run does with an output it finds, as a plan of refs to read, with the retractions applied.

A re-run over the same output (or a run over an output made by earlier runs) reads only what is not committed
yet or must be redone; `pipeline.resume_decision` states the rules and decides, row by row, in one place. This
module runs that decision where it fits: in the driver for a small output whose inputs the driver listed
(`plan_locally`: a re-run with nothing to do then starts no cluster at all), else on Ray workers (`plan`: one
hash shuffle by URI, so the driver never holds committed ids), then retracts what it decided to redo
(`pipeline.retraction`) before the run commits anything, and returns the refs to read.

A run may only resume an output made with the same model settings (`pipeline.run_records.check_settings`),
and only after the commit protocol's start (`pipeline.commit`: clean-up, quarantine of unreadable parts) and
under the run's lease. Lines of text manifests are not re-checked for changes (a HEAD request per committed
object would cost more than the resume itself); listed files and shards are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.inspection import committed_rows
from pipeline.resume_decision import (
    DO,
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
from pipeline.retraction import retraction_rows
from pipeline.schema import Counts
from pipeline.sources import REF_SCHEMA, ResolvedInputs, as_refs, manifest_base, manifest_rows

if TYPE_CHECKING:
    import ray.data

    from pipeline.commit import OutputCommitter


@dataclass
class Plan:
    refs: ray.data.Dataset | pa.Table  # `REF_SCHEMA`: what to read (a table from `plan_locally`)
    known_total: int | None  # refs to do, when known without running the plan
    skipped: int = 0  # committed rows kept
    retracted: Counts = field(default_factory=Counts)
    retracted_by_reason: dict[str, int] = field(default_factory=dict)
    unlisted: int = 0
    files_to_do: int = 0  # file refs done anew or again

    def count(self, tallies: Iterable[dict[str, Any]]) -> None:
        """Add `pipeline.resume_decision.tally` rows (several rows of one key are summed)."""
        for row in tallies:
            action, n = row["action"], int(row["n"])
            self.skipped += n if action == SKIP else 0
            self.unlisted += n if action == UNLISTED else 0
            self.files_to_do += n if row["kind"] == "file" and action in (DO, RETRACT) else 0
            if action == RETRACT:
                self.retracted_by_reason[row["reason"]] = self.retracted_by_reason.get(row["reason"], 0) + n


class _Listing:
    """This run's listed refs, without repeats: files, shards, and each shard's (version, size)."""

    def __init__(self, inputs: ResolvedInputs) -> None:
        listed = {r["uri"]: r for r in inputs.refs}
        self.files = [r for r in listed.values() if r["kind"] == "file"]
        self.shards = [r for r in listed.values() if r["kind"] != "file"]
        self.shard_versions = {r["uri"]: (r.get("version"), r.get("size")) for r in self.shards}


def plan(
    inputs: ResolvedInputs,
    *,
    committer: OutputCommitter,
    parts: list[str],
    partitions: int,
    retry_poisoned: bool = False,
) -> Plan:
    """The refs to do, with the retractions applied, given the committed ``parts``, on Ray workers.

    A fresh run over listed inputs pays nothing here: its refs stream at once. Any other run pays one hash
    shuffle of its file refs with the committed rows (README "Resume"), and keeps the resulting plan (~100 B
    per input) in the object store while it runs.
    """
    import ray.data

    listing, output = _Listing(inputs), committer.out.uri
    if not parts and not inputs.manifests:  # a fresh run over listed inputs: the listing is the plan
        listed = listing.files + listing.shards
        refs = as_refs(pa.Table.from_pylist(listed)) if listed else REF_SCHEMA.empty_table()
        known = len(listing.files) if not listing.shards else None
        return Plan(refs, known_total=known, files_to_do=len(listing.files))

    committed = None
    if parts:
        committed = ray.data.from_items(
            [{"path": p} for p in parts], override_num_blocks=min(len(parts), 4 * partitions)
        )
        committed = committed.map_batches(
            committed_rows,
            batch_format="numpy",
            batch_size=8,
            fn_kwargs={"output": output, "retry_poisoned": retry_poisoned},
        )
    file_refs = [ray.data.from_items(listing.files)] if listing.files else []
    file_refs += _manifest_refs(inputs.manifests)
    decisions = []
    if file_refs:
        keys = _union(file_refs).map_batches(file_ref_keys, batch_format="pyarrow")
        if committed is not None:
            keys = keys.union(committed.map_batches(committed_file_keys, batch_format="pyarrow"))
        shuffled = keys.repartition(partitions, keys=["uri"])  # every row of a URI in one block
        decisions.append(shuffled.map_batches(decide_file_keys, batch_format="pyarrow", batch_size=None))
    if committed is not None:
        decisions.append(committed.map_batches(decide_members, batch_format="pyarrow",
                                               fn_kwargs={"shards": listing.shard_versions}))  # fmt: skip
    decided = _union(decisions).materialize()

    result = Plan(refs=_empty_refs(), known_total=None)
    result.count(decided.map_batches(tally, batch_format="pyarrow").iter_rows())
    if result.retracted_by_reason:  # before anything is committed: a new part may reuse a retracted one's name
        removed = (
            decided.map_batches(retraction_rows, batch_format="pyarrow")
            .groupby("part", num_partitions=partitions)
            .map_groups(committer.retract_part, batch_format="pyarrow")
        )
        for row in removed.iter_rows():
            result.retracted.add(row)
    refs = [decided.map_batches(files_to_do, batch_format="pyarrow")]
    if listing.shards:
        shard_rows = ray.data.from_items(listing.shards).map_batches(listed_shard_rows, batch_format="pyarrow")
        kept = decided.map_batches(shard_skips, batch_format="pyarrow")
        shuffled = shard_rows.union(kept).repartition(partitions, keys=["uri"])  # every row of a URI in one block
        grouped = shuffled.map_batches(group_shards, batch_format="pyarrow", batch_size=None)
        refs.append(grouped.materialize())  # one row per shard: `pipeline.run.shard_dataset` reads it twice
    else:
        result.known_total = result.files_to_do
    result.refs = _union(refs)
    return result


LOCAL_PLAN_MAX_PARTS = 16  # up to this many committed parts (and no manifest), the driver plans on its own


def fits_locally(inputs: ResolvedInputs, parts: list[str]) -> bool:
    """Whether `plan_locally` may plan this run: a small output, inputs all listed by the driver."""
    return len(parts) <= LOCAL_PLAN_MAX_PARTS and not inputs.manifests


def plan_locally(
    inputs: ResolvedInputs, *, committer: OutputCommitter, parts: list[str], retry_poisoned: bool = False
) -> Plan:
    """`plan` for a small output, in the driver process without Ray: the same decision functions on the whole
    table instead of per shuffle partition, and the same retractions. ``Plan.refs`` is a `REF_SCHEMA` table."""
    listing = _Listing(inputs)
    paths = {"path": np.array(parts, dtype=object)}
    committed = committed_rows(paths, output=committer.out.uri, retry_poisoned=retry_poisoned)
    keys = [committed_file_keys(committed)]
    if listing.files:
        keys.append(file_ref_keys(pa.Table.from_pylist(listing.files)))
    decided = pa.concat_tables(
        [decide_file_keys(pa.concat_tables(keys)), decide_members(committed, shards=listing.shard_versions)]
    )

    result = Plan(refs=files_to_do(decided), known_total=None)
    result.count(tally(decided).to_pylist())
    retractions = retraction_rows(decided)
    for part in sorted(set(retractions.column("part").to_pylist())):  # part by part, as `plan` groups them
        group = retractions.filter(pc.equal(retractions.column("part"), part))
        result.retracted.add(committer.retract_part(group).to_pylist()[0])
    if listing.shards:
        shard_rows = listed_shard_rows(pa.Table.from_pylist(listing.shards))
        shards = group_shards(pa.concat_tables([shard_rows, shard_skips(decided)]))
        result.refs = pa.concat_tables([result.refs, shards])
    else:
        result.known_total = result.files_to_do
    return result


def _union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _empty_refs() -> ray.data.Dataset:
    import ray.data

    return ray.data.from_arrow(REF_SCHEMA.empty_table())


def _manifest_refs(manifests: list[str]) -> list[ray.data.Dataset]:
    """The file refs of each manifest, read and normalised by Ray workers."""
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
