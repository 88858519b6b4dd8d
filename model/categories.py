"""The 133 COCO panoptic categories (80 things, 53 stuff) and the thing/stuff rule of reference DETR.

The table is shipped as ``model/data/coco_panoptic_categories.json``, a compact copy of
cocodataset/panopticapi's ``panoptic_coco_categories.json`` (same records: ``id``, ``name``, ``isthing``,
``supercategory``, ``color``). Category ids are sparse: things use COCO ids 1..90 (80 of them), stuff uses
92..200 (53 of them).

The DETR panoptic head has 250 class slots, and a class slot *is* the category id, so the model can emit
labels that are not in the table (0, 12, 26, ..., 201..249). Such ids have no ``Category``; each gets a
name of its own, ``class_<id>`` (``class_68``), so that tables grouped by name keep them apart, and
:func:`is_thing` still answers for them (see there). No COCO panoptic name has that form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["UNKNOWN_PREFIX", "Category", "categories", "category_by_id", "category_name", "is_thing"]

UNKNOWN_PREFIX = "class_"  # name of an id outside the table: class_<id>
_DATA_FILE = "data/coco_panoptic_categories.json"
_LAST_THING_ID = 90  # reference DETR: is_thing_map = {i: i <= 90 for i in range(201)}


@dataclass(frozen=True)
class Category:
    """One COCO panoptic category; ``color`` is the dataset's display colour as (r, g, b) in 0..255."""

    id: int
    name: str
    isthing: bool
    supercategory: str
    color: tuple[int, int, int]


@cache
def categories() -> tuple[Category, ...]:
    """The 133 categories in file order (ascending id), read once from the packaged JSON."""
    text = resources.files("model").joinpath(_DATA_FILE).read_text(encoding="utf-8")
    records = json.loads(text)
    table = tuple(
        Category(
            id=int(r["id"]),
            name=str(r["name"]),
            isthing=bool(r["isthing"]),
            supercategory=str(r["supercategory"]),
            color=(int(r["color"][0]), int(r["color"][1]), int(r["color"][2])),
        )
        for r in records
    )
    if len({c.id for c in table}) != len(table):
        raise ValueError(f"{_DATA_FILE}: duplicate category ids")
    return table


@cache
def _by_id() -> dict[int, Category]:
    return {c.id: c for c in categories()}


def category_by_id(category_id: int) -> Category | None:
    """The category with this id, or ``None`` for an id that is not one of the 133 (e.g. 0, 12, 201)."""
    return _by_id().get(int(category_id))


def category_name(category_id: int) -> str:
    """The category's name (``"person"``, ``"wall-other-merged"``), or ``"class_<id>"`` for an id not in the table
    (``category_name(68) == "class_68"``): one distinct name per id."""
    category = category_by_id(category_id)
    return f"{UNKNOWN_PREFIX}{int(category_id)}" if category is None else category.name


def is_thing(category_id: int) -> bool:
    """Whether a predicted label is a thing (instances kept apart) rather than stuff (merged per class).

    Follows reference DETR's ``is_thing_map = {i: i <= 90 for i in range(201)}``: every id in 0..90 is a
    thing, including ids with no category (0, 12, 26, ...), and 91..200 is stuff. The reference map has no
    entry above 200 and would raise ``KeyError``; here labels above 200 (the model's slots 201..249) and
    negative ids are stuff. For the 133 real categories this agrees with their ``isthing`` flag.
    """
    return 0 <= category_id <= _LAST_THING_ID
