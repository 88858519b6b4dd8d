"""An output's images in COCO panoptic form (panopticapi format): id-map PNG pixels, JSON entries, categories.

Segment ``k`` of the output is COCO id ``k + 1`` (``id = R + 256·G + 256²·B`` in the PNG); pixels of no
segment are 0 (VOID). Every ``category_id`` written is one of the 133 COCO panoptic categories: the model
has 250 class slots, and a segment whose slot is none of the 133 (``class_68``, ``class_201``, ...) is left
out, its pixels VOID, as the official tools (panopticapi's ``pq_compute``, hotcoco) reject unknown ids.

Names are deterministic and independent of which other images are exported: ``<name>`` is the input's
sanitised file stem plus ``_`` and the first 8 hex digits of SHA-1(image_id), and the integer image id is
the first 13 hex digits (52 bits) of the same hash.

Used by ``export-coco`` (which writes these) and ``evaluate`` (which scores the same id maps).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from model.categories import categories
from pipeline.exactly_once.output_paths import locate
from pipeline.inputs.ids import last_part
from pipeline.reading.packed_images import packed_rows
from pipeline.segmenting.rle import VOID_ID, panoptic_map

log = logging.getLogger(__name__)

PANOPTIC_FOLDER = "panoptic"
MAX_ID = 256**3 - 1

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def id_map_to_rgb(ids: np.ndarray) -> np.ndarray:
    """``[H, W]`` ids in ``[0, 2**24)`` -> ``[H, W, 3]`` uint8 with ``id = R + 256·G + 256²·B``."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise ValueError(f"ids must lie in [0, {MAX_ID}], got [{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.uint32)  # [H, W]
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)  # [H, W, 3]


def rgb_to_id_map(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W]`` uint32 ids (``R + 256·G + 256²·B``); inverse of :func:`id_map_to_rgb`."""
    rgb = np.asarray(rgb).astype(np.uint32)  # [H, W, 3]
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]  # [H, W]


def to_coco_ids(id_map: np.ndarray) -> np.ndarray:
    """An output id map (segment ids ``0..K-1``, -1 = void) -> COCO ids (``segment_id + 1``, 0 = VOID), uint32."""
    if id_map.size and id_map.min() < VOID_ID:
        raise ValueError(f"segment ids must be >= {VOID_ID}, got {id_map.min()}")
    return (id_map.astype(np.int64) + 1).astype(np.uint32)  # [H, W]


def coco_names(image_id: str) -> tuple[int, str, str]:
    """Deterministic ``(coco image id, base name, original extension)`` of an output ``image_id``.

    ``s3://b/shard.tar#dir/000123.jpg`` -> ``(<52-bit int>, "000123_1a2b3c4d", ".jpg")``.
    """
    digest = hashlib.sha1(image_id.encode()).hexdigest()
    basename = posixpath.basename(last_part(image_id).rstrip("/"))
    stem, dot, ext = basename.rpartition(".")
    if not dot:
        stem, ext = basename, ""
    stem = _UNSAFE.sub("_", stem).strip("._")[:80] or "image"
    return int(digest[:13], 16), f"{stem}_{digest[:8]}", (f".{_UNSAFE.sub('_', ext)}" if ext else "")


def known_segments(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segments whose ``category_id`` is one of the 133 COCO panoptic categories (what an export keeps)."""
    known = {c.id for c in categories()}
    return [s for s in segments if int(s["category_id"]) in known]


def coco_image(image: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """One packed image (see :func:`pipeline.reading.packed_images.packed_rows`) -> (PNG pixels, ``images`` entry,
    annotation).

    Segments of a category outside the 133 are left out (their pixels VOID, see the module docstring). Areas
    and boxes are counted on the id map that goes into the PNG; a segment that covers no pixel (overlapped
    entirely by later segments) is dropped, as panopticapi rejects it.
    """
    coco_id, name, ext = coco_names(image["image_id"])
    height, width = int(image["height"]), int(image["width"])
    kept = known_segments(image["segments"])
    ids = to_coco_ids(panoptic_map(kept, height=height, width=width))  # [H, W]
    segments_info = []
    for segment in kept:
        sid = int(segment["segment_id"]) + 1
        ys, xs = np.nonzero(ids == sid)  # [N], [N]
        if ys.size == 0:
            log.warning("image %s: segment %d covers no pixel; dropped", image["image_id"], sid - 1)
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        segments_info.append(
            {
                "id": sid,
                "category_id": int(segment["category_id"]),
                "iscrowd": 0,
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(ys.size),
                "score": float(segment["score"]),
            }
        )
    entry = {
        "id": coco_id,
        "file_name": name + ext,
        "width": width,
        "height": height,
        "image_uri": image["image_id"],
    }
    annotation = {"image_id": coco_id, "file_name": f"{name}.png", "segments_info": segments_info}
    return id_map_to_rgb(ids), entry, annotation


def write_coco_pngs(batch: pa.Table, *, dest: str) -> pa.Table:
    """Ray stage: packed image rows -> PNGs under ``dest/panoptic/``; returns their JSON entries.

    Output columns: ``image_id``, ``image`` (JSON of the ``images`` entry), ``annotation`` (JSON) and
    ``left_out`` (segments of a category outside the 133).
    """
    fs, root = locate(dest)
    out: dict[str, list[Any]] = {"image_id": [], "image": [], "annotation": [], "left_out": []}
    for image in packed_rows(batch):
        rgb, entry, annotation = coco_image(image)
        buffer = io.BytesIO()
        Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
        with fs.open(f"{root}/{PANOPTIC_FOLDER}/{annotation['file_name']}", "wb") as f:
            f.write(buffer.getvalue())
        out["image_id"].append(image["image_id"])
        out["image"].append(json.dumps(entry))
        out["annotation"].append(json.dumps(annotation))
        out["left_out"].append(len(image["segments"]) - len(known_segments(image["segments"])))
    schema = pa.schema([("image_id", pa.string()), ("image", pa.string()), ("annotation", pa.string())])
    return pa.table(out, schema=schema.append(pa.field("left_out", pa.int64())))


def coco_categories() -> list[dict[str, Any]]:
    """The 133 COCO panoptic categories in panopticapi's JSON form."""
    return [
        {
            "id": c.id,
            "name": c.name,
            "supercategory": c.supercategory,
            "isthing": int(c.isthing),
            "color": list(c.color),
        }
        for c in categories()
    ]
