"""`panoptic-flow evaluate` end to end: synthetic GT (PNGs + JSON) against a synthetic output, through Ray.

Ground truth per image (predictions: ``tests/synthetic_output.py``):

- ``dog``: identical to the prediction (dog, person, sky): 3 TP with IoU 1.
- ``small_dog``: grass identical; the GT dog lies elsewhere (no overlap): dog FP + FN; GT trees
  around them: FN.
- ``cats``: both cats identical; the person is VOID in GT (prediction ignored); a GT-only tree: FN.
- ``empty``: GT sky over the whole frame, no prediction: FN.
- ``missing``: GT only (one person), no output image: an error unless ``--allow-missing`` (then FN).

Per class (tp, fp, fn, Σ IoU) with ``--allow-missing``: person (1, 0, 1, 1) PQ 2/3; dog (1, 1, 1, 1)
PQ 1/2; cat (2, 0, 0, 2) PQ 1; sky (1, 0, 1, 1) PQ 2/3; grass (1, 0, 0, 1) PQ 1; tree (0, 0, 2, 0) PQ 0.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline.reading.packed_images
from jobs.evaluate import evaluate, format_report, main, match_key
from jobs.export_coco import main as export_main
from pipeline.reading.coco import coco_categories, id_map_to_rgb, rgb_to_id_map
from tests.synthetic_output import DOG, GRASS, PERSON, SKY, SynthImage, SynthSegment, make_images, rect, write_output

TREE = (184, "tree-merged")


def _gt_image(
    folder: Path, gt: dict[str, list], image_id: int, name: str, size: tuple[int, int], segments: list[tuple]
) -> None:
    """Write one GT PNG and its JSON entries; ``segments`` = [(category_id, mask, iscrowd)]."""
    ids = np.zeros(size, np.uint32)
    infos = []
    for k, (category_id, mask, iscrowd) in enumerate(segments):
        segment_id = 1000 + 300 * k  # > 255: uses the G channel; unrelated to the predicted ids
        ids[mask] = segment_id
        infos.append({"id": segment_id, "category_id": category_id, "iscrowd": iscrowd, "area": int(mask.sum())})
    Image.fromarray(id_map_to_rgb(ids)).save(folder / f"{name}.png")
    gt["images"].append({"id": image_id, "file_name": f"{name}.jpg", "height": size[0], "width": size[1]})
    gt["annotations"].append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": infos})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    images: list[SynthImage] = make_images(root / "inputs")
    write_output(root / "out", images)
    dog, small_dog, cats = images[:3]
    folder = root / "gt"
    folder.mkdir()
    gt: dict[str, list] = {"images": [], "annotations": [], "categories": coco_categories()}
    _gt_image(folder, gt, 1, "dog", (30, 40), [(s.category_id, s.mask, 0) for s in dog.segments])
    grass, _ = small_dog.segments
    gt_dog = rect(40, 50, 15, 30, 25, 40)
    trees = rect(40, 50, 0, 0, 30, 50) & ~gt_dog  # under the predicted dog: not VOID, so it is an FP
    _gt_image(
        folder, gt, 2, "small_dog", (40, 50), [(grass.category_id, grass.mask, 0), (18, gt_dog, 0), (TREE[0], trees, 0)]
    )
    cat_a, cat_b, _person = cats.segments
    tree = rect(24, 32, 22, 0, 24, 32)
    _gt_image(folder, gt, 3, "cats", (24, 32), [(17, cat_a.mask, 0), (17, cat_b.mask, 0), (TREE[0], tree, 0)])
    _gt_image(folder, gt, 4, "empty", (20, 20), [(SKY[0], np.ones((20, 20), bool), 0)])
    _gt_image(folder, gt, 5, "missing", (10, 10), [(PERSON[0], rect(10, 10, 0, 0, 5, 5), 0)])
    assert GRASS[0] == grass.category_id
    (root / "gt.json").write_text(json.dumps(gt))
    return root / "out", root / "gt.json", folder


def test_match_key() -> None:
    assert match_key("s3://b/val/000000000139.jpg", "stem") == "000000000139"
    assert match_key("s3://b/shard-0001.tar#sub/000000000139.jpg", "stem") == "000000000139"
    assert match_key("000000000139.png", "basename") == "000000000139.png"
    assert match_key("s3://b/x.tar#a.jpg", "uri") == "s3://b/x.tar#a.jpg"


def test_missing_predictions_are_an_error(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    output, gt_json, gt_folder = setup
    assert main([str(output), "--gt-json", str(gt_json), "--gt-folder", str(gt_folder)]) == 2  # the user's mistake
    (line,) = capsys.readouterr().err.splitlines()
    assert re.search(r"error: 1 ground-truth images have no ok prediction .*'missing.png'.*--allow-missing", line)


def test_evaluate_cli_end_to_end(
    setup: tuple[Path, Path, Path], tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    output, gt_json, gt_folder = setup
    report_path, per_class_path = tmp_path / "report.json", tmp_path / "per_class.parquet"
    args = [str(output), "--gt-json", str(gt_json), "--gt-folder", str(gt_folder), "--allow-missing"]
    assert main([*args, "--report", str(report_path), "--per-class", str(per_class_path)]) == 0

    report = json.loads(report_path.read_text())
    assert report["images"] == {"ground_truth": 5, "matched": 4, "missing": 1}
    pq_by_class = {1: 2 / 3, 18: 1 / 2, 17: 1.0, 187: 2 / 3, 193: 1.0, 184: 0.0}
    metrics = report["metrics"]
    assert metrics["All"]["n"] == 6
    assert metrics["All"]["pq"] == pytest.approx(sum(pq_by_class.values()) / 6)
    assert metrics["Things"] == pytest.approx(
        {"pq": (2 / 3 + 1 / 2 + 1) / 3, "sq": 1.0, "rq": (2 / 3 + 1 / 2 + 1) / 3, "n": 3}
    )
    assert metrics["Stuff"] == pytest.approx(
        {"pq": (2 / 3 + 1 + 0) / 3, "sq": 2 / 3, "rq": (2 / 3 + 1 + 0) / 3, "n": 3}
    )

    table = pq.read_table(per_class_path)
    rows = {r["category_id"]: r for r in table.to_pylist()}
    assert all(r["tp"] + r["fp"] + r["fn"] > 0 for r in rows.values())  # only classes present on either side
    for category_id, value in pq_by_class.items():
        assert rows[category_id]["pq"] == pytest.approx(value)
    assert (rows[18]["tp"], rows[18]["fp"], rows[18]["fn"]) == (1, 1, 1)
    assert (rows[1]["tp"], rows[1]["fp"], rows[1]["fn"]) == (1, 0, 1)  # the person on GT VOID is ignored
    assert rows[184]["category"] == "tree-merged" and rows[184]["fn"] == 2
    assert 2 not in rows  # bicycle: on neither side

    printed = capsys.readouterr().out
    all_line = next(line for line in printed.splitlines() if line.startswith("All"))
    assert all_line.split("|")[1].split()[:1] == [f"{100 * sum(pq_by_class.values()) / 6:.1f}"]


@pytest.mark.parametrize("reader", ["in process", "ray"])
def test_an_export_evaluated_against_its_own_output_is_perfect(
    setup: tuple[Path, Path, Path], tmp_path: Path, reader: str, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    output, _, _ = setup
    if reader == "ray":  # as a large output is read: Ray Data's map_batches over read_segments_by_image
        request.getfixturevalue("ray_session")
        monkeypatch.setattr(pipeline.reading.packed_images, "LOCAL_MAX_BYTES", 0)
    assert export_main([str(output), str(tmp_path / "coco")]) == 0
    gt_json = json.loads((tmp_path / "coco" / "panoptic.json").read_text())
    report = evaluate(str(output), gt_json, str(tmp_path / "coco" / "panoptic"), rule="uri")
    assert report["images"] == {"ground_truth": 4, "matched": 4, "missing": 0}
    assert report["metrics"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 5}  # person dog cat sky grass
    assert report["metrics"]["Stuff"]["n"] == 2
    with pytest.raises(ValueError, match="no ok prediction"):  # exported names do not share the stems
        evaluate(str(output), gt_json, str(tmp_path / "coco" / "panoptic"), rule="stem")


def test_an_empty_group_prints_a_dash_and_the_report_lists_only_present_classes(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    output, _, _ = setup
    assert export_main([str(output), str(tmp_path / "coco")]) == 0
    gt_json = json.loads((tmp_path / "coco" / "panoptic.json").read_text())
    things = {c["id"] for c in gt_json["categories"] if c["isthing"]}
    gt_json["categories"] = [c for c in gt_json["categories"] if c["isthing"]]  # no Stuff class at all
    for annotation in gt_json["annotations"]:
        annotation["segments_info"] = [s for s in annotation["segments_info"] if s["category_id"] in things]
    report = evaluate(str(output), gt_json, str(tmp_path / "coco" / "panoptic"), rule="uri")
    assert report["metrics"]["Stuff"] == {"pq": None, "sq": None, "rq": None, "n": 0}
    stuff_line = next(line for line in format_report(report).splitlines() if line.startswith("Stuff"))
    assert stuff_line.split("|")[1].split() == ["–", "–", "–", "0"]
    assert sorted(r["category"] for r in report["per_class"]) == ["cat", "dog", "person"]  # not all 80 things


_NO_RAY_PROBE = """
import json, sys
from jobs.evaluate import main as evaluate
from jobs.export_coco import main as export
out, dest = sys.argv[1], sys.argv[2]
assert export([out, dest]) == 0
assert evaluate([out, "--gt-json", dest + "/panoptic.json", "--gt-folder", dest + "/panoptic", "--match", "uri"]) == 0
from jobs.show import main as show
assert show([out, "--grid", "3", "-o", dest + "/grid.png"]) == 0
print(json.dumps(sorted(m for m in ("ray", "ray.data") if m in sys.modules)))
"""


def test_small_outputs_are_exported_evaluated_and_shown_without_ray(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    output, _, _ = setup
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _NO_RAY_PROBE, str(output), str(tmp_path / "coco")],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []  # Ray never imported, so never started
    assert lines[0] == "wrote 4 images, 8 segments to " + str(tmp_path / "coco")
    assert any(line.startswith("All") and "100.0" in line for line in lines)
    assert "ray" not in done.stderr.lower()


def test_a_mistyped_output_is_one_line_and_exit_2(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    output, gt_json, gt_folder = setup
    assert main([f"{output}x", "--gt-json", str(gt_json), "--gt-folder", str(gt_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no output at" in err


# --- evaluate against an independent implementation: hotcoco's pq_compute (panopticapi's rules) ----------

HOTCOCO = pytest.importorskip("hotcoco.panoptic", reason="the test extra's hotcoco is the oracle")


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return np.roll(mask, (dy, dx), axis=(0, 1))


@pytest.fixture(scope="module")
def oracle_case(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> dict[str, Path]:
    """A prediction output with segments of class slots outside the 133 categories (68, 201, as the model
    emits them), and a ground truth made by exporting a perturbed copy of it (then one segment made crowd):

    - dog.png: dog shifted by 2 px; the predicted class_68 segment is a person in the ground truth.
    - small_dog.png: grass identical; the ground-truth dog is elsewhere; where the dog is predicted, the
      ground truth has a segment of category 201, which is not in its `categories` (panopticapi does not
      check ground-truth categories): not VOID, so the predicted dog is a false positive.
    - cats.png: one cat identical, the other cat crowd; the predicted class_201 segment is a person.
    - empty.png: sky over the whole frame, nothing predicted.
    """
    root = tmp_path_factory.mktemp("oracle")
    predicted = make_images(root / "inputs")
    truth = copy.deepcopy(predicted)
    dog, _, cats = predicted[:3]
    dog.segments[1] = SynthSegment(68, "class_68", 0.9, dog.segments[1].mask)
    cats.segments[2] = SynthSegment(201, "class_201", 0.9, cats.segments[2].mask)
    t_dog, t_small, _, t_empty = truth[:4]
    t_dog.segments[0] = SynthSegment(*DOG, 1.0, _shift(t_dog.segments[0].mask, 2, 1))
    t_small.segments[1] = SynthSegment(*DOG, 1.0, rect(40, 50, 15, 30, 25, 40))
    t_small.segments.append(SynthSegment(*TREE, 1.0, rect(40, 50, 0, 0, 15, 20)))  # under the predicted dog
    t_empty.segments = [SynthSegment(*SKY, 1.0, np.ones((20, 20), bool))]
    write_output(root / "pred", predicted)
    write_output(root / "truth", truth)
    assert export_main([str(root / "pred"), str(root / "pred_coco")]) == 0
    assert export_main([str(root / "truth"), str(root / "gt_coco")]) == 0
    gt = json.loads((root / "gt_coco" / "panoptic.json").read_text())
    cats_id = next(i["id"] for i in gt["images"] if i["image_uri"] == cats.image_id)
    cats_gt = next(a for a in gt["annotations"] if a["image_id"] == cats_id)
    cats_gt["segments_info"][1]["iscrowd"] = 1
    for annotation in gt["annotations"]:
        for segment in annotation["segments_info"]:
            if segment["category_id"] == TREE[0]:
                segment["category_id"] = 201  # a category the ground truth does not list
    (root / "gt_coco" / "panoptic.json").write_text(json.dumps(gt))
    return {"output": root / "pred", "pred": root / "pred_coco", "gt": root / "gt_coco"}


def test_the_export_holds_only_its_own_categories(oracle_case: dict[str, Path]) -> None:
    document = json.loads((oracle_case["pred"] / "panoptic.json").read_text())
    known = {c["id"] for c in document["categories"]}
    written = {s["category_id"] for a in document["annotations"] for s in a["segments_info"]}
    assert written <= known and written == {17, 18, 187, 193}  # 68 and 201 left out (both persons were those)
    for annotation in document["annotations"]:  # and their pixels are VOID: PNG ids == listed ids
        with Image.open(oracle_case["pred"] / "panoptic" / annotation["file_name"]) as png:
            ids = set(np.unique(rgb_to_id_map(np.asarray(png.convert("RGB")))).tolist()) - {0}
        assert ids == {s["id"] for s in annotation["segments_info"]}


def test_evaluate_equals_hotcoco_on_the_exported_files(oracle_case: dict[str, Path]) -> None:
    gt_json = oracle_case["gt"] / "panoptic.json"
    expected = HOTCOCO.pq_compute(
        str(gt_json),
        str(oracle_case["pred"] / "panoptic.json"),
        gt_folder=str(oracle_case["gt"] / "panoptic"),
        pred_folder=str(oracle_case["pred"] / "panoptic"),
    )
    report = evaluate(
        str(oracle_case["output"]), json.loads(gt_json.read_text()), str(oracle_case["gt"] / "panoptic"), rule="uri"
    )
    for group in ("All", "Things", "Stuff"):
        assert report["metrics"][group]["n"] == expected[group]["n"] > 0, group
        for key in ("pq", "sq", "rq"):
            assert report["metrics"][group][key] == pytest.approx(expected[group][key], abs=1e-9), (group, key)
    ours = {r["category_id"]: r for r in report["per_class"]}
    for category_id, theirs in expected["per_class"].items():
        if not theirs["tp"] + theirs["fp"] + theirs["fn"]:
            assert int(category_id) not in ours  # on neither side: not listed
            continue
        row = ours[int(category_id)]
        assert (row["tp"], row["fp"], row["fn"]) == (theirs["tp"], theirs["fp"], theirs["fn"]), category_id
        if theirs["tp"] + theirs["fp"] + theirs["fn"]:
            assert row["pq"] == pytest.approx(theirs["pq"], abs=1e-9)
    assert 0 < report["metrics"]["All"]["pq"] < 1
    assert ours[1]["fn"] == 2 and ours[17]["tp"] == 1  # the persons under class_68 / class_201; the crowd cat
    assert (ours[18]["tp"], ours[18]["fp"], ours[18]["fn"]) == (1, 1, 1)  # the dog over category 201: an FP
    present = {int(c) for c, t in expected["per_class"].items() if t["tp"] + t["fp"] + t["fn"]}
    assert present == set(ours)  # only the classes present on either side
