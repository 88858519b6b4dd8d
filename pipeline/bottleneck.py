"""Which stage limits a run, and what to do about it: the driver's sum of its parts' stage seconds.

Each committed part's row carries its actor's seconds since that actor's previous part
(`pipeline.segmenting.stage_clock`),
so the sums over a run are the model actors' totals: ``wall`` (actor-seconds), each stage's busy seconds, the
model thread's idle time (the GPU waiting for input) and which stage the block call's orchestrating thread
waited on. `StageTotals.verdict` names the limiting stage with its remedy:

- the model, when it is busy at least `MODEL_BUSY` of the time or the block call waited on it most:
  ``bottleneck: model (busy 96 %)``;
- otherwise the stage the block call waited on most (read, the CPU pool, commit, or ``work``: no block call
  at all; for the CPU pool, which of decode and RLE used more of it), with the share of the time the model
  waited for input:
  ``bottleneck: decode (the model waited 38 % of the time for input) — add CPUs per actor ...``.

The run's record and ``_SUCCESS`` hold `StageTotals.report` (seconds, shares, the verdict, the in-run rate);
the job prints the verdict under its summary line.
"""

from __future__ import annotations

from typing import Any

from pipeline.segmenting.stage_clock import KEYS

MODEL_BUSY = 0.85  # a model busy this share of the time is the bottleneck, whatever else waited

_REMEDIES = {
    "read": "reading the input is slow: run nearer the data, or pack small files into tar or Parquet shards",
    "decode": "add CPUs per actor (--cpus-per-actor) or decode JPEGs on the GPU (--device-preprocess)",
    "rle": "add CPUs per actor (--cpus-per-actor)",
    "commit": "writing the output is slow: check the output's storage, or write larger parts (--rows-per-file)",
    "work": "the actors waited for work blocks: a job too small for its actors (--max-actors), or a slow plan",
}
_MODEL_REMEDY = {
    True: "the GPUs are the limit: add GPUs (--max-actors) or try --precision bf16 (README, speed switches)",
    False: "the CPU model is the limit: add actors or nodes (--max-actors), or run on GPUs (--device cuda)",
}


class StageTotals:
    """Fed each committed part's row (`add`), it gives the run's stage seconds, their shares and the verdict."""

    def __init__(self, *, gpu: bool) -> None:
        self.gpu = gpu
        self.seconds = dict.fromkeys(KEYS, 0.0)
        self._committed: list[tuple[float, int]] = []  # (Unix time, images) of each part

    def add(self, row: dict[str, Any]) -> None:
        for key, value in (row.get("stages") or {}).items():
            if key in self.seconds and value is not None:
                self.seconds[key] += value
        if row.get("committed_at") is not None:
            self._committed.append((row["committed_at"], row["images_ok"] + row["images_error"]))

    def shares(self) -> dict[str, float]:
        """Each key's seconds over the actors' wall seconds (0 for a run without parts)."""
        wall = self.seconds["wall"]
        return {key: (value / wall if wall > 0 else 0.0) for key, value in self.seconds.items() if key != "wall"}

    def steady_images_per_second(self) -> float | None:
        """Images/s inside the run: the images of every part but the first over the time from the first part's
        commit to the last one's (no start-up in it); None with fewer than two parts."""
        if len(self._committed) < 2:
            return None
        committed = sorted(self._committed)
        span = committed[-1][0] - committed[0][0]
        return sum(n for _, n in committed[1:]) / span if span > 0 else None

    def limit(self) -> str | None:
        """The limiting stage (`STAGES` or ``work``), None for a run without a measured part. Decoding and RLE
        share the actor's CPU pool, so a wait on either is a wait for that pool: the one of them that used more
        of it is the limit."""
        if self.seconds["wall"] <= 0:
            return None
        s = self.seconds
        waited = {"model": s["waited_model"], "read": s["waited_read"], "commit": s["waited_commit"],
                  "cpu": s["waited_decode"] + s["waited_rle"], "work": s["between_calls"]}  # fmt: skip
        most = max(waited, key=lambda stage: waited[stage])
        if self.shares()["model"] >= MODEL_BUSY or most == "model":
            return "model"
        if most == "cpu":
            return "decode" if s["decode"] >= s["rle"] else "rle"
        return most

    def verdict(self) -> str:
        """``bottleneck: <stage> (...) — <remedy>``, or "" for a run without a measured part."""
        limit = self.limit()
        if limit is None:
            return ""
        shares = self.shares()
        if limit == "model":
            return f"bottleneck: model (busy {_percent(shares['model'])}) — {_MODEL_REMEDY[self.gpu]}"
        idle = _percent(shares["model_idle"])
        return f"bottleneck: {limit} (the model waited {idle} of the time for input) — {_REMEDIES[limit]}"

    def report(self) -> dict[str, Any]:
        """What the run's record keeps: seconds, shares, the limiting stage and verdict, the in-run rate."""
        rate = self.steady_images_per_second()
        return {
            "seconds": {key: round(value, 3) for key, value in self.seconds.items()},
            "shares": {key: round(value, 4) for key, value in self.shares().items()},
            "bottleneck": self.limit(),
            "verdict": self.verdict(),
            "steady_images_per_s": round(rate, 2) if rate is not None else None,
        }


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"
