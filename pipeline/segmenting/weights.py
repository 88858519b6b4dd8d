"""The weights a job runs with, settled on the driver before any cluster work: the official release file
(``auto``), a local path or URI (fetched and cached by `model.checkpoint_source`), or the deterministic demo
weights (`SYNTHETIC_WEIGHTS`). Each model actor loads them itself (`pipeline.segmenting.predict.load_weights`).
"""

from __future__ import annotations

import logging

from model.checkpoint_source import CheckpointError, fetch, file_sha256
from model.config import get_variant
from pipeline.config import redact_uri
from pipeline.schema import SYNTHETIC_WEIGHTS

log = logging.getLogger(__name__)


def resolve_weights(variant: str, weights: str, *, allow_synthetic: bool) -> tuple[str, str]:
    """(weights URI or "synthetic", sha256 or "") after checking that the weights load into the variant.

    ``auto`` means the variant's official release file; when it cannot be fetched, ``allow_synthetic``
    falls back to deterministic demo weights (with a loud warning), otherwise it is an error. A file that is
    no checkpoint, or not one of this variant, raises `CheckpointError` here, on the driver.
    """
    if weights == SYNTHETIC_WEIGHTS:
        return SYNTHETIC_WEIGHTS, ""
    uri = get_variant(variant).url if weights == "auto" else weights
    try:
        path = fetch(uri)
    except CheckpointError:
        if weights == "auto" and allow_synthetic:
            log.warning(
                "\n%s\nWARNING: the official weights (%s) cannot be fetched. Running with DETERMINISTIC RANDOM\n"
                "weights instead: the pipeline works, but the segments are MEANINGLESS.\n%s",
                "!" * 100,
                uri,
                "!" * 100,
            )
            return SYNTHETIC_WEIGHTS, ""
        raise
    from model.checkpoint import check_state_dict, read_state_dict  # torch: only to check real weights

    check_state_dict(get_variant(variant).config, read_state_dict(uri), what=redact_uri(uri))
    return uri, file_sha256(path)
