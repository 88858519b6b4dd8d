"""Child process of tests/pipeline/test_actor_memory.py: one `BlockSegmenter` call (no Ray) on the refs it is
given, and the peak resident memory that call added.

The model is built first (synthetic weights, ``min_size`` 64), then the high-water mark is reset
(``/proc/self/clear_refs``, Linux) so that the model's own build does not hide the call's peak; the call's
peak is ``VmHWM`` after it minus ``VmRSS`` before it. Prints one JSON object.

    python -m tests.pipeline.actor_memory '{"refs": "refs.parquet", "output": "out", "batch_size": 2, ...}'
"""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq

from model.predictor import InferenceConfig
from pipeline.config import InputConfig, ResourceConfig
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease
from pipeline.segmenting.block_call import BlockSegmenter
from pipeline.segmenting.predict import PanopticSegmenter

INFERENCE = InferenceConfig(min_size=64, max_size=107)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    spec = json.loads(sys.argv[1])
    model = PanopticSegmenter(
        variant="detr-r50-panoptic", weights="synthetic", inference=INFERENCE, device="cpu", encode_rle=False
    )
    call = BlockSegmenter.with_model(  # as the actor's, around this model
        model,
        inference=INFERENCE,
        input=InputConfig(uris=(spec["refs"],), max_pixels=10**9, max_bytes=1 << 30),
        resources=ResourceConfig(rows_per_file=spec["rows_per_file"], batch_size=spec["batch_size"]),
        cpus=spec["threads"],
        committer=OutputCommitter(spec["output"], "r1"),
    )
    refs = pq.read_table(spec["refs"])
    with Lease.acquire(spec["output"], "r1"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        parts = call(refs)
        peak = _status_kib("VmHWM")
    print(json.dumps({"peak": (peak - before) * 1024, "images_ok": sum(parts["images_ok"].to_pylist())}))


if __name__ == "__main__":
    main()
