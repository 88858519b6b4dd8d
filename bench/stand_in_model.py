"""A stand-in for the model: `pipeline.segmenting.predict.PanopticSegmenter` patched to return precomputed results at a
fixed rate, so that a job's plan (driver, object store, stages) is measured and not the CPU model.

Installed in every Ray worker by ``runtime_env={"worker_process_setup_hook": "stand_in_model.install"}`` with
this folder (``bench/``) on the workers' ``PYTHONPATH`` *after* the tree under test: the module imports only
``pipeline`` and ``model``, so the same file patches the previous commit's tree (``/work/wt-before``) and the
current one. Both plans construct that class: the oldest plan maps it as the actor, a later one's
`pipeline.segmenting.block_call.BlockSegmenter` builds one with ``encode_rle=False`` and calls it per model batch,
the current one runs only its device step (`PanopticSegmenter.segment`) on the model thread and the rows on its CPU
threads.

``__init__`` builds no model. ``__call__(batch)`` returns what the real one returns,
`pipeline.segmenting.prediction_tables.prediction_table` (through `encode_results` when ``encode_rle``), with one fixed
`model.panoptic.PanopticResult` per ok row sized to that row's (height, width): `SEGMENTS` segments (vertical
bands), and it sleeps so that a batch takes ``PFB_STAND_IN_MS`` (default 2) ms per image in all. ``segment(batch)``
returns the same results as a `pipeline.segmenting.predict.Segmented` after sleeping that long: the rows are then
made on the block call's CPU threads, as with the real model.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

import numpy as np

MS_PER_IMAGE_ENV = "PFB_STAND_IN_MS"
SEGMENTS = 4
_RESULTS: dict[tuple[int, int], object] = {}


def fixed_result(height: int, width: int):
    """The precomputed `PanopticResult` of an image of (height, width): `SEGMENTS` vertical bands."""
    from model.panoptic import PanopticResult, Segment

    key = (height, width)
    if key not in _RESULTS:
        bands = np.minimum(np.arange(width) * SEGMENTS // max(width, 1), SEGMENTS - 1).astype(np.uint8)
        id_map = np.ascontiguousarray(np.broadcast_to(bands[None, :], (height, width)))
        segments = []
        for i in range(SEGMENTS):
            cols = np.flatnonzero(bands == i)
            x0, w = (int(cols[0]), len(cols)) if len(cols) else (0, 0)
            segments.append(Segment(i, 1 + i, i < 2, 0.9, int(w * height), (x0, 0, w, height)))
        _RESULTS[key] = PanopticResult(id_map, segments)
    return _RESULTS[key]


def _init(self, *, variant, weights, inference, device, encode_rle: bool = True) -> None:
    import torch

    self.encode_rle = encode_rle
    self.device = torch.device("cpu")
    self.predictor = None  # no model: never built
    self.stand_in_ms = float(os.environ.get(MS_PER_IMAGE_ENV, "2"))


def _call(self, batch):
    from pipeline.segmenting.prediction_tables import encode_results, prediction_table

    started = time.perf_counter()
    results, errors, retryable = _fixed_results(batch)
    predictions = prediction_table(batch, results, errors=errors, retryable=retryable)
    table = encode_results(predictions) if self.encode_rle else predictions
    _sleep_rest(self.stand_in_ms * len(errors), started)
    return table


def _segment(self, batch):
    """The device's part alone (a tree whose block call runs `PanopticSegmenter.segment` on its model thread and
    the rows on its CPU threads): the fixed results, after sleeping ``PFB_STAND_IN_MS`` per image."""
    from pipeline.segmenting.predict import Segmented

    started = time.perf_counter()
    results, errors, retryable = _fixed_results(batch)
    _sleep_rest(self.stand_in_ms * len(errors), started)  # the GIL released, as a GPU's work leaves it
    return Segmented(results, errors, retryable)


def _fixed_results(batch) -> tuple[dict, list[str], list[bool]]:
    """(results by row, errors, retryable) of a batch: `fixed_result` for each ok row of a usable size."""
    errors = [str(e) for e in batch["error"]]
    retryable = [bool(r) for r in batch["retryable"]]
    heights, widths = batch["height"], batch["width"]
    results = {
        i: fixed_result(int(heights[i]), int(widths[i]))
        for i in range(len(errors))
        if not errors[i] and int(heights[i]) > 0 and int(widths[i]) > 0
    }
    return results, errors, retryable


def _sleep_rest(ms: float, started: float) -> None:
    rest = ms / 1000 - (time.perf_counter() - started)
    if rest > 0:
        time.sleep(rest)


def install() -> None:
    """Patch `PanopticSegmenter` in this process (a Ray ``worker_process_setup_hook``) when
    `pipeline.segmenting.predict` is
    imported (at once if it is already): a worker that never imports it (Ray Data's own actors, the flight
    recorder, idle workers) never imports torch for it, as in a real job (importing it in every worker cost ~5 s
    of CPU each, in the middle of the measured window on 2 cores)."""
    module = sys.modules.get("pipeline.segmenting.predict")
    if module is not None:
        _patch(module)
    else:
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.segmenting.predict":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _patch(module) -> None:
    """Its device step where it has one (`PanopticSegmenter.segment`), else its whole call (an older tree)."""
    segmenter = module.PanopticSegmenter
    segmenter.__init__ = _init
    if hasattr(segmenter, "segment"):
        segmenter.segment = _segment
    else:
        segmenter.__call__ = _call
    segmenter.stand_in = True
