"""An output read back one row per image: each ok image with all its segments, packed (`PACKED_SCHEMA`).

The commands that look at whole images (``export-coco``, ``evaluate``) call :func:`map_images`: it maps a
``pa.Table -> pa.Table`` stage over batches of packed rows, reading an output of at most :data:`LOCAL_MAX_BYTES`
of Parquet in this process (:func:`read_packed_images`, pyarrow only, no Ray start-up), and a larger one with
:func:`read_segments_by_image`, a Ray Data pipeline (one task per Parquet file to `FLAT_SCHEMA` rows, then a hash
shuffle by ``image_id``) that scales with the output rather than with the driver's memory. Ray is imported only
on that path. :func:`packed_rows` unpacks a batch into per-image dicts whose segments
:func:`pipeline.segmenting.rle.panoptic_map` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.exactly_once.output_paths import Output
from pipeline.reading.output_tables import TABLE_SCHEMAS, open_table, pin, table_bytes, table_files
from pipeline.schema import FLAT_SCHEMA, IMAGES_TABLE, PACKED_SCHEMA, SEGMENTS_TABLE, STATUS_OK

if TYPE_CHECKING:
    import ray.data


LOCAL_MAX_BYTES = 16 << 20
"""Outputs with at most this many bytes of Parquet are read in one process by :func:`map_images` (no Ray):
~16 MiB is ~50 k segments, seconds of work, while starting Ray costs ~10-20 s."""


def map_images(
    output: Output | str,
    fn: Callable[..., pa.Table],
    *,
    image_ids: Sequence[str] | None = None,
    fn_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """The rows of ``fn`` (a ``pa.Table -> pa.Table`` stage) over batches of :data:`PACKED_SCHEMA` rows of
    ``output``'s ok images (only ``image_ids`` when given).

    An output of at most :data:`LOCAL_MAX_BYTES` is read and mapped in this process, without Ray; a larger
    one runs as a Ray Data ``map_batches`` over :func:`read_segments_by_image`, with Ray's and Ray Data's
    own messages hidden unless ``verbose``.
    """
    out = pin(output)  # one snapshot for both tables
    kwargs = dict(fn_kwargs or {})
    if table_bytes(out) <= LOCAL_MAX_BYTES:
        packed = read_packed_images(out, image_ids=image_ids)
        rows: list[dict[str, Any]] = []
        for start in range(0, packed.num_rows, batch_size):
            rows += fn(packed.slice(start, batch_size), **kwargs).to_pylist()
        return rows
    _init_ray_quietly(verbose=verbose)
    dataset = read_segments_by_image(out, image_ids=image_ids)
    return dataset.map_batches(fn, batch_format="pyarrow", batch_size=batch_size, fn_kwargs=kwargs).take_all()


def packed_rows(batch: pa.Table) -> list[dict[str, Any]]:
    """Unpack a batch of :data:`PACKED_SCHEMA` rows into per-image dicts with a ``segments`` list.

    Each segment dict has ``segment_id``, ``category_id``, ``score`` and ``rle`` (``{"size", "counts"}``),
    so it can be fed to :func:`pipeline.segmenting.rle.panoptic_map`.
    """
    images = []
    for row in batch.to_pylist():
        size = [row["height"], row["width"]]
        segments = [
            {"segment_id": s, "category_id": c, "score": p, "rle": {"size": size, "counts": r}}
            for s, c, p, r in zip(row["segment_id"], row["category_id"], row["score"], row["counts"])
        ]
        images.append(
            {
                "image_id": row["image_id"],
                "source": row["source"],
                "height": row["height"],
                "width": row["width"],
                "segments": segments,
            }
        )
    return images


def read_packed_images(output: Output | str, *, image_ids: Sequence[str] | None = None) -> pa.Table:
    """The rows of :func:`read_segments_by_image`, read in this process (pyarrow only), sorted by image_id."""
    out = pin(output)  # one snapshot for both tables
    images = open_table(out, IMAGES_TABLE).to_table(
        columns=["image_id", "source", "height", "width", "status"], filter=pc.field("status") == STATUS_OK
    )
    segments = open_table(out, SEGMENTS_TABLE).to_table(
        columns=["image_id", "segment_id", "category_id", "score", "rle"]
    )
    images = _keep_image_ids(images, image_ids=image_ids).sort_by("image_id")
    segments = _keep_image_ids(segments, image_ids=image_ids).sort_by(
        [("image_id", "ascending"), ("segment_id", "ascending")]
    )
    by_image: dict[str, list[dict[str, Any]]] = {}
    for row in segments.to_pylist():
        by_image.setdefault(row["image_id"], []).append(row)
    packed: dict[str, list[Any]] = {name: [] for name in PACKED_SCHEMA.names}
    for image in images.to_pylist():
        rows = by_image.get(image["image_id"], [])
        sizes = {(image["height"], image["width"]), *((r["rle"]["size"][0], r["rle"]["size"][1]) for r in rows)}
        if len(sizes) != 1:
            raise ValueError(f"image {image['image_id']!r}: image and mask sizes disagree: {sorted(sizes)}")
        for name in ("image_id", "source", "height", "width"):
            packed[name].append(image[name])
        for name in ("segment_id", "category_id", "score"):
            packed[name].append([r[name] for r in rows])
        packed["counts"].append([r["rle"]["counts"] for r in rows])
    return pa.table(packed, schema=PACKED_SCHEMA)


def read_segments_by_image(
    output: Output | str, *, image_ids: Sequence[str] | None = None, num_partitions: int | None = None
) -> ray.data.Dataset:
    """A Ray Dataset with one :data:`PACKED_SCHEMA` row per ``ok`` image of ``output``.

    Images without segments get a row with empty lists; ``image_ids`` keeps only those images. Each
    Parquet file is read by one task, then rows are grouped with ``groupby("image_id").map_groups`` (a
    hash shuffle into ``num_partitions`` partitions, default: one per file, at most 200), so this scales
    with the output rather than with the driver's memory.
    """
    import ray.data

    out = pin(output)  # one snapshot for both tables
    items = [{"table": t, "path": p} for t in (IMAGES_TABLE, SEGMENTS_TABLE) for p in table_files(out, t)[0]]
    if not items:
        return ray.data.from_arrow(PACKED_SCHEMA.empty_table())
    flat = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_flat,
        batch_format="pyarrow",
        batch_size=1,
        fn_kwargs={"out": out, "image_ids": None if image_ids is None else list(image_ids)},
    )
    partitions = num_partitions or min(len(items), 200)
    return flat.groupby("image_id", num_partitions=partitions).map_groups(_pack_image, batch_format="pyarrow")


def _read_flat(batch: pa.Table, *, out: Output, image_ids: Sequence[str] | None) -> pa.Table:
    """Ray stage: rows ``{table, path}`` naming Parquet files of ``out`` -> their flat rows (:data:`FLAT_SCHEMA`)."""
    fs = out.fs
    parts = [FLAT_SCHEMA.empty_table()]
    for table, path in zip(batch["table"].to_pylist(), batch["path"].to_pylist()):
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f, schema=TABLE_SCHEMAS[table])
        to_flat = _images_to_flat if table == IMAGES_TABLE else _segments_to_flat
        parts.append(to_flat(rows, image_ids=image_ids))
    return pa.concat_tables(parts)


def _images_to_flat(batch: pa.Table, *, image_ids: Sequence[str] | None) -> pa.Table:
    batch = _keep_image_ids(batch, image_ids=image_ids)
    batch = batch.filter(pc.equal(batch["status"], STATUS_OK))
    n = batch.num_rows
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source": batch["source"],
            "height": batch["height"],
            "width": batch["width"],
            "segment_id": pa.array(np.full(n, -1, np.int32)),
            "category_id": pa.array(np.full(n, -1, np.int32)),
            "score": pa.array(np.zeros(n, np.float32)),
            "counts": pa.array([""] * n, pa.string()),
        },
        schema=FLAT_SCHEMA,
    )


def _segments_to_flat(batch: pa.Table, *, image_ids: Sequence[str] | None) -> pa.Table:
    batch = _keep_image_ids(batch, image_ids=image_ids)
    rle = batch["rle"].combine_chunks()
    size = rle.field("size")
    return pa.table(
        {
            "image_id": batch["image_id"],
            "source": batch["source"],
            "height": pc.list_element(size, 0),
            "width": pc.list_element(size, 1),
            "segment_id": batch["segment_id"],
            "category_id": batch["category_id"],
            "score": batch["score"],
            "counts": rle.field("counts"),
        },
        schema=FLAT_SCHEMA,
    )


def _pack_image(group: pa.Table) -> pa.Table:
    """All flat rows of one image -> one packed row (placeholder dropped), or none without an ok image row."""
    rows = group.sort_by("segment_id").to_pydict()
    if rows["segment_id"][0] != -1:  # no ok row in `images`: not an image of this output
        return PACKED_SCHEMA.empty_table()
    real = [i for i, s in enumerate(rows["segment_id"]) if s >= 0]
    sizes = {(rows["height"][i], rows["width"][i]) for i in range(group.num_rows)}
    if len(sizes) != 1:
        raise ValueError(f"image {rows['image_id'][0]!r}: image and mask sizes disagree: {sorted(sizes)}")
    ((height, width),) = sizes
    return pa.table(
        {
            "image_id": [rows["image_id"][0]],
            "source": [rows["source"][0]],
            "height": [height],
            "width": [width],
            "segment_id": [[rows["segment_id"][i] for i in real]],
            "category_id": [[rows["category_id"][i] for i in real]],
            "score": [[rows["score"][i] for i in real]],
            "counts": [[rows["counts"][i] for i in real]],
        },
        schema=PACKED_SCHEMA,
    )


def _keep_image_ids(batch: pa.Table, *, image_ids: Sequence[str] | None) -> pa.Table:
    if image_ids is None:
        return batch
    return batch.filter(pc.is_in(batch["image_id"], value_set=pa.array(image_ids, pa.string())))


def _init_ray_quietly(*, verbose: bool) -> None:
    """Join RAY_ADDRESS's cluster or start a local Ray, saying nothing of it unless ``verbose``."""
    import logging

    import ray
    import ray.data

    level = logging.INFO if verbose else logging.ERROR
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=level, log_to_driver=verbose, configure_logging=True)
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = verbose
    context.enable_progress_bars = verbose
    logging.getLogger("ray.data").setLevel(level)
    logging.getLogger("ray").setLevel(level)
