"""`panoptic-flow evaluate OUTPUT --gt-json GT.json --gt-folder GT_PNG_DIR`: PQ / SQ / RQ against COCO panoptic.

The metric is :mod:`pipeline.reading.panoptic_quality` (panopticapi's ``pq_compute`` rules). Predictions are the
output's id maps exactly as ``export-coco`` would write them (segment ``k`` -> COCO id ``k + 1``, uncovered pixels
VOID, segments covering no pixel dropped, segments of a category that is not in the ground truth's
``categories`` left out as VOID), so ``evaluate OUTPUT`` equals panopticapi's ``pq_compute`` (and hotcoco's)
on the ground truth and ``export-coco OUTPUT``'s files (checked against hotcoco in the tests). Ground-truth
segments of a category missing from ``categories`` are treated as panopticapi treats them: they are not
VOID (a prediction over one is a false positive) and their class is in no average.

Matching ground truth to predictions (``--match``): a GT image (``images[].file_name`` of the
annotation's ``image_id``, else the annotation's own ``file_name``) matches the output image whose
``image_id`` has the same

- ``stem`` (default): file name without extension: ``000000000139.jpg`` ~ ``s3://b/val/000000000139.jpg``
  ~ ``s3://b/shard-0001.tar#000000000139.jpg`` (for ``uri#member`` ids the member is used);
- ``basename``: file name with extension;
- ``uri``: the GT ``images[].image_uri`` equals the ``image_id`` exactly (``export-coco`` writes that
  field, so one run exported as COCO can serve as ground truth for another run over the same inputs).

Two GT images or two ``ok`` output images with the same key are an error. A GT image without an ``ok``
prediction is an error, as in panopticapi, unless ``--allow-missing`` (then all its non-crowd segments
count as false negatives). Output images that match no GT image are ignored.

Per-image statistics run through :func:`pipeline.reading.packed_images.map_images` (restricted to the matched images: in
this process for a small output, else a Ray Data ``map_batches``); the driver sums them per category.
The report lists the classes present on either side (ground truth or prediction) and the overall figures;
a group without classes (e.g. no Stuff) prints "–" and has null figures in the report.

Unit: the report and the Parquet table hold fractions in [0, 1] (what panopticapi's ``pq_compute``
returns); the printed table is ×100, like panopticapi's.
"""

from __future__ import annotations

import argparse
import io
import json
import posixpath
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from jobs.snapshot_options import SNAPSHOT_ERRORS, add_snapshot_options, open_output
from jobs.usage import CommandParser, UsageError, run_command, warn_if_demo_weights
from pipeline.exactly_once.output_paths import Output, locate
from pipeline.inputs.ids import last_part
from pipeline.reading.coco import rgb_to_id_map, to_coco_ids
from pipeline.reading.output_tables import check_output, open_table
from pipeline.reading.packed_images import map_images, packed_rows
from pipeline.reading.panoptic_quality import (
    ClassStats,
    Segment,
    add_stats,
    image_stats,
    pq_average,
    segments_from_coco,
)
from pipeline.schema import IMAGES_TABLE, STATUS_OK
from pipeline.segmenting.rle import panoptic_map

MatchRule = Literal["stem", "basename", "uri"]

PROG = "panoptic-flow evaluate"

_STATS_SCHEMA = pa.schema(
    [("category_id", pa.int32()), ("iou", pa.float64()), ("tp", pa.int64()), ("fp", pa.int64()), ("fn", pa.int64())]
)

PER_CLASS_SCHEMA = pa.schema(
    [
        pa.field("category_id", pa.int32()),
        pa.field("category", pa.string()),
        pa.field("isthing", pa.bool_()),
        pa.field("pq", pa.float64()),  # fraction in [0, 1]
        pa.field("sq", pa.float64()),
        pa.field("rq", pa.float64()),
        pa.field("tp", pa.int64()),
        pa.field("fp", pa.int64()),
        pa.field("fn", pa.int64()),
        pa.field("iou_sum", pa.float64()),
    ]
)


def match_key(name: str, rule: MatchRule) -> str:
    """The key ``name`` (a GT file name / URI or an output ``image_id``) is matched on under ``rule``."""
    if rule == "uri":
        return name
    basename = posixpath.basename(last_part(name))
    if rule == "basename":
        return basename
    if rule == "stem":
        stem, dot, _ = basename.rpartition(".")
        return stem if dot else basename
    raise ValueError(f"match rule must be 'stem', 'basename' or 'uri', got {rule!r}")


def _gt_name(image: Mapping[str, Any], rule: MatchRule) -> str:
    if rule != "uri":
        return str(image["file_name"])
    if "image_uri" not in image:
        raise ValueError(f"--match uri needs images[].image_uri (written by export-coco); image {image['id']} has none")
    return str(image["image_uri"])


def match_images(
    gt_json: Mapping[str, Any], pred_image_ids: Iterable[str], *, rule: MatchRule
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Pair GT annotations with output ``image_id`` s.

    Returns ``{pred image_id: GT annotation}`` and the GT annotations without a prediction.
    """
    names = {img["id"]: _gt_name(img, rule) for img in gt_json.get("images", [])}
    gt_by_key: dict[str, dict[str, Any]] = {}
    for ann in gt_json["annotations"]:
        if rule == "uri" and ann["image_id"] not in names:
            raise ValueError(f"--match uri: annotation of image {ann['image_id']} has no images[] entry")
        key = match_key(names.get(ann["image_id"], ann["file_name"]), rule)
        if key in gt_by_key:
            raise ValueError(f"two ground-truth images have the {rule} {key!r}")
        gt_by_key[key] = ann
    matched: dict[str, dict[str, Any]] = {}
    pred_by_key: dict[str, str] = {}
    for image_id in pred_image_ids:
        key = match_key(image_id, rule)
        if key not in gt_by_key:
            continue
        if key in pred_by_key:
            raise ValueError(f"output images {pred_by_key[key]!r} and {image_id!r} both match {key!r}")
        pred_by_key[key] = image_id
        matched[image_id] = gt_by_key[key]
    missing = [ann for key, ann in gt_by_key.items() if key not in pred_by_key]
    return matched, missing


def _stats_table(stats: Mapping[int, ClassStats]) -> pa.Table:
    ids = sorted(stats)
    return pa.table(
        {
            "category_id": ids,
            "iou": [stats[i].iou for i in ids],
            "tp": [stats[i].tp for i in ids],
            "fp": [stats[i].fp for i in ids],
            "fn": [stats[i].fn for i in ids],
        },
        schema=_STATS_SCHEMA,
    )


def read_gt_ids(gt_folder: str, file_name: str) -> np.ndarray:
    """``[H, W]`` uint32 id map of one ground-truth PNG."""
    with fsspec.open(f"{gt_folder.rstrip('/')}/{file_name}", "rb") as f:
        rgb = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))  # [H, W, 3] uint8
    return rgb_to_id_map(rgb)


def evaluate_batch(
    batch: pa.Table, *, gt: Mapping[str, Mapping[str, Any]], gt_folder: str, categories: Sequence[int]
) -> pa.Table:
    """Ray stage: packed output images -> per-category sums of TP / FP / FN / IoU over the batch."""
    total: dict[int, ClassStats] = {}
    known = set(categories)
    for image in packed_rows(batch):
        ann = gt[image["image_id"]]
        gt_ids = read_gt_ids(gt_folder, ann["file_name"])  # [H, W]
        # The prediction as export-coco writes it: segments of a category the evaluation does not know (DETR
        # has 250 class slots) are left out, their pixels VOID; the official tools refuse unknown ids.
        kept = [s for s in image["segments"] if s["category_id"] in known]
        pred_ids = to_coco_ids(panoptic_map(kept, height=image["height"], width=image["width"]))  # [H, W]
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(
                f"{image['image_id']}: prediction is {list(pred_ids.shape)} (h, w) but ground truth "
                f"{ann['file_name']} is {list(gt_ids.shape)}"
            )
        # Ground-truth segments of a category outside `categories` stay what panopticapi makes of them: not
        # VOID (a prediction over them is a false positive), false negatives of a class no average includes.
        gt_segments = segments_from_coco(ann["segments_info"])
        present = set(np.unique(pred_ids).tolist())
        pred_segments = [
            Segment(id=s["segment_id"] + 1, category_id=s["category_id"])
            for s in kept
            if s["segment_id"] + 1 in present  # as export-coco: a segment covering no pixel is dropped
        ]
        stats = image_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories=categories)
        add_stats(total, stats)
    return _stats_table(total)


def _ok_image_ids(out: Output) -> list[str]:
    images = open_table(out, IMAGES_TABLE).to_table(columns=["image_id"], filter=pc.field("status") == STATUS_OK)
    return images["image_id"].to_pylist()


def evaluate(
    output: Output | str,
    gt_json: Mapping[str, Any],
    gt_folder: str,
    *,
    rule: MatchRule = "stem",
    allow_missing: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """PQ / SQ / RQ (All / Things / Stuff and per class) of ``output`` against the ground truth.

    Returns the report: ``metrics`` (``{"All"|"Things"|"Stuff": {pq, sq, rq, n}}``), ``per_class``
    (list of :data:`PER_CLASS_SCHEMA` dicts), ``images`` (counts) and ``match``. Raises
    :class:`~pipeline.reading.output_tables.OutputNotFoundError` when ``output`` holds no output.
    """
    out = check_output(output)
    matched, missing = match_images(gt_json, _ok_image_ids(out), rule=rule)
    if missing and not allow_missing:
        names = ", ".join(repr(a["file_name"]) for a in missing[:5])
        raise ValueError(
            f"{len(missing)} ground-truth images have no ok prediction in {out.uri} (e.g. {names}); "
            "check --match or pass --allow-missing"
        )
    categories = {int(c["id"]): bool(c.get("isthing", 0)) for c in gt_json["categories"]}
    names = {int(c["id"]): str(c["name"]) for c in gt_json["categories"]}

    stats: dict[int, ClassStats] = {}
    for ann in missing:  # empty prediction: every non-crowd GT segment is a false negative
        for s in segments_from_coco(ann["segments_info"]):
            if not s.iscrowd:
                stats.setdefault(s.category_id, ClassStats()).fn += 1
    if matched:
        per_batch = map_images(
            out,
            evaluate_batch,
            image_ids=sorted(matched),
            batch_size=16,
            fn_kwargs={"gt": matched, "gt_folder": gt_folder, "categories": sorted(categories)},
            verbose=verbose,
        )
        for row in per_batch:
            add_stats(stats, {row["category_id"]: ClassStats(row["iou"], row["tp"], row["fp"], row["fn"])})

    metrics: dict[str, dict[str, Any]] = {}
    per_class: list[dict[str, Any]] = []
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        average, classes = pq_average(stats, categories, isthing=isthing)
        # a group without any class present has no figures (panopticapi prints 0.0, hotcoco "–")
        metrics[name] = average._asdict() if average.n else {"pq": None, "sq": None, "rq": None, "n": 0}
        if isthing is None:
            for category_id, q in classes.items():
                s = stats.get(category_id, ClassStats())
                if s.tp + s.fp + s.fn == 0:  # on neither side: not a class of this evaluation's figures
                    continue
                per_class.append(
                    {
                        "category_id": category_id,
                        "category": names[category_id],
                        "isthing": categories[category_id],
                        "pq": q.pq,
                        "sq": q.sq,
                        "rq": q.rq,
                        "tp": s.tp,
                        "fp": s.fp,
                        "fn": s.fn,
                        "iou_sum": s.iou,
                    }
                )
    return {
        "unit": "fraction in [0, 1] (panopticapi's pq_compute values; its printed table is x100)",
        "metrics": metrics,
        "per_class": per_class,
        "images": {"ground_truth": len(matched) + len(missing), "matched": len(matched), "missing": len(missing)},
        "match": rule,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """panopticapi's summary table (×100); a group without classes shows "–" (as hotcoco prints it)."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name, m in report["metrics"].items():
        pq_, sq, rq = (f"{'–':>5s}" if m[k] is None else f"{100 * m[k]:5.1f}" for k in ("pq", "sq", "rq"))
        lines.append(f"{name:10s}| {pq_}  {sq}  {rq} {m['n']:5d}")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="PQ / SQ / RQ of an output against COCO panoptic ground truth (panopticapi's rules).",
    )
    p.add_argument("output", help="output folder or URI")
    add_snapshot_options(p)
    p.add_argument("--gt-json", required=True, help="COCO panoptic ground-truth JSON")
    p.add_argument("--gt-folder", required=True, help="folder (or URI) of the ground-truth PNGs")
    p.add_argument(
        "--match",
        choices=["stem", "basename", "uri"],
        default="stem",
        help="how GT images find their prediction (default: stem; see the module docstring)",
    )
    p.add_argument("--allow-missing", action="store_true", help="GT images without prediction count as FN")
    p.add_argument("--report", help="write the report (JSON) here")
    p.add_argument("--per-class", help="write the per-class table (Parquet) here")
    p.add_argument("--verbose", action="store_true", help="show Ray's own messages when a large output uses Ray")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the summary, write the report / per-class table if asked. Exit code 0 done, 2 a
    user's mistake (`jobs.usage`)."""
    args = _parser().parse_args(argv)

    def body() -> int:
        out = open_output(args)  # resolved once, for every reader below; before a large GT
        warn_if_demo_weights(PROG, out)
        try:
            with fsspec.open(args.gt_json, "rb") as f:
                gt_json = json.loads(f.read())
        except FileNotFoundError:
            raise UsageError(f"no such file: {args.gt_json}", flag="--gt-json") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"{args.gt_json} is not JSON ({exc})", flag="--gt-json") from None
        try:
            report = evaluate(
                out, gt_json, args.gt_folder, rule=args.match, allow_missing=args.allow_missing,
                verbose=args.verbose,
            )  # fmt: skip
        except ValueError as exc:  # no prediction for a GT image, two images on one key, sizes that disagree
            raise UsageError(str(exc)) from exc
        sys.stdout.write(format_report(report))
        if args.report:
            with fsspec.open(args.report, "w") as f:
                json.dump(report, f, indent=2)
        if args.per_class:
            fs, path = locate(args.per_class)
            with fs.open(path, "wb") as f:
                pq.write_table(pa.Table.from_pylist(report["per_class"], schema=PER_CLASS_SCHEMA), f)
        return 0

    return run_command(PROG, body, user_errors=SNAPSHOT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
