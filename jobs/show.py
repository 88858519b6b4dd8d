"""`panoptic-flow show OUTPUT IMAGE_ID`: draw one result (or a contact sheet of several) as a PNG.

The original image is read again from its input: a plain file / object (``image_id`` itself, any fsspec
URI), a tar member (``image_id = <source>#<member>`` with ``source`` ending in ``.tar``, ``.tar.gz``,
``.tgz``, ``.tar.bz2`` or ``.tar.xz``) or a Parquet row (``image_id = <source>#row=<N>``, or the value of
the run's ``id_column``, with ``source`` ending in ``.parquet``; the bytes column is the run's
``bytes_column``, default ``image``, holding binary or a ``{"bytes": ...}`` struct; both are read from
``config.input`` in ``OUTPUT/_run.json``). EXIF orientation is applied and the image
converted to RGB, as the pipeline's decoder is expected to do, so masks and pixels line up.

Drawing (:func:`render_overlay`) is pure numpy + PIL: each segment is filled with its colour blended at
``alpha`` (the category's COCO colour; things get a per-instance jitter seeded by (category, segment id)
so neighbouring instances differ and colours are stable between runs), then outlined, then labelled
``"<category> <score>"`` (things at their box's top-left corner, stuff at their mask's centroid).

``--grid N --where "SQL predicate"`` draws the first N images (by ``image_id``) of the ``image_categories``
view (see ``jobs/query.py``) matching the predicate, e.g. ``--where "categories['dog'] > 0"``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import posixpath
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from jobs.query import connect
from model.categories import category_by_id
from pipeline.outputs import OutputNotFoundError, check_output, decode_mask, read_image_rows, read_run_config

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_JITTER = 48  # max per-channel offset of a thing instance's colour from its category colour


@dataclass(frozen=True)
class OverlaySegment:
    """One segment to draw."""

    segment_id: int
    category_id: int
    category: str
    isthing: bool
    score: float
    bbox: tuple[int, int, int, int]  # [x, y, w, h] pixels
    mask: np.ndarray  # [H, W] bool

    @property
    def label(self) -> str:
        return f"{self.category} {self.score:.2f}"


def segment_color(category_id: int, segment_id: int, *, isthing: bool) -> tuple[int, int, int]:
    """RGB fill colour: the category's COCO colour, jittered per instance for things (deterministic)."""
    category = category_by_id(category_id)
    if category is not None:
        base = np.array(category.color, dtype=np.int64)
    else:  # unknown category: a stable colour of its own
        base = np.random.default_rng([category_id, 7]).integers(0, 256, size=3)
    if isthing:
        base = base + np.random.default_rng([category_id, segment_id]).integers(-_JITTER, _JITTER + 1, size=3)
    r, g, b = (int(v) for v in np.clip(base, 0, 255))
    return r, g, b


def blend(pixels: np.ndarray, color: Sequence[int], alpha: float) -> np.ndarray:
    """``round((1 - alpha) * pixels + alpha * color)`` as uint8; ``pixels`` is ``[..., 3]``."""
    mixed = (1.0 - alpha) * pixels.astype(np.float64) + alpha * np.asarray(color, dtype=np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)  # [H+2, W+2]
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]  # [H, W]
    return mask & ~interior


def _font(height: int, width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(10, min(height, width) // 40))


def render_overlay(
    image: np.ndarray,
    segments: Sequence[OverlaySegment],
    *,
    alpha: float = 0.5,
    outlines: bool = True,
    labels: bool = True,
) -> np.ndarray:
    """Draw ``segments`` over ``image`` (``[H, W, 3]`` uint8 RGB); returns a new ``[H, W, 3]`` uint8 array.

    Inside a segment's mask, without outlines or labels, the pixel is exactly
    ``blend(image, segment_color(...), alpha)``; pixels outside every mask are unchanged.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = image.copy()  # [H, W, 3]
    colors = [segment_color(s.category_id, s.segment_id, isthing=s.isthing) for s in segments]
    for segment, color in zip(segments, colors):
        if segment.mask.shape != image.shape[:2]:
            raise ValueError(
                f"segment {segment.segment_id}: mask is {list(segment.mask.shape)} but image is "
                f"{list(image.shape[:2])} (h, w)"
            )
        out[segment.mask] = blend(image[segment.mask], color, alpha)  # [N, 3]
    if outlines:
        for segment, color in zip(segments, colors):
            out[mask_outline(segment.mask)] = tuple(int(c * 0.6) for c in color)
    if labels and segments:
        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        font = _font(*image.shape[:2])
        for segment, color in zip(segments, colors):
            _draw_label(draw, segment, color, font, image.shape[1], image.shape[0])
        out = np.asarray(canvas).copy()
    return out


def _draw_label(
    draw: ImageDraw.ImageDraw,
    segment: OverlaySegment,
    color: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
    height: int,
) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), segment.label, font=font)
    tw, th = right - left + 4, bottom - top + 4
    if segment.isthing:
        x, y = segment.bbox[0], segment.bbox[1]
    else:
        ys, xs = np.nonzero(segment.mask)
        x, y = (int(xs.mean()) - tw // 2, int(ys.mean()) - th // 2) if xs.size else segment.bbox[:2]
    x, y = min(max(x, 0), max(width - tw, 0)), min(max(y, 0), max(height - th, 0))
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text((x + 2 - left, y + 2 - top), segment.label, fill="black" if luminance > 140 else "white", font=font)


# --- IO -----------------------------------------------------------------------------------------------


def read_image_bytes(image_id: str, source: str, *, bytes_column: str = "image", id_column: str | None = None) -> bytes:
    """The encoded bytes of an input image: the object itself, a tar member or a Parquet row's bytes.

    ``source`` is the object the image was read from (the ``source`` column); a Parquet source whose
    image ids came from an id column (``id_column``) is searched for the row with that id.
    """
    is_parquet = source.lower().endswith(".parquet")
    if image_id.startswith(source + "#"):
        member = image_id[len(source) + 1 :]
        if source.lower().endswith(_TAR_SUFFIXES):
            return _read_tar_member(source, member)
        if is_parquet and member.startswith("row=") and member[len("row=") :].isdigit():
            return _read_parquet_row(source, int(member[len("row=") :]), bytes_column)
    if is_parquet and image_id != source:
        if id_column is None:
            raise ValueError(f"cannot find {image_id!r} in {source}: not '#row=N' and the run has no id_column")
        return _read_parquet_id(source, image_id, id_column, bytes_column)
    if image_id != source and "#" in image_id:
        raise ValueError(
            f"cannot read {image_id!r} from {source!r}: only files, tar members (<x.tar>#member) and "
            "Parquet rows (<x.parquet>#row=N or an id column) are supported"
        )
    with fsspec.open(image_id, "rb") as f:
        return f.read()


def _image_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, dict):  # e.g. Hugging Face datasets' {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, bytes):
        raise ValueError(f"{where} holds no image bytes")
    return value


def _read_parquet_id(source: str, image_id: str, id_column: str, bytes_column: str) -> bytes:
    with fsspec.open(source, "rb") as f:
        table = pq.read_table(f, columns=[id_column, bytes_column], filters=[(id_column, "==", image_id)])
    if table.num_rows == 0:
        raise FileNotFoundError(f"no row with {id_column} == {image_id!r} in {source}")
    return _image_bytes(table.column(bytes_column)[0].as_py(), f"{source} column {bytes_column!r}")


def _strip_dot_slash(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _read_tar_member(source: str, member: str) -> bytes:
    wanted = _strip_dot_slash(member)
    with fsspec.open(source, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for info in tar:  # stops at the member instead of indexing the whole archive
            if info.isfile() and _strip_dot_slash(info.name) == wanted:
                data = tar.extractfile(info)
                assert data is not None
                return data.read()
    raise FileNotFoundError(f"member {member!r} not found in {source}")


def _read_parquet_row(source: str, row: int, column: str) -> bytes:
    with fsspec.open(source, "rb") as f:
        parquet = pq.ParquetFile(f)
        offset = row
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if offset < n:
                value = parquet.read_row_group(group, columns=[column]).column(0)[offset].as_py()
                break
            offset -= n
        else:
            raise IndexError(f"{source} has {parquet.metadata.num_rows} rows, no row {row}")
    return _image_bytes(value, f"{source} row {row} column {column!r}")


def load_image(data: bytes) -> np.ndarray:
    """Encoded image -> ``[H, W, 3]`` uint8 RGB after EXIF orientation."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB")).copy()


def render_image(output: str, image_id: str, *, alpha: float, outlines: bool, labels: bool) -> np.ndarray:
    """Read one image of ``output`` and its segments, and draw them (``[H, W, 3]`` uint8)."""
    check_output(output)
    image_row, rows = read_image_rows(output, image_id)
    if image_row is None and not rows:
        raise KeyError(f"image_id {image_id!r} is not in {output}")
    if image_row is not None and image_row["status"] != "ok":
        raise ValueError(f"image {image_id!r} failed in the run: {image_row['error']}")
    source = image_row["source"] if image_row is not None else rows[0]["source"]
    run = read_run_config(output)
    inputs = run.get("config", run).get("input", {})  # _run.json: {"config": {"input": {...}}, ...}
    data = read_image_bytes(
        image_id,
        source,
        bytes_column=inputs.get("bytes_column") or "image",
        id_column=inputs.get("id_column"),
    )
    image = load_image(data)
    segments = [
        OverlaySegment(
            segment_id=r["segment_id"],
            category_id=r["category_id"],
            category=r["category"],
            isthing=r["isthing"],
            score=r["score"],
            bbox=tuple(r["bbox"]),
            mask=decode_mask(r["rle"]),
        )
        for r in rows
    ]
    return render_overlay(image, segments, alpha=alpha, outlines=outlines, labels=labels)


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], *, tile: int = 256) -> np.ndarray:
    """Images scaled into ``tile``×``tile`` cells with a caption strip, ⌈√N⌉ per row: ``[H, W, 3]`` uint8."""
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    font = ImageFont.load_default(size=12)
    strip = 18
    sheet = Image.new("RGB", (columns * tile, rows * (tile + strip)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (array, caption) in enumerate(zip(images, captions)):
        thumb = Image.fromarray(array)
        thumb.thumbnail((tile, tile))
        x0, y0 = (i % columns) * tile, (i // columns) * (tile + strip)
        sheet.paste(thumb, (x0 + (tile - thumb.width) // 2, y0 + (tile - thumb.height) // 2))
        draw.text((x0 + 4, y0 + tile + 2), caption[-40:], fill=(230, 230, 230), font=font)
    return np.asarray(sheet).copy()


def grid_image_ids(output: str, *, n: int, where: str | None) -> list[str]:
    """The first ``n`` image ids (sorted) of ``image_categories`` satisfying the SQL predicate ``where``."""
    con = connect(output)
    try:
        sql = f"SELECT image_id FROM image_categories WHERE ({where or 'TRUE'}) ORDER BY image_id LIMIT {int(n)}"
        return [row[0] for row in con.execute(sql).fetchall()]
    finally:
        con.close()


def _write_png(array: np.ndarray, path: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with fsspec.open(path, "wb") as f:
        f.write(buffer.getvalue())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panoptic-flow show", description="Draw segments over their image as a PNG.")
    p.add_argument("output", help="output folder or URI")
    p.add_argument("image_id", nargs="?", help="image to draw (not with --grid)")
    p.add_argument("-o", "--out", default="show.png", help="PNG to write (default: show.png)")
    p.add_argument("--alpha", type=float, default=0.5, help="fill opacity in [0, 1] (default: 0.5)")
    p.add_argument("--no-labels", action="store_true", help="do not write category/score labels")
    p.add_argument("--no-outlines", action="store_true", help="do not outline segments")
    p.add_argument("--grid", type=int, metavar="N", help="contact sheet of N images chosen by --where")
    p.add_argument("--where", help="SQL predicate over the image_categories view (with --grid)")
    p.add_argument("--tile", type=int, default=256, help="cell size of --grid in pixels (default: 256)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.grid is None) == (args.image_id is None):
        parser.error("give either IMAGE_ID or --grid N")
    if args.where is not None and args.grid is None:
        parser.error("--where needs --grid")
    if args.grid is not None and args.grid < 1:
        parser.error(f"--grid must be >= 1, got {args.grid}")
    style: dict[str, Any] = {"alpha": args.alpha, "outlines": not args.no_outlines, "labels": not args.no_labels}
    try:
        check_output(args.output)
    except OutputNotFoundError as exc:
        print(f"panoptic-flow show: {exc}", file=sys.stderr)
        return 2
    if args.grid is None:
        image_id = args.image_id
        if "://" not in image_id and os.path.exists(image_id.split("#", 1)[0]):
            image_id = os.path.abspath(image_id)  # local inputs are recorded by absolute path
        try:
            picture = render_image(args.output, image_id, **style)
        except (KeyError, ValueError) as exc:  # unknown id, or an image that failed in the run
            print(f"panoptic-flow show: {exc.args[0]}", file=sys.stderr)
            return 2
    else:
        image_ids = grid_image_ids(args.output, n=args.grid, where=args.where)
        if not image_ids:
            print("panoptic-flow show: no image matches --where", file=sys.stderr)
            return 1
        tiles = [render_image(args.output, i, **style) for i in image_ids]
        picture = contact_sheet(tiles, [posixpath.basename(i) for i in image_ids], tile=args.tile)
    _write_png(picture, args.out)
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
