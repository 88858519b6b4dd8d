"""Reading outputs back: the output's tables, one row per image, DuckDB views, COCO export, panoptic quality."""
