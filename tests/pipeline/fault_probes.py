"""Fault-test probes that watch a running job from outside: its Ray processes and its committed parts.

Processes are found through /proc (Linux) as descendants of a process the test started itself, never by
name across the machine: other Ray sessions may run beside the tests. Ray names an actor's worker process
``ray::<class name>`` (e.g. ``ray::MapWorker(MapBatches(BlockSegmenter))``), an idle one ``ray::IDLE``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.reading.output_tables import open_table, pin, snapshot_files

SEGMENTER_TITLE = "ray::MapWorker(MapBatches(BlockSegmenter))"


def descendants(root: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may contain spaces
        if fields[0] == "Z":  # a zombie has no command line and is already dead
            continue
        pid, parent = int(entry.name), int(fields[1])
        children.setdefault(parent, []).append(pid)
        commands[pid] = command
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = commands[pid]
        todo.extend(children.get(pid, []))
    return found


def segmenter_pids(root: int) -> set[int]:
    """PIDs of the `BlockSegmenter` actor processes below ``root`` (e.g. below a raylet)."""
    return {pid for pid, command in descendants(root).items() if command.startswith(SEGMENTER_TITLE)}


def committed_parts(output: Path) -> list[Path]:
    """The committed ``images`` parts of an output folder (hidden temporary files excluded)."""
    return sorted((output / "images").glob("part-*.parquet"))


def committed_ids(output: Path) -> list[str]:
    """Every image id in the committed ``images`` parts, duplicates kept."""
    return [
        i for part in committed_parts(output) for i in pq.read_table(part, columns=["image_id"])["image_id"].to_pylist()
    ]


def wait_for(predicate: Callable[[], object], *, timeout: float, what: str, poll: float = 0.05) -> object:
    """The first truthy value of ``predicate()``, polled until ``timeout`` seconds (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def assert_exactly_once(output: Path, expected: set[str]) -> None:
    """In the output's latest snapshot: every id in ``expected`` has one ``ok`` images row and no other ids have one;
    no (image_id, segment_id) twice; each ``num_segments`` matches the image's segment rows; every segments part
    has its images part, both in the folders."""
    out = pin(str(output))
    images = open_table(out, "images").to_table().to_pylist()
    ids = Counter(r["image_id"] for r in images)
    assert set(ids) == expected, f"missing {sorted(expected - set(ids))[:5]}, extra {sorted(set(ids) - expected)[:5]}"
    assert [i for i, n in ids.items() if n > 1] == []
    assert all(r["status"] == "ok" for r in images)
    segments = open_table(out, "segments").to_table(columns=["image_id", "segment_id"])
    pairs = Counter(zip(segments["image_id"].to_pylist(), segments["segment_id"].to_pylist()))
    assert [p for p, n in pairs.items() if n > 1] == []
    per_image = Counter(image_id for image_id, _ in pairs)
    assert {r["image_id"]: r["num_segments"] for r in images} == {i: per_image.get(i, 0) for i in expected}
    files = snapshot_files(out)
    assert [Path(p).name for p in files["segments"]] == [Path(p).name for p in files["images"]]
    assert all(Path(p).is_file() for table in files.values() for p in table)
