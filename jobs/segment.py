"""`python -m jobs.segment` / `panoptic-flow segment`: DETR panoptic segmentation of images into Parquet.

Runs on the Ray cluster named by RAY_ADDRESS (as under `ray job submit --working-dir . -- python -m
jobs.segment ...`) or, when none is set, on an embedded local Ray. Re-running the same command with the
same --output resumes: committed images are skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from model.checkpoint import CheckpointError
from model.config import VARIANTS
from model.predictor import InferenceConfig
from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig
from pipeline.sources import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="panoptic-flow segment",
        description="Run DETR panoptic segmentation over images and write Parquet tables (segments/, images/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="URI",
        help="image folder/prefix/glob, .tar shards, Parquet files, or a manifest (.txt / --input-format "
        "manifest); local, s3://, any fsspec URI; repeatable",
    )
    p.add_argument("--input-format", default="auto", choices=["auto", "files", "tar", "parquet", "manifest"])
    p.add_argument("--bytes-column", default="image", help="Parquet inputs: column with encoded image bytes")
    p.add_argument("--id-column", default=None, help="Parquet inputs: column with a stable image id")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=InputConfig.max_pixels,
        help="images with more pixels are error rows (decompression-bomb guard)",
    )
    p.add_argument("--output", required=True, metavar="URI", help="output folder (local or s3://...)")
    p.add_argument(
        "--weights",
        default="auto",
        help="checkpoint URI (local, s3://, https://), 'auto' = the variant's official release file, "
        "or 'synthetic' = deterministic random demo weights (meaningless segments)",
    )
    p.add_argument(
        "--allow-synthetic-weights",
        action="store_true",
        help="with --weights auto: fall back to synthetic weights when the official file is unreachable",
    )
    p.add_argument("--variant", default="detr-r50-panoptic", choices=sorted(VARIANTS))
    p.add_argument("--min-size", type=int, default=InferenceConfig.min_size)
    p.add_argument("--max-size", type=int, default=InferenceConfig.max_size)
    p.add_argument("--threshold", type=float, default=InferenceConfig.threshold)
    p.add_argument(
        "--batch-mode",
        default="exact",
        choices=["exact", "bucketed"],
        help="exact: batch only equal-size images (reference results); bucketed: pad to 128-px "
        "buckets (bigger batches, results still independent of batch companions)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="fp32 reproduces the reference; bf16/fp16 autocast is faster on GPUs (see BENCHMARKS.md)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the convolutions")
    p.add_argument(
        "--device-preprocess",
        action="store_true",
        help="decode JPEGs (nvJPEG on CUDA), rotate and resize on the model's device instead of CPU workers; "
        "other formats stay on CPU",
    )
    p.add_argument("--batch-size", type=int, default=ResourceConfig.batch_size, help="images per model batch")
    p.add_argument(
        "--num-gpus", type=float, default=ResourceConfig.num_gpus, help="GPUs per actor (fractional shares a GPU)"
    )
    p.add_argument("--min-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--rows-per-file", type=int, default=ResourceConfig.rows_per_file, help="images per committed Parquet part"
    )
    p.add_argument(
        "--rle-on",
        default="workers",
        choices=["workers", "actor"],
        help="where masks are RLE-encoded: CPU tasks after the model (keeps GPUs busy) or inside the model actor",
    )
    p.add_argument(
        "--take-over-lease",
        action="store_true",
        help="take the output's lease although another run seems to hold it (only when that run is dead)",
    )
    p.add_argument(
        "--allow-mixed-settings",
        action="store_true",
        help="resume into an output made with other model settings on purpose (rows of both in one output)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        input=InputConfig(
            tuple(args.input),
            format=args.input_format,
            bytes_column=args.bytes_column,
            id_column=args.id_column,
            max_pixels=args.max_pixels,
        ),
        output=args.output,
        model=ModelSpec(variant=args.variant, weights=args.weights),
        inference=InferenceConfig(
            min_size=args.min_size,
            max_size=args.max_size,
            threshold=args.threshold,
            batch_mode=args.batch_mode,
            precision=args.precision,
            channels_last=args.channels_last,
            device_preprocess=args.device_preprocess,
        ),
        resources=ResourceConfig(
            batch_size=args.batch_size,
            num_gpus=args.num_gpus,
            min_actors=args.min_actors,
            max_actors=args.max_actors,
            device=args.device,
            rows_per_file=args.rows_per_file,
            rle_on=args.rle_on,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from pipeline.lease import LeaseHeld
    from pipeline.resume import SettingsChanged
    from pipeline.run import OutputError, run_job  # imports Ray: after argument checks

    try:
        summary = run_job(
            config,
            allow_synthetic=args.allow_synthetic_weights,
            show_progress=not args.no_progress,
            take_over_lease=args.take_over_lease,
            allow_mixed_settings=args.allow_mixed_settings,
        )
    except (InputError, CheckpointError, OutputError, LeaseHeld, SettingsChanged) as exc:
        print(f"panoptic-flow segment: error: {exc}", file=sys.stderr)
        return 2
    print(summary.line(config.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
