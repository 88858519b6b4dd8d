"""`panoptic-flow export-coco OUTPUT DEST`: an output as COCO panoptic annotations (panopticapi format).

Writes ``DEST/panoptic/<name>.png`` and ``DEST/panoptic.json`` with ``images``, ``annotations`` and
``categories`` (the 133 COCO panoptic categories), as :mod:`pipeline.reading.coco` converts them. Only ``ok``
images are exported. Segments of a class slot outside the 133 categories are left out (VOID pixels) and
their number is reported. `evaluate` scores an output exactly as the official tools score its export.
A collision of two images' names or ids raises an error.

The PNGs are written by :func:`pipeline.reading.packed_images.map_images` (in this process for a small output, else a
Ray Data ``map_batches`` over :func:`pipeline.reading.packed_images.read_segments_by_image`); the driver only gathers
the (small) JSON entries.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NamedTuple

from jobs.snapshot_options import SNAPSHOT_ERRORS, add_snapshot_options, open_output
from jobs.usage import CommandParser, run_command, warn_if_demo_weights
from pipeline.exactly_once.output_paths import Output, locate
from pipeline.reading.coco import (
    PANOPTIC_FOLDER,
    coco_categories,
    coco_image,
    coco_names,
    id_map_to_rgb,
    rgb_to_id_map,
    to_coco_ids,
    write_coco_pngs,
)
from pipeline.reading.output_tables import check_output
from pipeline.reading.packed_images import map_images

PROG = "panoptic-flow export-coco"

PANOPTIC_JSON = "panoptic.json"

__all__ = ["coco_image", "coco_names", "export_coco", "id_map_to_rgb", "main", "rgb_to_id_map", "to_coco_ids"]


class Export(NamedTuple):
    document: dict[str, Any]  # the panoptic.json written
    left_out: int  # segments of a category outside the 133 (VOID in the PNGs)


def export_coco(output: Output | str, dest: str, *, verbose: bool = False) -> Export:
    """Write ``dest/panoptic/*.png`` and ``dest/panoptic.json`` for every ok image of ``output`` (a small
    output in this process, a larger one on Ray: :func:`pipeline.reading.packed_images.map_images`; Ray's own messages
    only when ``verbose``).

    Returns the JSON document that was written (entries sorted by ``image_id`` of the output). Raises
    :class:`~pipeline.reading.output_tables.OutputNotFoundError` (nothing written) when ``output`` holds no output.
    """
    out = check_output(output)
    fs, root = locate(dest)
    fs.makedirs(f"{root}/{PANOPTIC_FOLDER}", exist_ok=True)
    entries = map_images(out, write_coco_pngs, fn_kwargs={"dest": dest}, verbose=verbose)
    rows = sorted(entries, key=lambda r: r["image_id"])
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
    p = CommandParser(
        prog=PROG,
        description="Write COCO panoptic PNGs (DEST/panoptic/) and DEST/panoptic.json from an output.",
    )
    p.add_argument("output", help="output folder or URI")
    add_snapshot_options(p)
    p.add_argument("dest", help="destination folder or URI")
    p.add_argument("--verbose", action="store_true", help="show Ray's own messages when a large output uses Ray")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit code 0 done, 2 a user's mistake (`jobs.usage`)."""
    args = _parser().parse_args(argv)

    def body() -> int:
        out = open_output(args)  # resolved once, for every reader below
        warn_if_demo_weights(PROG, out)
        document, left_out = export_coco(out, args.dest, verbose=args.verbose)
        segments = sum(len(a["segments_info"]) for a in document["annotations"])
        print(f"wrote {len(document['images'])} images, {segments} segments to {args.dest}")
        if left_out:
            print(f"left out {left_out} segments of class slots outside the 133 COCO panoptic categories (VOID pixels)")
        return 0

    return run_command(PROG, body, user_errors=SNAPSHOT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
