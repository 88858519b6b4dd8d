"""`panoptic-flow segment`'s command line: every option reaches its field from a flag or a job file, every
option is documented (in ``--help`` and, identically, in the README), and ``--help`` loads neither torch
nor Ray (it took ~7-8 s on this machine when it did)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import COMMANDS
from jobs.options import Option, markdown_table
from jobs.segment import OPTIONS, RunOptions, main, parse_job
from pipeline.config import InputConfig, JobConfig

ROOT = Path(__file__).resolve().parents[2]


def _sample_value(option: Option) -> Any:
    """A valid value for ``option`` that differs from its default."""
    if option.kind == "bool":
        return not option.default
    if option.choices:
        return next(c for c in reversed(option.choices) if c != option.default)
    if option.kind == "list":
        return [f"{option.name}-a", f"{option.name}-b"]
    if option.kind == "int":
        return option.default + 1 if option.default is not None else 3  # min_size 801 <= max_size 1334, min_actors
        # 2 <= max_actors 3 (unset by default)
    if option.kind == "float":
        return option.default / 2 if option.default is not None else 3.0  # e.g. --cpus-per-actor (unset)
    return f"{option.name}-value"


def _field(root: object, path: tuple[str, ...]) -> Any:
    for name in path:
        root = getattr(root, name)
    return root


def _argv(values: dict[Option, Any]) -> list[str]:
    argv: list[str] = []
    for option, value in values.items():
        if option.kind == "bool":
            argv.append(option.flag)  # the switch flips the default
        elif option.kind == "list":
            for item in value:
                argv += [option.flag, item]
        else:
            argv += [option.flag, str(value)]
    return argv


def test_every_option_reaches_its_field_from_a_flag_and_from_a_job_file(tmp_path: Path) -> None:
    values = {o: _sample_value(o) for o in OPTIONS}
    from_flags = parse_job(_argv(values))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({o.name: (True if o.kind == "bool" else v) for o, v in values.items()}))
    from_file = parse_job(["--config", str(job)])
    assert from_flags == from_file
    config, run = from_flags
    for option, value in values.items():
        root = run if option.path[0] in RunOptions.__dataclass_fields__ else config
        expected = tuple(value) if option.kind == "list" else value
        assert _field(root, option.path) == expected, option.name


def test_defaults_are_the_dataclass_defaults() -> None:
    assert parse_job(["--input", "in/", "--output", "out/"]) == (JobConfig(InputConfig(("in/",)), "out/"), RunOptions())


def test_flags_override_the_job_file(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input: [s3://b/images/]\noutput: s3://b/run/\ndevice: cuda\nmax-actors: 16\nno-progress: true\n")
    config, run = parse_job(["--config", str(job), "--max-actors", "4"])
    assert config.input.uris == ("s3://b/images/",) and config.output == "s3://b/run/"
    assert (config.resources.device, config.resources.max_actors) == ("cuda", 4)
    assert run == RunOptions(show_progress=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input: [x]\noutput: o\nmax-actor: 2\n", "unknown option 'max-actor' (did you mean 'max-actors'?)"),
        (
            "input: [x]\noutput: o\nmin-actors: 3\nmax-actors: 2\n",
            "error: --min-actors: need 1 <= --min-actors <= --max-actors",
        ),
        ("input: [x]\n", "the following arguments are required: --output"),
    ],
)
def test_bad_job_files_are_one_line_and_exit_2(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(job)])  # before any cluster work: no Ray here
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "usage:" not in err[0]


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    import importlib

    parsers = {}
    for name, (module, _) in COMMANDS.items():
        job = importlib.import_module(module)
        parsers[name] = job.build_parser() if hasattr(job, "build_parser") else job._parser()
    return parsers


def test_every_option_of_every_command_has_help() -> None:
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in _command_parsers().items()
        for action in parser._actions
        if not (action.help or "").strip()
    ]
    assert undocumented == []


def test_readme_option_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| option | default | meaning |")
    table = readme[start : readme.index("\n\n", start) + 1]
    assert table == markdown_table(OPTIONS), "regenerate it with: python -m jobs.segment_options"
    assert "`--no-progress`" in table


_PROBE = """
import json, sys
from jobs.cli import main
try:
    main([sys.argv[1], "--help"])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in ("torch", "ray", "torchvision") if m in sys.modules)))
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_loads_neither_torch_nor_ray(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, command], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("usage: panoptic-flow")
    assert json.loads(lines[-1]) == []
