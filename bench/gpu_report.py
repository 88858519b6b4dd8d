"""Markdown rows for BENCHMARKS.md from a `bench.gpu` report (the dict its JSON file holds)."""

from __future__ import annotations


def markdown(report: dict) -> str:
    """The tables of one `bench.gpu` run, in the order of its steps; skipped and cut steps are named."""
    steps = report["steps"]
    lines = [f"Command: `{report['command']}` ({report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget)", ""]
    lines += _machine(steps.get("machine"), report)
    lines += _pytest(steps.get("pytest"))
    lines += _model(steps.get("model"), report)
    lines += _compile(steps.get("compile"))
    lines += _bytes(steps.get("bytes"))
    lines += _job(steps.get("job"), steps.get("model"))
    notes = [f"- `{name}`: {s['status']}{' — ' + s['note'] if s['note'] else ''}" for name, s in steps.items()]
    lines += ["Steps:", "", *notes, ""]
    return "\n".join(lines)


def _done(step: dict | None) -> dict | None:
    return step["result"] if step and step["status"] == "done" and step["result"] else None


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _gate(row: dict) -> str:
    if "gate_passed" not in row:
        return "–"
    return "pass" if row["gate_passed"] else "fail"


def _agreement(row: dict) -> str:
    if "pixels_in_matching_segments" not in row:
        return "–"
    return (
        f"{_pct(row['pixels_in_matching_segments'])} (worst {_pct(row['pixels_in_matching_segments_min'], 1)}); "
        f"lists {_pct(row['same_segment_lists'], 0)}"
    )


def _machine(step: dict | None, report: dict) -> list[str]:
    m = _done(step)
    if not m:
        return ["Machine: not recorded.", ""]
    host = m["host"]
    gpu = (
        f"{m['gpu']} ({m['gpu_memory_gib']:.0f} GiB, {m['multiprocessors']} SMs, compute {m['compute_capability']}), "
        f"driver {m['driver']}, "
        if "gpu" in m
        else "no GPU (device cpu), "
    )
    return [
        f"Machine: {gpu}CUDA {m['cuda']}, cuDNN {m['cudnn']}, torch {host['torch']}, Python {host['python']}; host "
        f"{host['cpu_model']}, {host['cpus_usable']} cores, load {host['load_average_at_start']}; {host['date']}. "
        f"TF32 off in the fp32 rows (torch's defaults here: matmul {m['torch_tf32_defaults']['matmul']}, "
        f"cuDNN {m['torch_tf32_defaults']['cudnn']}). Weights: {report['weights']}.",
        "",
    ]


def _pytest(step: dict | None) -> list[str]:
    r = _done(step)
    if not r:
        return [f"`pytest -m gpu`: {step['status'] + ' ' + step['note'] if step else 'not run'}", ""]
    return [f"`{r['command']}`: {r['summary']} (exit {r['exit_code']}).", ""]


def _model(step: dict | None, report: dict) -> list[str]:
    r = _done(step)
    if not r:
        return []
    sizes = report["settings"]["batch_sizes"]
    uniform = r["processed_sizes"]["uniform"]
    lines = [
        f"Model only (`predict_prepared` on Pillow-decoded images: copy, model, merge, id maps back), "
        f"uniform set {uniform[0][0]}×{uniform[0][1]}, mixed set {len(r['processed_sizes']['mixed'])} sizes; "
        f"agreement with fp32 (exact rows) or with exact (bucketed), gate against the ±0.5 grey-level yardstick"
        + (f" and ≥ {r['gate_floor']:.0%}" if r["gate_floor"] else "")
        + ":",
        "",
        "| variant | TF32 | "
        + " | ".join(f"images/s, batch {b}" for b in sizes)
        + f" | × fp32 (batch {sizes[0]}) | peak GPU GiB | pixels in matching segments; equal lists | gate |",
        "|---|---|" + "---:|" * len(sizes) + "---:|---:|---|---|",
    ]
    base = r["rows"].get("fp32", {}).get("images_per_s", {}).get(str(sizes[0]))
    mixed_base = r["rows"].get("exact, mixed sizes", {}).get("images_per_s", {}).get(str(sizes[0]))
    for name, row in r["rows"].items():
        ips = row["images_per_s"]
        ref = mixed_base if row["images"] == "mixed" else base
        ratio = ips.get(str(sizes[0])) / ref if ref and ips.get(str(sizes[0])) else None
        peak = row.get("peak_gpu_memory_gib")
        lines.append(
            f"| {name} | {row['tf32']} | "
            + " | ".join(_num(ips.get(str(b))) for b in sizes)
            + f" | {_num(ratio, 2)} | {_num(peak)} | {_agreement(row)} | {_gate(row)} |"
        )
    for which, y in r["yardsticks"].items():
        lines.append(
            f"| fp32 + ±0.5 grey-level input noise ({which} set: the yardstick) | off | "
            + " | ".join("–" for _ in sizes)
            + f" | – | – | {_agreement(y)} | – |"
        )
    lines.append("")
    lines += [f"- {row['gate_message']}" for row in r["rows"].values() if "gate_message" in row]
    return [*lines, ""]


def _compile(step: dict | None) -> list[str]:
    r = _done(step)
    if not r:
        return []
    lines = [
        f"`torch.compile` of the detector (backend {r['backend']}, `dynamic=False`, batch {r['batch_size']}; the mask "
        f"head stays eager): {r.get('compiled_shapes', 0)} input shapes compiled, each new (batch, canvas) shape "
        f"compiles again (dynamo's recompile limit: {r.get('recompile_limit', '?')}, then eager).",
        "",
        "| set | eager images/s | compiled images/s | × eager | first-call s per shape | agreement with eager | gate |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    u = r.get("uniform")
    if u or r.get("uniform_shapes"):
        u = u or {}
        shapes = ", ".join(f"{k}: {v:.1f}" for k, v in r["uniform_shapes"].items())
        lines.append(
            f"| uniform | {_num(u.get('eager_images_per_s'))} | {_num(u.get('compiled_images_per_s'))} | "
            f"{_num(u.get('speedup'), 2)} | {shapes} | {_agreement(u)} | {_gate(u)} |"
        )
    if "bucketed_mixed_shapes" in r:
        shapes = ", ".join(f"{k}: {v:.1f}" for k, v in r["bucketed_mixed_shapes"].items())
        lines.append(f"| mixed sizes, bucketed (recompiles) | – | – | – | {shapes or 'none new'} | – | – |")
    return [*lines, ""]


def _bytes(step: dict | None) -> list[str]:
    r = _done(step)
    if not r:
        return []
    lines = [
        f"Bytes → maps (fp32, batch {r['batch_size']}, {r['images']} JPEGs):",
        "",
        "| path | images/s | model-only images/s | decode + resize ms/image | GPU busy "
        "| agreement with CPU decode | gate |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, row in r["rows"].items():
        busy = row["gpu_busy_percent"]
        lines.append(
            f"| {name} | {_num(row['images_per_s'])} | {_num(row['model_images_per_s'])} | "
            f"{_num(row['prepare_ms_per_image'])} | {'–' if busy is None else f'{busy:.0f} %'} | "
            f"{_agreement(row)} | {_gate(row)} |"
        )
    return [*lines, ""]


def _job(step: dict | None, model: dict | None) -> list[str]:
    r = _done(step)
    if not r:
        return []
    if "total_s" not in r:  # killed at its share: only the parts committed until then
        return [f"The whole job: cut at its share after {len(r.get('arrivals', []))} committed parts.", ""]
    m = _done(model)
    bare = None
    if m and "default config" in m["rows"]:
        bare = m["rows"]["default config"]["images_per_s"].get(str(r["batch_size"]))
    steady = r["steady_images_per_s"]
    busy = r["gpu_busy_percent"]
    return [
        "The whole job (`run_job`, local Ray, one actor, default configuration) vs the bare model:",
        "",
        "| images | batch | Ray init s | start-up s (to the first part) | steady images/s | bare model images/s | "
        "job / bare | whole job s | GPU busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['images']} ({r['parts']} parts) | {r['batch_size']} | {_num(r['ray_init_s'])} | "
        f"{_num(r['startup_s'])} | "
        f"{_num(steady)} | {_num(bare)} | {_num(steady / bare if steady and bare else None, 2)} | "
        f"{_num(r['total_s'])} | {'–' if busy is None else f'{busy:.0f} %'} |",
        "",
    ]
