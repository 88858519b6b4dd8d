"""`bench.gpu_report.markdown` on a report whose steps were skipped, cut or failed: every step is named with its
status and note, and cut steps print what they measured before the cut."""

from __future__ import annotations

from bench.gpu_report import markdown


def _step(name: str, status: str, result: dict | None = None, note: str = "") -> dict:
    return {"name": name, "status": status, "seconds": 1.0, "share_s": 10.0, "result": result, "note": note}


def test_cut_skipped_and_failed_steps_are_reported() -> None:
    report = {
        "command": "python -m bench.gpu --budget-s 60",
        "seconds": 59.0,
        "budget_s": 60.0,
        "weights": "synthetic",
        "settings": {"batch_sizes": [8, 16]},
        "steps": {
            "machine": _step("machine", "error", {"traceback": "..."}, "RuntimeError: no NVML"),
            "pytest": _step("pytest", "skipped", note="skipped: 0 s of the budget left"),
            "compile": _step(
                "compile",
                "done",
                {
                    "backend": "inductor",
                    "batch_size": 8,
                    "compiled_shapes": 1,
                    "uniform_shapes": {"8x3x800x1066": 71.5},
                },
                "cut: killed after its share (84 s); partial results.",
            ),
            "job": _step("job", "done", {"images": 1024, "arrivals": [[30.0, 128], [31.0, 128]]}, "cut: killed"),
        },
    }
    text = markdown(report)
    assert "Machine: not recorded." in text
    assert "8x3x800x1066: 71.5" in text and "1 input shapes compiled" in text
    assert "cut at its share after 2 committed parts" in text
    assert "- `machine`: error — RuntimeError: no NVML" in text
    assert "- `pytest`: skipped — skipped: 0 s of the budget left" in text
    assert "- `compile`: done — cut: killed after its share (84 s); partial results." in text
