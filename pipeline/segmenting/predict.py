"""Segmentation of one model batch: the model on its device, as the model actor hosts it.

`PanopticSegmenter` loads the weights itself from the weights URI (cached on the node), once, in
``__init__`` — the model never travels through the object store; the block call (`pipeline.segmenting.block_call`)
holds one per actor. A batch of decoded images of any sizes (`pipeline.inputs.decode.decoded_batch`) goes through
`PanopticPredictor` (grouped by canvas, so results do not depend on batch composition) and comes back as
one Arrow table in `pipeline.schema.PREDICTION_SCHEMA`: per image its id map (bytes) and its segments as
columns (`pipeline.segmenting.prediction_tables`). `pipeline.segmenting.prediction_tables.encode_results` turns that
into `RESULT_SCHEMA` (COCO RLE per segment): on the block call's threads while the model runs the next batch
(``encode_rle=False``), or here. The two halves are apart for the block call: `PanopticSegmenter.segment` (the
device's part: all the model thread runs) and `PanopticSegmenter.table` (the rows, on the block call's CPU threads).

A CUDA out-of-memory error on a batch retries the two halves separately, down to one image; an image
that still does not fit becomes a retryable error row.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from model.checkpoint import build_model, read_state_dict
from model.config import get_variant
from model.panoptic import PanopticResult
from model.predictor import InferenceConfig, PanopticPredictor, PreparedImage
from model.synthetic_weights import synthetic_state_dict
from pipeline.inputs.device_decode import prepare_encoded
from pipeline.schema import SYNTHETIC_WEIGHTS
from pipeline.segmenting.prediction_tables import encode_results, prediction_table

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "CUDA out of memory on this single image"


class Segmented(NamedTuple):
    """A batch's model output (`PanopticSegmenter.segment`): results by row, and every row's error text ("" for
    none) and retryable flag."""

    results: dict[int, PanopticResult]
    errors: list[str]
    retryable: list[bool]


def is_device_fault(exc: BaseException) -> bool:
    """Whether ``exc`` says the device itself failed (a CUDA illegal memory access, a lost device, an ECC error):
    its context is lost and every later call in this process would fail too. Out-of-memory is not one."""
    text = str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text:  # a raw cudaMalloc's too
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: every cudaError
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    sticky = ("CUDA error", "CUDA driver error", "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
              "cuDNN error: CUDNN_STATUS_MAPPING_ERROR", "CUBLAS_STATUS_EXECUTION_FAILED")  # fmt: skip
    return isinstance(exc, RuntimeError) and any(s in text for s in sticky)


def pick_device(device: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """``auto``: CUDA when this process sees a GPU, else CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but this worker sees no CUDA device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_weights(variant: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict for ``weights``: a URI, or "synthetic" for the deterministic demo weights."""
    if weights == SYNTHETIC_WEIGHTS:
        return synthetic_state_dict(get_variant(variant).config)
    return read_state_dict(weights)


class PanopticSegmenter:
    """Decoded image rows in (`pipeline.inputs.decode.decoded_batch`), one `PREDICTION_SCHEMA` (or, with
    ``encode_rle``, `RESULT_SCHEMA`) table out."""

    def __init__(
        self,
        *,
        variant: str,
        weights: str,
        inference: InferenceConfig,
        device: Literal["auto", "cpu", "cuda"],
        encode_rle: bool = True,
    ) -> None:
        self.encode_rle = encode_rle  # False: id maps go out unencoded, for `encode_results` on another thread
        self.device = pick_device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model = build_model(get_variant(variant).config, load_weights(variant, weights))
        self.predictor = PanopticPredictor(model, inference, self.device)
        log.info("segmenter ready: %s on %s", variant, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.table(batch, self.segment(batch))

    def segment(self, batch: dict[str, np.ndarray]) -> Segmented:
        """The device's part of a batch, all the model thread runs (`pipeline.segmenting.block_call`): the images of
        the rows
        without an error (JPEGs decoded on the device with ``--device-preprocess``) through the model."""
        errors = [str(e) for e in batch["error"]]
        retryable = [bool(r) for r in batch["retryable"]]
        prepared = self._prepare(batch, errors)  # row -> image, for rows without an error
        todo = sorted(prepared)
        results: dict[int, PanopticResult] = {}
        predicted = self._predict_splitting_on_oom([prepared[i] for i in todo], todo, errors, retryable)
        for i, result in zip(todo, predicted):
            if result is not None:
                results[i] = result
        return Segmented(results, errors, retryable)

    def table(self, batch: dict[str, np.ndarray], segmented: Segmented) -> pa.Table:
        """`segment`'s output as rows: `PREDICTION_SCHEMA`, or `RESULT_SCHEMA` with ``encode_rle`` (no device)."""
        results, errors, retryable = segmented
        predictions = prediction_table(batch, results, errors=errors, retryable=retryable)
        return encode_results(predictions) if self.encode_rle else predictions

    def _prepare(self, batch: dict[str, np.ndarray], errors: list[str]) -> dict[int, PreparedImage]:
        """Images of the rows without an error: pixels decoded on the CPU, or JPEG bytes left to this
        device (`pipeline.inputs.device_decode`); a JPEG that cannot be decoded here sets its row's error."""
        encoded = batch.get("encoded")
        pending = [i for i in range(len(errors)) if not errors[i]]
        on_device = [i for i in pending if encoded is not None and len(encoded[i])]
        prepared = {
            i: PreparedImage(batch["pixels"][i], (int(batch["height"][i]), int(batch["width"][i])))
            for i in sorted(set(pending) - set(on_device))
        }
        if on_device:
            images = prepare_encoded(
                [bytes(encoded[i]) for i in on_device],
                [int(batch["orientation"][i]) for i in on_device],
                inference=self.predictor.config,
                device=self.device,
            )
            for i, image in zip(on_device, images):
                if isinstance(image, str):
                    errors[i] = image
                else:
                    prepared[i] = image
        return prepared

    def _predict_splitting_on_oom(
        self, images: list[PreparedImage], indices: list[int], errors: list[str], retryable: list[bool]
    ) -> list[PanopticResult | None]:
        if not images:
            return []
        try:
            return list(self.predictor.predict_prepared(images))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(images) == 1:
                errors[indices[0]] = OUT_OF_MEMORY
                retryable[indices[0]] = True  # another run (another GPU, fewer neighbours) may fit it
                return [None]
            half = len(images) // 2
            log.warning("CUDA out of memory on a batch of %d images; retrying in halves", len(images))
            return self._predict_splitting_on_oom(images[:half], indices[:half], errors, retryable) + (
                self._predict_splitting_on_oom(images[half:], indices[half:], errors, retryable)
            )
