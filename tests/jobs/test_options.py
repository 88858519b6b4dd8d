"""`jobs/options.py`: options generated from dataclass fields, job files, and the dataclasses built back.

Checked on a small tree declared here (so that adding a field is seen to add an option, with nothing else
to change) and on the segment job's own tree.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from jobs.options import REQUIRED, Option, add_options, build, markdown_table, options, parse_values, read_job_file
from jobs.segment import OPTIONS
from model.config import check_literal_fields


@dataclass(frozen=True)
class Leaf:
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "a mode"})
    size: int = field(default=3, metadata={"help": "a size"})
    internal: float = 2.0  # no help: configuration, but no option

    def __post_init__(self) -> None:
        check_literal_fields(self)
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")


@dataclass(frozen=True)
class Root:
    names: tuple[str, ...] = field(metadata={"option": "name", "metavar": "N", "help": "names"})
    leaf: Leaf = field(default_factory=Leaf)
    ratio: float = field(default=0.5, metadata={"help": "a ratio"})
    label: str | None = field(default=None, metadata={"help": "a label"})
    fast: bool = field(default=False, metadata={"help": "go fast"})
    progress: bool = field(default=True, metadata={"option": "no-progress", "help": "no progress"})


def _parse(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="t")
    add_options(parser, options(Root))
    return parse_values(parser, options(Root), argv)


def test_fields_become_options() -> None:
    found = {o.name: o for o in options(Root)}
    assert list(found) == ["name", "mode", "size", "ratio", "label", "fast", "no-progress"]  # not "internal"
    assert found["name"] == Option("name", ("names",), "list", REQUIRED, "names", metavar="N")
    assert found["mode"].choices == ("a", "b") and found["mode"].path == ("leaf", "mode")
    assert found["label"].optional and found["label"].default is None
    assert found["no-progress"].negated and not found["fast"].negated


def test_flags_build_the_tree() -> None:
    values = _parse(["--name", "x", "--name", "y", "--mode", "b", "--size", "7", "--no-progress", "--fast"])
    assert build(Root, values) == Root(names=("x", "y"), leaf=Leaf(mode="b", size=7), fast=True, progress=False)
    assert build(Root, _parse(["--name", "x"])) == Root(names=("x",))  # the fields' own defaults


def test_a_new_field_is_a_new_option_with_nothing_else_to_change() -> None:
    @dataclass(frozen=True)
    class Grown(Root):
        retries: int = field(default=0, metadata={"help": "how often to retry"})

    parser = argparse.ArgumentParser(prog="t")
    add_options(parser, options(Grown))
    values = parse_values(parser, options(Grown), ["--name", "x", "--retries", "4"])
    assert build(Grown, values).retries == 4
    assert "--retries" in parser.format_help() and "| `--retries` | `0` | how often to retry |" in markdown_table(
        options(Grown)
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "c", "--name", "x"], "invalid choice: 'c'"),
        (["--size", "many", "--name", "x"], "invalid int value"),
        ([], "the following arguments are required: --name"),
        (["--name", "x", "--size", "0"], None),  # reaches __post_init__: see test_values_are_validated_once
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    if message is None:
        with pytest.raises(ValueError, match="size must be positive"):
            build(Root, _parse(argv))
        return
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_values_are_validated_once_whatever_their_source() -> None:
    with pytest.raises(ValueError, match="unknown mode 'c'; choose one of: a, b"):
        Leaf(mode="c")  # type: ignore[arg-type]


def test_job_file_values_and_overrides(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: [p, q]\nmode: b\nsize: 5\nratio: 1\nno-progress: true\nlabel: null\n")
    assert build(Root, _parse(["--config", str(job)])) == Root(
        names=("p", "q"), leaf=Leaf(mode="b", size=5), ratio=1.0, progress=False
    )
    # flags win over the file; a repeatable flag replaces the file's list
    assert build(Root, _parse(["--config", str(job), "--size", "9", "--name", "r"])) == Root(
        names=("r",), leaf=Leaf(mode="b", size=9), ratio=1.0, progress=False
    )
    job.write_text("name: one\nno_progress: false\n")  # a single string; underscores spelled either way
    assert build(Root, _parse(["--config", str(job)])) == Root(names=("one",), progress=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nsise: 3\n", "unknown option 'sise' (did you mean 'size'?)"),
        ("name: x\nsize: '3'\n", "size: expected an integer, got '3'"),
        ("name: x\nsize: true\n", "size: expected an integer, got True"),
        ("name: x\nmode: c\n", "mode: 'c' is not one of a, b"),
        ("name: x\nfast: 1\n", "fast: expected true or false, got 1"),
        ("name: [x, 3]\n", "name: expected a string or a list of strings"),
        ("- name\n", "expected a mapping of option names to values"),
        ("name: [x\n", "not valid YAML"),
    ],
)
def test_bad_job_files_exit_2_naming_the_key(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--config", str(job)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_job_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--config", str(tmp_path / "nope.yaml"), "--name", "x"])
    assert exit_info.value.code == 2
    assert "nope.yaml: cannot read it" in capsys.readouterr().err


def test_segment_options_are_unique_and_documented() -> None:
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    assert all(o.help.strip() for o in OPTIONS)
    assert read_job_file.__doc__ and "--config" not in names
