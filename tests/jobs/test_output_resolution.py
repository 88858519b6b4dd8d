"""Each reading command resolves its output once (`Output.of`) and hands the `Output` to every reader, and reads
its run records the one way (`pipeline.exactly_once.run_records.read_run_records`), so an unreadable record is a warning
rather than a crash."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.exactly_once.output_paths import Output
from tests.synthetic_output import SynthImage, make_images, write_output


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthImage], Path]:
    """An output, and its export as COCO ground truth (for `evaluate`)."""
    from jobs.export_coco import export_coco

    root = tmp_path_factory.mktemp("resolution")
    images = make_images(root / "inputs")
    write_output(root / "out", images)
    export_coco(str(root / "out"), str(root / "coco"))
    return root / "out", images, root / "coco"


def _argv(command: str, output: Path, images: list[SynthImage], coco: Path, tmp_path: Path) -> list[str]:
    ground_truth = ["--gt-json", str(coco / "panoptic.json"), "--gt-folder", str(coco / "panoptic")]
    return {
        "query": [str(output), "SELECT count(*) FROM image_categories"],
        "show": [str(output), images[1].image_id, "-o", str(tmp_path / "show.png")],
        "show-grid": [str(output), "--grid", "2", "-o", str(tmp_path / "grid.png"), "--tile", "32"],
        "export-coco": [str(output), str(tmp_path / "coco")],
        "evaluate": [str(output), *ground_truth, "--match", "uri"],
    }[command]


def _main(command: str) -> Callable[[list[str]], int]:
    import importlib

    module = {"show-grid": "show", "export-coco": "export_coco"}.get(command, command)
    return importlib.import_module(f"jobs.{module}").main  # type: ignore[no-any-return]


@pytest.mark.parametrize("command", ["query", "show", "show-grid", "export-coco", "evaluate"])
def test_a_command_resolves_its_output_once(
    command: str, synthetic: tuple[Path, list[SynthImage], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, images, coco = synthetic
    main = _main(command)
    resolved: list[str] = []
    of = Output.of.__func__  # type: ignore[attr-defined]

    def counting_of(cls: type[Output], uri: str) -> Output:
        resolved.append(uri)
        return of(cls, uri)

    monkeypatch.setattr(Output, "of", classmethod(counting_of))
    assert main(_argv(command, output, images, coco, tmp_path)) == 0
    assert resolved == [str(output)]


@pytest.mark.parametrize("command", ["query", "show", "export-coco", "evaluate"])
def test_an_unreadable_run_record_is_left_out_with_a_warning(
    command: str,
    synthetic: tuple[Path, list[SynthImage], Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, images, coco = synthetic
    output = tmp_path / "out"
    write_output(output, images, weights="synthetic")
    (output / "_runs" / "zz-torn.json").write_text('{"run_id": "zz-torn", "weig')  # sorts last: the "latest"
    assert _main(command)(_argv(command, output, images, coco, tmp_path)) == 0
    assert "ignoring unreadable run record" in caplog.text and "zz-torn.json" in caplog.text
    # the readable record still counts: the output is wholly made with the demo weights
    assert f"{output} was made with demo weights (--weights synthetic): its segments" in capsys.readouterr().err
