"""`panoptic-flow show OUTPUT IMAGE_ID`: draw one result (or a contact sheet of several) as a PNG.

IMAGE_ID is taken exactly as stored (``query OUT "select image_id from images limit 5"`` lists some); a
local path that is not stored as given is also tried as its absolute path. The original image is read
again from the images row's ``source`` and ``member`` (never by parsing the id as a path), by the pipeline's
own reader of its kind (:func:`pipeline.inputs.readers.read_image`): a plain file / object (``source`` itself, any
fsspec URI), a member of a ``.tar`` shard, or a Parquet row (``row=<N>``, or the row whose ``id_column`` holds
the id; the bytes column is the run's ``bytes_column``, default ``image``, holding binary or a
``{"bytes": ...}`` struct; both, and ``max_bytes``, are read from ``config.input``, and ``read_timeout_s``
from ``config.failures``, in the latest ``OUTPUT/_runs/<run_id>.json``). The bytes are decoded by the
pipeline's own decoder (:func:`pipeline.inputs.decode.decode_oriented`: same header checks, EXIF orientation and RGB
conversion), so an image the pipeline segmented is drawn in the frame of its masks.

The segments are drawn over it by :mod:`jobs.overlay` (pure numpy + PIL: filled, outlined, labelled where a
label fits on its segment); labels without room are listed.

``--grid N --where "SQL predicate"`` draws the first N images (by ``image_id``) of the ``image_categories``
view (see :mod:`pipeline.reading.duckdb_views`) matching the predicate, e.g. ``--where "categories['dog'] > 0"``,
on a sheet sized to its images.

A picture of an output made (wholly or partly) with the demo weights carries the banner
:data:`jobs.overlay.DEMO_BANNER`, and ``show`` prints one warning line.
"""

from __future__ import annotations

import argparse
import io
import os
import posixpath
import sys
from typing import Any

import duckdb
import fsspec
import numpy as np
from PIL import Image

from jobs.overlay import DEFAULT_ALPHA, Overlay, OverlaySegment, contact_sheet, draw_overlay, mark_demo
from jobs.snapshot_options import SNAPSHOT_ERRORS, add_snapshot_options, open_output
from jobs.usage import CommandParser, UsageError, run_command, warn_if_demo_weights
from pipeline.config import InputConfig
from pipeline.exactly_once.output_paths import Output
from pipeline.exactly_once.run_records import latest_run_record
from pipeline.inputs.ids import SEPARATOR, file_id, member_id, member_of_old_row
from pipeline.inputs.readers import kind_of, read_image
from pipeline.inputs.storage import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT_S
from pipeline.reading.duckdb_views import connect
from pipeline.reading.output_tables import check_output, read_image_rows
from pipeline.segmenting.rle import decode_mask

PROG = "panoptic-flow show"
LIST_IDS_HINT = 'list some with: panoptic-flow query OUTPUT "select image_id from images limit 5"'


def read_image_bytes(
    image_id: str,
    source: str,
    *,
    member: str | None = None,
    bytes_column: str = "image",
    id_column: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    input_format: str = "auto",
) -> bytes:
    """The encoded bytes of an input image: the object itself, a ``.tar`` member or a Parquet row's bytes, read
    by the pipeline's own reader of that kind (`pipeline.inputs.readers.read_image`).

    ``source`` and ``member`` are the images row's columns (``member`` None for a whole file); a row written
    before the ``member`` column existed has its member taken from the id (`pipeline.inputs.ids.member_of_old_row`).
    A Parquet member that is not ``row=N`` is the value of the run's ``id_column``. A shard's kind is the one the
    run's ``--input-format`` forced, else its extension's (`pipeline.inputs.readers.kind_of`).
    """
    if member is None and image_id not in (source, file_id(source)):
        member = member_of_old_row(image_id, source)
    kind = "file" if member is None else kind_of(source, input_format)
    if kind is None or (kind == "file" and member is not None):
        raise ValueError(
            f"cannot read {image_id!r} from {source!r}: only files, .tar members and Parquet rows are supported"
        )
    return read_image(
        source,
        kind,
        member,
        bytes_column=bytes_column,
        id_column=id_column,
        max_bytes=max_bytes,
        read_timeout_s=read_timeout_s,
    )


def load_image(data: bytes, *, max_pixels: int = InputConfig.max_pixels) -> np.ndarray:
    """Encoded image -> ``[H, W, 3]`` uint8 RGB after EXIF orientation, decoded as the pipeline decodes it.

    Raises ValueError (with the pipeline's reason) for bytes the pipeline would have made an error row.
    """
    from pipeline.inputs.decode import decode_oriented  # imports torch (via model.preprocess): not for --help

    return decode_oriented(data, max_pixels=max_pixels)


def stored_id_candidates(given: str) -> list[str]:
    """The ids ``given`` may be stored as: itself first (exactly), then, for a local path, the id of its absolute
    path (a whole file: `pipeline.inputs.ids.file_id`; ``shard.tar#member``: only the shard part made absolute)."""
    candidates = [given]
    if "://" not in given:
        path, separator, member = given.partition(SEPARATOR)
        if separator and os.path.exists(path):
            candidates.append(member_id(os.path.abspath(path), member))
        if os.path.exists(given):
            candidates.append(file_id(os.path.abspath(given)))
    return list(dict.fromkeys(candidates))


def render_image(output: Output | str, image_id: str, *, alpha: float, outlines: bool, labels: bool) -> Overlay:
    """Read one image of ``output`` (resolved once by the caller, or a URI) and its segments, and draw them."""
    out = check_output(output)
    for candidate in stored_id_candidates(image_id):
        image_row, rows = read_image_rows(out, candidate)
        if image_row is not None or rows:
            image_id = candidate
            break
    else:
        raise UsageError(f"image_id {image_id!r} is not in {out.uri}", hint=LIST_IDS_HINT.replace("OUTPUT", out.uri))
    if image_row is not None and image_row["status"] != "ok":
        raise ValueError(f"image {image_id!r} failed in the run: {image_row['error']}")
    source = image_row["source"] if image_row is not None else rows[0]["source"]
    run = latest_run_record(out)
    inputs = run.get("config", run).get("input", {})  # a run record: {"config": {"input": {...}}, ...}
    failures = run.get("config", run).get("failures") or {}
    data = read_image_bytes(
        image_id,
        source,
        member=image_row.get("member") if image_row is not None else None,
        bytes_column=inputs.get("bytes_column") or "image",
        id_column=inputs.get("id_column"),
        max_bytes=inputs.get("max_bytes") or DEFAULT_MAX_BYTES,
        read_timeout_s=failures.get("read_timeout_s") or DEFAULT_READ_TIMEOUT_S,
        input_format=inputs.get("format") or "auto",
    )
    image = load_image(data, max_pixels=inputs.get("max_pixels") or InputConfig.max_pixels)
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
    return draw_overlay(image, segments, alpha=alpha, outlines=outlines, labels=labels)


def grid_image_ids(output: Output | str, *, n: int, where: str | None) -> list[str]:
    """The first ``n`` image ids (sorted) of ``image_categories`` satisfying the SQL predicate ``where``."""
    con = connect(output)
    try:
        sql = f"SELECT image_id FROM image_categories WHERE ({where or 'TRUE'}) ORDER BY image_id LIMIT {int(n)}"
        try:
            return [row[0] for row in con.execute(sql).fetchall()]
        except (duckdb.ProgrammingError, duckdb.DataError) as exc:  # the predicate's own mistake
            reason = str(exc).split("\n\n", 1)[0]
            raise UsageError(reason, flag="--where", hint="a predicate over the image_categories view") from None
    finally:
        con.close()


def _write_png(array: np.ndarray, path: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with fsspec.open(path, "wb") as f:
        f.write(buffer.getvalue())


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description="Draw segments over their image as a PNG.")
    p.add_argument("output", help="output folder or URI")
    add_snapshot_options(p)
    p.add_argument("image_id", nargs="?", help="image to draw (not with --grid)")
    p.add_argument("-o", "--out", default="show.png", help="PNG to write (default: show.png)")
    p.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help=f"fill opacity in [0, 1] (default: {DEFAULT_ALPHA})"
    )
    p.add_argument("--no-labels", action="store_true", help="do not write category/score labels")
    p.add_argument("--no-outlines", action="store_true", help="do not outline segments")
    p.add_argument("--grid", type=int, metavar="N", help="contact sheet of N images chosen by --where")
    p.add_argument("--where", help="SQL predicate over the image_categories view (with --grid)")
    p.add_argument("--tile", type=int, default=256, help="cell size of --grid in pixels (default: 256)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit code 0 done, 2 a user's mistake (`jobs.usage`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.grid is None) == (args.image_id is None):
        parser.error("give either IMAGE_ID or --grid N")
    if args.where is not None and args.grid is None:
        parser.error("--where: needs --grid")
    if args.grid is not None and args.grid < 1:
        parser.error(f"--grid: must be >= 1, got {args.grid}")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha: must lie in [0, 1], got {args.alpha}")
    if args.tile < 1:
        parser.error(f"--tile: must be >= 1, got {args.tile}")
    style: dict[str, Any] = {"alpha": args.alpha, "outlines": not args.no_outlines, "labels": not args.no_labels}

    def body() -> int:
        out = open_output(args)  # resolved once, for every reader below
        demo = warn_if_demo_weights(PROG, out)
        if args.grid is None:
            try:
                overlay = render_image(out, args.image_id, **style)
            except (KeyError, ValueError) as exc:  # an image that failed in the run, unreadable bytes
                raise UsageError(str(exc.args[0])) from exc
            picture = overlay.pixels
            if overlay.unplaced:
                shown = ", ".join(overlay.unplaced[:12]) + (", ..." if len(overlay.unplaced) > 12 else "")
                drawn = len(overlay.labels)
                print(f"{drawn} labels drawn; {len(overlay.unplaced)} without room on their segment: {shown}")
        else:
            image_ids = grid_image_ids(out, n=args.grid, where=args.where)
            if not image_ids:
                raise UsageError("no image matches", flag="--where", hint=LIST_IDS_HINT.replace("OUTPUT", args.output))
            tiles = [render_image(out, i, **style).pixels for i in image_ids]
            picture = contact_sheet(tiles, [posixpath.basename(i) for i in image_ids], tile=args.tile)
        if demo:
            picture = mark_demo(picture)
        _write_png(picture, args.out)
        print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]})")
        return 0

    return run_command(PROG, body, user_errors=SNAPSHOT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
