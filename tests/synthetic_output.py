"""A small synthetic output folder (real Parquet, real image files) for the tests of the result readers.

:func:`make_images` draws four images with known masks (plus one failed image); :func:`write_output`
writes them as ``OUTPUT/segments`` / ``OUTPUT/images`` with the declared schema, split over nested
folders and next to files that readers must skip (``_``/``.`` names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.schema import IMAGES_SCHEMA, SEGMENTS_SCHEMA

# COCO panoptic ids and names
PERSON, DOG, CAT = (1, "person"), (18, "dog"), (17, "cat")
SKY, GRASS = (187, "sky-other-merged"), (193, "grass-merged")
THINGS = {PERSON[0], DOG[0], CAT[0]}


@dataclass
class SynthSegment:
    category_id: int
    category: str
    score: float
    mask: np.ndarray  # [H, W] bool

    @property
    def isthing(self) -> bool:
        return self.category_id in THINGS

    @property
    def bbox(self) -> list[int]:
        ys, xs = np.nonzero(self.mask)
        return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@dataclass
class SynthImage:
    image_id: str
    source: str
    height: int
    width: int
    segments: list[SynthSegment] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    pixels: np.ndarray | None = None  # [H, W, 3] uint8 as written to disk
    member: str | None = None  # the images row's ``member``: a tar member or Parquet ``row=N``; None for a file


def rect(height: int, width: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """``[height, width]`` bool mask, True on rows ``y0:y1`` and columns ``x0:x1``."""
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def encode_rle(mask: np.ndarray) -> dict[str, object]:
    """Bool mask -> the output's ``rle`` struct."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def make_images(folder: Path) -> list[SynthImage]:
    """Write the input images (PNG, lossless) under ``folder`` and describe their segments.

    - ``dog.png`` 30×40: a dog of 300 px (25 % of the frame), a person, sky.
    - ``small_dog.png`` 40×50: a dog of 25 px (1.25 %), grass.
    - ``cats.png`` 24×32: two touching cats and a person.
    - ``empty.png`` 20×20: no segment.
    - ``broken.png``: failed to decode (status ``error``, no file).
    """
    folder.mkdir(parents=True, exist_ok=True)
    images = [
        SynthImage(
            "dog.png",
            "dog.png",
            30,
            40,
            [
                SynthSegment(*DOG, 0.97, rect(30, 40, 10, 5, 25, 25)),
                SynthSegment(*PERSON, 0.81, rect(30, 40, 12, 30, 16, 34)),
                SynthSegment(*SKY, 0.9, rect(30, 40, 0, 0, 8, 40)),
            ],
        ),
        SynthImage(
            "small_dog.png",
            "small_dog.png",
            40,
            50,
            [
                SynthSegment(*GRASS, 0.88, rect(40, 50, 30, 0, 40, 50)),
                SynthSegment(*DOG, 0.7, rect(40, 50, 5, 5, 10, 10)),
            ],
        ),
        SynthImage(
            "cats.png",
            "cats.png",
            24,
            32,
            [
                SynthSegment(*CAT, 0.95, rect(24, 32, 4, 2, 20, 12)),
                SynthSegment(*CAT, 0.92, rect(24, 32, 4, 12, 20, 22)),
                SynthSegment(*PERSON, 0.6, rect(24, 32, 2, 24, 22, 30)),
            ],
        ),
        SynthImage("empty.png", "empty.png", 20, 20),
    ]
    for i, image in enumerate(images):
        path = folder / image.image_id
        image.image_id = image.source = str(path)
        image.pixels = _pixels(image.height, image.width, seed=i)
        Image.fromarray(image.pixels).save(path)
    images.append(
        SynthImage(
            str(folder / "broken.png"),
            str(folder / "broken.png"),
            0,
            0,
            status="error",
            error="cannot identify image file",
        )
    )
    return images


def segment_rows(images: list[SynthImage]) -> list[dict[str, object]]:
    """The ``segments`` rows of ``images`` (segment ids 0..K-1 per image, in list order)."""
    rows = []
    for image in images:
        for k, s in enumerate(image.segments):
            rows.append(
                {
                    "image_id": image.image_id,
                    "source": image.source,
                    "segment_id": k,
                    "category_id": s.category_id,
                    "category": s.category,
                    "isthing": s.isthing,
                    "score": s.score,
                    "area": int(s.mask.sum()),
                    "bbox": s.bbox,
                    "rle": encode_rle(s.mask),
                }
            )
    return rows


def image_rows(images: list[SynthImage]) -> list[dict[str, object]]:
    """The ``images`` rows of ``images``."""
    return [
        {
            "image_id": i.image_id,
            "source": i.source,
            "member": i.member,
            "width": i.width if i.status == "ok" else None,
            "height": i.height if i.status == "ok" else None,
            "status": i.status,
            "error": i.error,
            "retryable": False,
            "num_segments": len(i.segments),
            "run_id": "synthetic",
        }
        for i in images
    ]


def write_output(
    output: Path,
    images: list[SynthImage],
    *,
    run_config: dict[str, object] | None = None,
    weights: str | None = None,
) -> None:
    """Write ``output/{segments,images}`` in two nested shards each, plus files readers must ignore; the run
    record names ``weights`` (``weights.uri``) when given, e.g. ``"synthetic"`` for the demo weights."""
    for table, rows, schema in (
        ("segments", segment_rows(images), SEGMENTS_SCHEMA),
        ("images", image_rows(images), IMAGES_SCHEMA),
    ):
        half = len(rows) // 2
        for shard, part in enumerate((rows[:half], rows[half:])):
            folder = output / table / f"shard={shard}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(part, schema=schema), folder / "part-0.parquet")
        # not data: a reader that opens these fails
        (output / table / "_tmp-0.parquet").write_bytes(b"not parquet")
        (output / table / "shard=0" / ".part-1.parquet.crc").write_bytes(b"not parquet")
        (output / table / ".staging.parquet").write_bytes(b"not parquet")
    (output / "_runs").mkdir(exist_ok=True)
    record: dict[str, object] = {"run_id": "synthetic", "config": run_config or {"input": {"uris": ["synthetic"]}}}
    if weights is not None:
        record["weights"] = {"uri": weights, "sha256": ""}
    (output / "_runs" / "synthetic.json").write_text(json.dumps(record))
    (output / "_SUCCESS").write_text("")
