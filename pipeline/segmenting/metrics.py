"""The job's Ray metrics: each model actor counts its committed parts where cluster users look.

`PartMetrics` is created once per model actor and fed the row of each part it commits (a
`pipeline.schema.PART_ROW_SCHEMA` row, plus the actor's ``stages`` seconds and ``cpus``). It increments
`ray.util.metrics` counters, which Ray's metrics agent on each node exports in Prometheus text beside Ray's own
metrics: the Prometheus that scrapes a Ray cluster for its dashboard (``ray metrics launch-prometheus``, KubeRay's
PodMonitor) collects them, and a Grafana panel graphs them (README "Metrics").

Ray prefixes a custom metric's name with ``ray_`` and a counter's with the suffix ``_total`` as well (checked on
Ray 2.60 by tests/pipeline/test_metrics.py), so ``panoptic_flow_images`` is exported as
``ray_panoptic_flow_images_total``. Every series also carries Ray's own labels (``NodeAddress``, ``WorkerId``,
``SessionName``, ...): sum over them. The counters (README "Metrics"):

- ``panoptic_flow_images{status}``: images committed, ``status`` ``ok`` or ``error``.
- ``panoptic_flow_errors{kind}``: error images by kind (`pipeline.error_budget.error_kind`).
- ``panoptic_flow_segments``, ``panoptic_flow_parts``: segments and parts committed.
- ``panoptic_flow_stage_seconds{stage}``: busy seconds per stage (``read``, ``decode``, ``model``, ``rle``,
  ``commit``), summed over the stage's threads.
- ``panoptic_flow_model_idle_seconds``: the model thread waiting for decoded input (the GPU idle for want of it).
- ``panoptic_flow_waited_seconds{stage}``: the block call's orchestrating thread blocked on a stage.
- ``panoptic_flow_wall_seconds``: the actor's wall seconds, so that ``rate(stage) / rate(wall)`` is a busy share.
- ``panoptic_flow_reserved_cpu_seconds``: wall seconds times the CPUs the actor reserved (a CPU share's
  denominator).

A metric never breaks the job: outside Ray (``ray.is_initialized()`` false) `PartMetrics` does nothing, and a
failure to create or record the counters is logged (a warning the first time, then at debug level) and ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import ray
from ray.util.metrics import Counter

from pipeline.schema import STATUS_ERROR, STATUS_OK
from pipeline.segmenting.stage_clock import STAGES

log = logging.getLogger(__name__)

PREFIX = "panoptic_flow_"  # Ray exports it as ray_panoptic_flow_<name>_total

# The keys of a row's ``stages`` that are not a stage's busy seconds (those are `STAGES`: the ``stage`` label);
# the clock's other keys (``model_device``, ``between_calls``, ``call_cpu``) are in the run's record only.
WALL = "wall"
MODEL_IDLE = "model_idle"
WAITED_PREFIX = "waited_"


class PartMetrics:
    """Created once per model actor (in ``BlockSegmenter.__init__``); `record` is called with each committed
    part's row.

    ``tags``: labels put on every series (e.g. ``{"run_id": ...}``), fixed for the actor's life.
    """

    def __init__(self, tags: Mapping[str, str] | None = None) -> None:
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._counters: dict[str, Counter] | None = None
        self._failed = False
        if not ray.is_initialized():
            log.debug("Ray is not initialized: no Ray metrics")
            return
        try:
            self._counters = _counters(tuple(self._tags))
            for counter in self._counters.values():
                counter.set_default_tags(self._tags)
        except Exception as exc:  # a metric must never break the job
            self._counters = None
            self._give_up("creating", exc)

    def record(self, row: Mapping[str, Any]) -> None:
        """Count one committed part: its images, errors by kind, segments and, when ``row`` has them, its
        ``stages`` seconds (a missing key counts nothing). Never raises."""
        if self._counters is None:
            return
        try:
            self._record(row, self._counters)
        except Exception as exc:  # a metric must never break the job
            self._give_up("recording", exc)

    def _record(self, row: Mapping[str, Any], counters: dict[str, Counter]) -> None:
        _inc(counters["images"], row.get("images_ok"), status=STATUS_OK)
        _inc(counters["images"], row.get("images_error"), status=STATUS_ERROR)
        for entry in row.get("error_kinds") or ():
            _inc(counters["errors"], entry.get("count"), kind=str(entry.get("kind")))
        _inc(counters["segments"], row.get("segments"))
        stages = row.get("stages") or {}
        for key, seconds in stages.items():
            if key == WALL:
                _inc(counters["wall_seconds"], seconds)
                _inc(counters["reserved_cpu_seconds"], _product(seconds, row.get("cpus")))
            elif key == MODEL_IDLE:
                _inc(counters["model_idle_seconds"], seconds)
            elif key.startswith(WAITED_PREFIX):
                _inc(counters["waited_seconds"], seconds, stage=key[len(WAITED_PREFIX) :])
            elif key in STAGES:
                _inc(counters["stage_seconds"], seconds, stage=key)
        _inc(counters["parts"], 1)  # last: a part counted has all its numbers in

    def _give_up(self, doing: str, exc: Exception) -> None:
        """Log the first failure (a warning) and the rest at debug level; creating failed: no metrics at all."""
        level = logging.DEBUG if self._failed else logging.WARNING
        self._failed = True
        log.log(level, "Ray metrics: %s failed (%s: %s); the job goes on", doing, type(exc).__name__, exc)


def _counters(tag_keys: tuple[str, ...]) -> dict[str, Counter]:
    """The job's counters, by short name, each with ``tag_keys`` besides its own label."""

    def counter(name: str, description: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, description=description, tag_keys=(*labels, *tag_keys))

    return {
        "images": counter("images", "Images committed, by status (ok, error).", "status"),
        "errors": counter("errors", "Error images committed, by error kind.", "kind"),
        "segments": counter("segments", "Panoptic segments committed."),
        "parts": counter("parts", "Parts committed."),
        "stage_seconds": counter("stage_seconds", "Busy seconds of a block call's stage, over its threads.", "stage"),
        "model_idle_seconds": counter("model_idle_seconds", "Seconds the model waited for decoded input."),
        "waited_seconds": counter("waited_seconds", "Seconds the block call's thread was blocked on a stage.", "stage"),
        "wall_seconds": counter("wall_seconds", "Wall seconds of the model actors' block calls."),
        "reserved_cpu_seconds": counter("reserved_cpu_seconds", "Wall seconds times the CPUs each actor reserved."),
    }


def _inc(counter: Counter, value: Any, **labels: str) -> None:
    """Add ``value`` (a number; None, zero, negative or not finite: nothing, as a counter only grows)."""
    if value is None:
        return
    amount = float(value)
    if amount > 0 and math.isfinite(amount):
        counter.inc(amount, tags=labels or None)


def _product(seconds: Any, cpus: Any) -> float:
    return 0.0 if seconds is None or cpus is None else float(seconds) * float(cpus)
