"""`panoptic-flow export-coco OUTPUT DEST`: an output as COCO panoptic annotations (panopticapi format).

Writes ``DEST/panoptic/<name>.png`` (segment ids as ``id = R + 256·G + 256²·B``) and ``DEST/panoptic.json``
with ``images``, ``annotations`` and ``categories`` (the 133 COCO panoptic categories). Segment ``k`` of
the output is COCO id ``k + 1``; pixels of no segment are 0 (VOID). Only ``ok`` images are exported.

Every ``category_id`` written is one of ``categories``: the model has 250 class slots, and a segment whose
slot is none of the 133 categories (``class_68``, ``class_201``, ...) is left out, its pixels VOID, as the
official tools (panopticapi's ``pq_compute``, hotcoco) reject unknown category ids. Their number is
reported. `evaluate` scores an output exactly as these tools score its export.

Names are deterministic and independent of which other images are exported: ``<name>`` is the input's
sanitised file stem plus ``_`` and the first 8 hex digits of SHA-1(image_id), and the integer image id is
the first 13 hex digits (52 bits) of the same hash. A collision of either raises an error.

The PNGs are written by a Ray Data ``map_batches`` over :func:`pipeline.outputs.read_segments_by_image`;
the driver only gathers the (small) JSON entries.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import posixpath
import re
import sys
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image

from model.categories import categories
from pipeline.outputs import (
    VOID_ID,
    OutputNotFoundError,
    check_output,
    output_filesystem,
    packed_rows,
    panoptic_map,
    read_segments_by_image,
)

log = logging.getLogger(__name__)

PANOPTIC_FOLDER = "panoptic"
PANOPTIC_JSON = "panoptic.json"
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
    basename = posixpath.basename(image_id.rsplit("#", 1)[-1].rstrip("/"))
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
    """One packed image (see :func:`pipeline.outputs.packed_rows`) -> (PNG pixels, ``images`` entry, annotation).

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
    fs, root = output_filesystem(dest)
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


class Export(NamedTuple):
    document: dict[str, Any]  # the panoptic.json written
    left_out: int  # segments of a category outside the 133 (VOID in the PNGs)


def export_coco(output: str, dest: str) -> Export:
    """Write ``dest/panoptic/*.png`` and ``dest/panoptic.json`` for every ok image of ``output``.

    Returns the JSON document that was written (entries sorted by ``image_id`` of the output). Raises
    :class:`~pipeline.outputs.OutputNotFoundError` (nothing written) when ``output`` holds no output.
    """
    check_output(output)
    fs, root = output_filesystem(dest)
    fs.makedirs(f"{root}/{PANOPTIC_FOLDER}", exist_ok=True)
    entries = read_segments_by_image(output).map_batches(
        write_coco_pngs, batch_format="pyarrow", fn_kwargs={"dest": dest}
    )
    rows = sorted(entries.take_all(), key=lambda r: r["image_id"])
    images = [json.loads(r["image"]) for r in rows]
    annotations = [json.loads(r["annotation"]) for r in rows]
    for key, values in (("id", [i["id"] for i in images]), ("file_name", [a["file_name"] for a in annotations])):
        if len(set(values)) != len(values):
            raise ValueError(f"two exported images share a {key}; rename one of the inputs")
    document = {"images": images, "annotations": annotations, "categories": coco_categories()}
    with fs.open(f"{root}/{PANOPTIC_JSON}", "w") as f:
        json.dump(document, f)
    return Export(document, sum(r["left_out"] for r in rows))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="panoptic-flow export-coco",
        description="Write COCO panoptic PNGs (DEST/panoptic/) and DEST/panoptic.json from an output.",
    )
    p.add_argument("output", help="output folder or URI")
    p.add_argument("dest", help="destination folder or URI")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    try:
        document, left_out = export_coco(args.output, args.dest)
    except OutputNotFoundError as exc:
        print(f"panoptic-flow export-coco: {exc}", file=sys.stderr)
        return 2
    segments = sum(len(a["segments_info"]) for a in document["annotations"])
    print(f"wrote {len(document['images'])} images, {segments} segments to {args.dest}")
    if left_out:
        print(f"left out {left_out} segments of class slots outside the 133 COCO panoptic categories (VOID pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
