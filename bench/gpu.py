"""The GPU hour, prepared: one command measures every GPU claim inside a hard time budget (``make gpu-check``).

    python -m bench.gpu [--device auto|cuda|cpu] [--quick] [--budget-s 420] [--weights PATH] [--out-dir DIR]

Steps, in order, each with its own share of the budget (`bench.budget`; a step out of time is skipped, a
step that runs out mid-way stops between passes, and either is noted in the report):

1. ``machine``: GPU name and memory, driver, CUDA, torch, cuDNN, the host (`bench.machine.describe`); TF32 is
   switched off for every fp32 comparison (the rows that run with torch's TF32 defaults say so).
2. ``pytest``: ``pytest -m gpu`` over the test files that use the ``gpu`` marker; with ``--weights`` the
   ``weights`` tests' CUDA cases run too (``PANOPTIC_FLOW_TEST_WEIGHTS``).
3. ``model``: model-only images/s (`PanopticPredictor.predict_prepared` on images decoded by Pillow, as the
   actor gets them: host→device copy, model, merge, id maps back) for fp32, torch's TF32 defaults, bf16,
   fp16, channels-last and the product's default configuration, at each batch size; ``exact`` vs
   ``bucketed`` batching on a mixed-size set; agreement of each switch with fp32 (`bench.agreement`) against
   the ±0.5 grey-level noise yardstick on the same images, and the gate's verdict.
4. ``compile``: `torch.compile` of the detector (backbone + transformer + heads: fixed shapes per canvas
   and batch; the mask head's shapes follow the number of kept queries and stay eager), first-call seconds
   per new input shape (each new (batch, canvas) shape compiles again), then steady images/s vs eager and
   agreement, on the uniform set and, if time is left, on the bucketed mixed set. Own subprocess.
5. ``bytes``: bytes → maps images/s with Pillow decode + resize on the bench thread (one CPU core) vs
   ``device_preprocess`` (nvJPEG + resize on the GPU), GPU busy % sampled through NVML.
6. ``job``: `pipeline.run.run_job` on the same kind of files (local Ray, one actor, synthetic or the named
   weights, ``--device`` as given), timed from outside through its committed parts (their modification
   times): start-up (job start → first part: planning, actor start with its model and CUDA init, first
   batches; Ray's own start apart) and the steady rate between parts, set against the bare model's rate in
   the same configuration. Own subprocess with its own local Ray.

Writes ``<out-dir>/gpu-<date>.json`` (``gpu-<date>-cpu.json`` for a CPU run) and the Markdown rows for
BENCHMARKS.md next to it (``.md``), and prints them. ``--device cpu --quick`` runs every step on tiny images
in about a minute on two cores: CI runs it (tests/bench/test_gpu.py), so the command is known to work
before a GPU is there. Exit status 1 when a step failed with an error or a GPU test failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.budget import Budget, run_killable
from bench.gpu_steps import (
    FULL,
    QUICK_CPU,
    QUICK_CUDA,
    SUBPROCESS_STEPS,
    Settings,
    bytes_step,
    machine_step,
    model_step,
    pytest_step,
    set_tf32,
)

log = logging.getLogger("bench.gpu")

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"machine": 0.01, "pytest": 0.12, "model": 0.27, "compile": 0.25, "bytes": 0.08, "job": 0.25}
MIN_STEP_S = {"machine": 0.0, "pytest": 10.0, "model": 10.0, "compile": 10.0, "bytes": 5.0, "job": 20.0}


def _subprocess_step(
    name: str, deadline: float, *, settings: Settings, device: torch.device, weights: str | None, tmp: Path
) -> dict:
    """Run ``name`` in ``python -m bench.gpu --step NAME`` with the step's share as a hard timeout; a step
    killed at its share reports what it had written to its partial-results file."""
    left = Budget.left(deadline)
    partial = tmp / f"{name}-partial.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--step", name, "--settings", json.dumps(asdict(settings))]
    cmd += ["--device", device.type, "--left-s", f"{left:.0f}", "--partial", str(partial)]
    cmd += ["--weights", weights] if weights else []
    code, output, timed_out = run_killable(cmd, timeout=left, cwd=ROOT)
    if timed_out or code != 0:
        if not partial.exists():
            raise RuntimeError(f"step {name} {'timed out' if timed_out else f'exited with {code}'}: {output[-1500:]}")
        record = json.loads(partial.read_text())
        cause = f"killed after its share ({left:.0f} s)" if timed_out else f"exited with {code}"
        record["note"] = f"cut: {cause}; partial results. " + record.get("note", "")
        record["output_tail"] = output[-3000:]
        return record
    return json.loads(output.strip().splitlines()[-1])


# -- command -------------------------------------------------------------------------------------------


def run(
    *, device: torch.device, settings: Settings, budget_s: float, weights: str | None, skip: tuple[str, ...]
) -> dict:
    """All steps inside the budget -> the report (also what the JSON file holds)."""
    budget = Budget(budget_s, SHARES)
    set_tf32(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the job's actor
    kwargs = {"settings": settings, "device": device, "weights": weights}
    with tempfile.TemporaryDirectory(prefix="pfb-gpu-") as tmp:
        steps = {
            "machine": lambda deadline: machine_step(device),
            "pytest": lambda deadline: pytest_step(deadline, weights=weights),
            "model": lambda deadline: model_step(deadline, tmp=Path(tmp), **kwargs),
            "compile": lambda deadline: _subprocess_step("compile", deadline, tmp=Path(tmp), **kwargs),
            "bytes": lambda deadline: bytes_step(deadline, tmp=Path(tmp), **kwargs),
            "job": lambda deadline: _subprocess_step("job", deadline, tmp=Path(tmp), **kwargs),
        }
        for name, step in steps.items():
            if name in skip:
                continue
            record = budget.run(name, step, min_s=MIN_STEP_S[name])
            log.info("step %s: %s in %.1f s %s", name, record.status, record.seconds, record.note)
    return {
        "budget_s": budget_s,
        "seconds": time.monotonic() - budget.start,
        "settings": asdict(settings),
        "device": device.type,
        "weights": weights or "synthetic",
        "steps": {r.name: asdict(r) for r in budget.records},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI proof on CPU; a short smoke run on CUDA)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="hard time budget in seconds (default 7 min)")
    parser.add_argument("--weights", help="a trained checkpoint: the gate then also needs 99 %%, and -m weights runs")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SHARES), help="steps to leave out")
    parser.add_argument("--step", choices=list(SUBPROCESS_STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--left-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--partial", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "auto":
        device = torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.step:
        raw = json.loads(args.settings)
        settings = Settings(**{**raw, "batch_sizes": tuple(raw["batch_sizes"])})
        set_tf32(False)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        step = SUBPROCESS_STEPS[args.step]
        print(json.dumps(step(settings, device, args.weights, args.left_s, Path(args.partial))))
        return 0
    logging.basicConfig(level=logging.INFO, format="[bench.gpu] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = FULL if not args.quick else QUICK_CUDA if device.type == "cuda" else QUICK_CPU
    command = "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    report.update(
        run(device=device, settings=settings, budget_s=args.budget_s, weights=args.weights, skip=tuple(args.skip))
    )
    from bench.gpu_report import markdown

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{time.strftime('%Y-%m-%d')}" + ("" if device.type == "cuda" else f"-{device.type}")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    rows = markdown(report)
    (out_dir / f"{stem}.md").write_text(rows + "\n")
    print(rows)
    print(f"\nJSON: {out_dir / f'{stem}.json'}; Markdown: {out_dir / f'{stem}.md'}")
    steps = report["steps"]
    failed = [n for n, s in steps.items() if s["status"] == "error"]
    if "pytest" in steps and steps["pytest"]["status"] == "done":
        result = steps["pytest"]["result"]
        if result["failed"] or result["error"] or result["exit_code"] not in (0, 5):
            failed.append("pytest")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
