"""The resume decision, once (`pipeline.exactly_once.resume_decision`), without Ray: one hand-made case per rule of the
protocol (its list) for files and for shard members, and the same answer on the whole table (the local plan) as
on any split that keeps a URI's rows together (the Ray plan's hash-shuffle partitions)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.exactly_once.resume_decision import (
    DO,
    RETRACT,
    SKIP,
    UNLISTED,
    committed_file_keys,
    decide_file_keys,
    decide_members,
    file_ref_keys,
    group_shards,
    listed_shard_rows,
    shard_skips,
)
from pipeline.schema import COMMITTED_SCHEMA

LISTED = [  # this run's inputs as listed: uri, size, version
    ("new.jpg", 10, "v1"),
    ("kept.jpg", 10, "v1"),
    ("flaky.jpg", 10, "v1"),
    ("edited.jpg", 12, "v2"),
    ("twice.jpg", 10, "v1"),
    ("unknown-size.jpg", None, None),
]
COMMITTED = [  # committed images rows of whole files: source, retryable, input_size, input_version, part
    ("kept.jpg", False, 10, "v1", "part-a"),
    ("flaky.jpg", True, 10, "v1", "part-a"),
    ("edited.jpg", False, 10, "v1", "part-b"),
    ("twice.jpg", False, 10, "v1", "part-a"),
    ("twice.jpg", False, 10, "v1", "part-c"),
    ("deleted.jpg", False, 10, "v1", "part-b"),
    ("unknown-size.jpg", False, 10, "v1", "part-c"),
]
EXPECTED = {  # uri: (action, reason, parts)
    "new.jpg": (DO, None, []),  # an input without a committed row is done
    "kept.jpg": (SKIP, None, ["part-a"]),  # every other committed row is kept, its input skipped
    "flaky.jpg": (RETRACT, "retryable", ["part-a"]),  # a retryable error is retracted and done again
    "edited.jpg": (RETRACT, "changed", ["part-b"]),  # an input changed since (size/version) likewise
    "twice.jpg": (RETRACT, "repeated", ["part-a", "part-c"]),  # committed twice: all its rows retracted
    "deleted.jpg": (UNLISTED, None, ["part-b"]),  # committed, not among the inputs: kept and counted
    "unknown-size.jpg": (SKIP, None, ["part-c"]),  # unknown on one side: not "changed"
}


def _keys() -> pa.Table:
    refs = pa.table({"uri": [u for u, _, _ in LISTED], "kind": ["file"] * len(LISTED),
                     "size": pa.array([s for _, s, _ in LISTED], pa.int64()),
                     "version": pa.array([v for _, _, v in LISTED], pa.string())})  # fmt: skip
    committed = pa.table(
        {"source": [c[0] for c in COMMITTED], "member": pa.nulls(len(COMMITTED), pa.string()),
         "retryable": [c[1] for c in COMMITTED], "input_size": pa.array([c[2] for c in COMMITTED], pa.int64()),
         "input_version": [c[3] for c in COMMITTED], "part": [c[4] for c in COMMITTED]},
        schema=COMMITTED_SCHEMA,
    )  # fmt: skip
    return pa.concat_tables([file_ref_keys(refs), committed_file_keys(committed)])


def _decisions(plan: pa.Table) -> dict[str, tuple]:
    return {r["uri"]: (r["action"], r["reason"], sorted(r["parts"] or [])) for r in plan.to_pylist()}


def test_each_rule_of_the_protocol() -> None:
    plan = decide_file_keys(_keys())
    assert set(plan.column("kind").to_pylist()) == {"file"}
    assert _decisions(plan) == EXPECTED


def test_the_whole_table_and_any_split_by_uri_decide_the_same() -> None:
    keys = _keys()
    whole = _decisions(decide_file_keys(keys))
    for partitions in (2, 3, 5):
        bucket = pc.utf8_length(keys.column("uri")).to_numpy() % partitions  # a URI's rows stay together
        split = {}
        for b in range(partitions):
            split |= _decisions(decide_file_keys(keys.filter(pa.array(bucket == b))))
        assert split == whole
    assert decide_file_keys(keys.slice(0, 0)).num_rows == 0  # an empty partition


SHARDS = {  # this run's shards as listed: uri -> (kind, size, version)
    "a.tar": ("tar", 100, "v1"),
    "b.tar": ("tar", 200, "v2"),  # changed since its rows were made
    "c.parquet": ("parquet", 50, "v1"),  # nothing committed yet
}
COMMITTED_MEMBERS = [  # source, member, retryable, input_size, input_version, part
    ("a.tar", "1.jpg", False, 100, "v1", "part-a"),
    ("a.tar", "2.jpg", True, 100, "v1", "part-a"),
    ("a.tar", "3.jpg", False, 100, "v1", "part-b"),
    ("b.tar", "1.jpg", False, 150, "v1", "part-b"),
    ("gone.tar", "1.jpg", False, 10, "v1", "part-b"),
]
EXPECTED_MEMBERS = {  # (uri, member): (action, reason)
    ("a.tar", "1.jpg"): (SKIP, None),  # kept: the shard is read without it
    ("a.tar", "2.jpg"): (RETRACT, "retryable"),
    ("a.tar", "3.jpg"): (SKIP, None),
    ("b.tar", "1.jpg"): (RETRACT, "changed"),  # a changed shard has all its rows retracted, is done whole
    ("gone.tar", "1.jpg"): (UNLISTED, None),
}
EXPECTED_SHARD_REFS = {  # uri: (kind, skip)
    "a.tar": ("tar", ["1.jpg", "3.jpg"]),
    "b.tar": ("tar", []),
    "c.parquet": ("parquet", []),
}


def _committed_members() -> pa.Table:
    rows = [dict(zip(("source", "member", "retryable", "input_size", "input_version", "part"), c))
            for c in COMMITTED_MEMBERS]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=COMMITTED_SCHEMA)


def _shard_rows(decided: pa.Table) -> pa.Table:
    listed = pa.Table.from_pylist([{"uri": u, "kind": k, "size": s, "version": v} for u, (k, s, v) in SHARDS.items()])
    return pa.concat_tables([listed_shard_rows(listed), shard_skips(decided)])


def _shard_refs(refs: pa.Table) -> dict[str, tuple]:
    return {r["uri"]: (r["kind"], sorted(r["skip"])) for r in refs.to_pylist()}


def test_each_rule_for_shard_members() -> None:
    versions = {uri: (version, size) for uri, (_, size, version) in SHARDS.items()}
    decided = decide_members(_committed_members(), shards=versions)
    assert set(decided.column("kind").to_pylist()) == {"shard"}
    assert {(r["uri"], r["member"]): (r["action"], r["reason"]) for r in decided.to_pylist()} == EXPECTED_MEMBERS
    refs = group_shards(_shard_rows(decided))
    assert _shard_refs(refs) == EXPECTED_SHARD_REFS
    assert refs.column("size").to_pylist() == [100, 200, 50]  # the listing's, in its order


def test_shards_grouped_whole_or_by_any_split_by_uri_are_the_same() -> None:
    versions = {uri: (version, size) for uri, (_, size, version) in SHARDS.items()}
    rows = _shard_rows(decide_members(_committed_members(), shards=versions))
    whole = _shard_refs(group_shards(rows))
    for partitions in (2, 3):
        bucket = pc.utf8_length(rows.column("uri")).to_numpy() % partitions
        split = {}
        for b in range(partitions):
            split |= _shard_refs(group_shards(rows.filter(pa.array(bucket == b))))
        assert split == whole
    assert group_shards(rows.slice(0, 0)).num_rows == 0  # an empty partition
