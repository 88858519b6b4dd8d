"""The resume decision for files, once (`pipeline.resume_decision.decide_file_keys`), without Ray: one hand-made
case per rule of the protocol (`pipeline.resume_decision`'s list), and the same answer on the whole table (the local
plan) as on any split that keeps a URI's rows together (the Ray plan's hash-shuffle partitions)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.resume_decision import (
    DO,
    RETRACT,
    SKIP,
    UNLISTED,
    committed_file_keys,
    decide_file_keys,
    file_ref_keys,
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
