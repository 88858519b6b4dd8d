"""The packaged COCO panoptic category table and the reference DETR thing/stuff rule."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from model.categories import Category, categories, category_by_id, category_name, is_thing

# COCO detection ids 1..90 that have no category (kept as gaps by the panoptic table too).
MISSING_THING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_table_has_133_categories_with_unique_ascending_ids() -> None:
    table = categories()
    ids = [c.id for c in table]
    assert len(table) == 133
    assert len(set(ids)) == 133
    assert ids == sorted(ids)
    assert all(isinstance(c, Category) for c in table)


def test_80_things_on_coco_ids_1_to_90() -> None:
    thing_ids = {c.id for c in categories() if c.isthing}
    assert len(thing_ids) == 80
    assert thing_ids == set(range(1, 91)) - MISSING_THING_IDS


def test_53_stuff_categories_between_92_and_200() -> None:
    stuff = [c for c in categories() if not c.isthing]
    assert len(stuff) == 53
    assert min(c.id for c in stuff) == 92
    assert max(c.id for c in stuff) == 200


@pytest.mark.parametrize(
    ("category_id", "name", "isthing", "supercategory", "color"),
    [
        (1, "person", True, "person", (220, 20, 60)),
        (17, "cat", True, "animal", (255, 77, 255)),
        (18, "dog", True, "animal", (0, 226, 252)),
        (47, "cup", True, "kitchen", (109, 63, 54)),
        (90, "toothbrush", True, "indoor", (191, 162, 208)),
        (92, "banner", False, "textile", (255, 255, 128)),
        (187, "sky-other-merged", False, "sky", (70, 130, 180)),
        (199, "wall-other-merged", False, "wall", (102, 102, 156)),
        (200, "rug-merged", False, "textile", (250, 141, 255)),
    ],
)
def test_known_categories(
    category_id: int, name: str, isthing: bool, supercategory: str, color: tuple[int, int, int]
) -> None:
    assert category_by_id(category_id) == Category(category_id, name, isthing, supercategory, color)
    assert category_name(category_id) == name


@pytest.mark.parametrize("category_id", [0, 12, 91, 201, 249, 250, -1])
def test_ids_outside_the_table_get_a_name_of_their_own(category_id: int) -> None:
    assert category_by_id(category_id) is None
    assert category_name(category_id) == f"class_{category_id}"


def test_names_are_distinct_over_all_class_slots() -> None:
    names = [category_name(i) for i in range(251)]
    assert len(set(names)) == 251  # no two slots share a name (an "unknown" for all would collapse them)
    assert not any(c.name.startswith("class_") for c in categories())


def test_colors_are_rgb_bytes() -> None:
    for c in categories():
        assert len(c.color) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in c.color), c


@pytest.mark.parametrize(
    ("category_id", "expected"),
    [(0, True), (12, True), (90, True), (91, False), (200, False), (201, False), (249, False), (-1, False)],
)
def test_is_thing_follows_reference_map_and_does_not_crash_above_200(category_id: int, expected: bool) -> None:
    assert is_thing(category_id) is expected


def test_is_thing_agrees_with_the_table_flag() -> None:
    for c in categories():
        assert is_thing(c.id) is c.isthing, c


def test_json_keeps_panopticapi_records() -> None:
    # Re-serialised the way panopticapi ships it (indent=4), the packaged table is as long as the upstream
    # file, 25,928 characters: a cheap guard against hand edits.
    text = resources.files("model").joinpath("data/coco_panoptic_categories.json").read_text(encoding="utf-8")
    records = json.loads(text)
    assert all(set(r) == {"id", "name", "isthing", "supercategory", "color"} for r in records)
    assert all(r["isthing"] in (0, 1) for r in records)
    assert len(json.dumps(records, indent=4)) == 25928
