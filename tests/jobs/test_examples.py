"""Every example command in README.md, the Makefile, cluster.yaml and jobs/k8s/ parses with the real parser,
and every example meant for a cluster requests GPUs (`--device cuda`).

The commands are extracted from the files themselves: README's ``bash`` blocks, the Makefile's recipes,
the YAML files' comments and the RayJob's ``entrypoint``. On a cluster whose GPU workers start at zero,
``--device auto`` sees no GPU at start and runs CPU actors: the GPUs never start.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import COMMANDS
from jobs.segment import parse_job

ROOT = Path(__file__).resolve().parents[2]
MODULES = {module: name for name, (module, _) in COMMANDS.items()}  # "jobs.segment" -> "segment"
CLUSTER_FILES = ("cluster.yaml", "jobs/k8s/raycluster.yaml", "jobs/k8s/rayjob.yaml")
# A line that starts a command (prose that merely names one does not)
COMMAND_START = re.compile(
    rf"^\s*(ray job submit\b|\S*(python\S*|\$\(PY\))\s+-m\s+jobs\.|\S*panoptic-flow\s+({'|'.join(COMMANDS)})\b)"
)
SHELL_OPERATORS = {";", "&&", "||", "|", ">", ">>", "2>", "&"}


def logical_lines(text: str) -> list[str]:
    """The command lines of ``text`` (those that run panoptic-flow or ``ray job submit``), with backslash
    continuations joined and quotes that span lines (SQL) kept together; other lines (prose) are skipped."""
    lines: list[str] = []
    pending: str | None = None
    joiner = " "
    for raw in text.splitlines():
        if pending is None and not COMMAND_START.search(raw):
            continue
        pending = raw if pending is None else pending + joiner + raw
        if pending.rstrip().endswith("\\"):
            pending, joiner = pending.rstrip()[:-1], " "
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the argument goes on on the next line
            joiner = "\n"
            continue
        lines.append(pending)
        pending = None
    assert pending is None, f"unterminated command: {pending!r}"
    return lines


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """``(command, argv)`` of each panoptic-flow command in one shell line (``python -m jobs.X`` or
    ``panoptic-flow X``); the argv stops at a shell operator."""
    tokens = shlex.split(line, comments=True)
    found = []
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1] in MODULES:
            command, rest = MODULES[tokens[i + 1]], tokens[i + 2 :]
        elif Path(token).name == "panoptic-flow" and tokens[i + 1] in COMMANDS:
            command, rest = tokens[i + 1], tokens[i + 2 :]
        else:
            continue
        stop = next((k for k, t in enumerate(rest) if t in SHELL_OPERATORS), len(rest))
        found.append((command, rest[:stop]))
    return found


def _comments(text: str) -> str:
    """The YAML comment lines of ``text``, without their ``#``."""
    return "\n".join(re.sub(r"^\s*#\s?", "", line) for line in text.splitlines() if line.lstrip().startswith("#"))


def _readme_shell() -> str:
    readme = (ROOT / "README.md").read_text()
    return "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL))


def _makefile_recipes() -> str:
    return "\n".join(line.strip() for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("\t"))


def examples() -> list[tuple[str, str, list[str], bool]]:
    """``(where, command, argv, on_a_cluster)`` of every example."""
    found = []
    sources = [("README.md", _readme_shell()), ("Makefile", _makefile_recipes())]
    sources += [(name, _comments((ROOT / name).read_text())) for name in CLUSTER_FILES]
    rayjob = yaml.safe_load((ROOT / "jobs/k8s/rayjob.yaml").read_text())
    sources.append(("jobs/k8s/rayjob.yaml entrypoint", rayjob["spec"]["entrypoint"]))
    for where, text in sources:
        for line in logical_lines(text):
            submitted = bool(re.search(r"\bray job submit\b", line))
            for command, argv in invocations(line):
                found.append((where, command, argv, submitted or where.startswith(CLUSTER_FILES)))
    return found


EXAMPLES = examples()


def test_examples_are_found_everywhere() -> None:
    places = {where.split()[0] for where, *_ in EXAMPLES}
    assert places == {"README.md", "Makefile", *CLUSTER_FILES}
    commands = {command for _, command, _, _ in EXAMPLES}
    assert commands == set(COMMANDS)  # README shows every command
    assert sum(cluster for *_, cluster in EXAMPLES) >= 4  # README's `ray job submit`, cluster.yaml, k8s (2)


@pytest.mark.parametrize(
    ("where", "command", "argv", "on_a_cluster"),
    EXAMPLES,
    ids=[f"{where}:{command}:{i}" for i, (where, command, *_) in enumerate(EXAMPLES)],
)
def test_example_parses_with_the_real_parser(where: str, command: str, argv: list[str], on_a_cluster: bool) -> None:
    if command != "segment":
        module = importlib.import_module(COMMANDS[command][0])
        module._parser().parse_args(argv)  # SystemExit on a misspelt or missing argument
        return
    config, _ = parse_job(argv)  # the flags, and the values through the config's own validation
    if on_a_cluster:
        assert config.resources.device == "cuda", f"{where}: GPU workers start at zero; request them: --device cuda"


def test_extraction_sees_continued_lines_and_comments() -> None:
    text = "#   ray job submit -- python -m jobs.segment \\\n#       --input a --output b \\\n#       --device cuda\n"
    ((command, argv),) = invocations(logical_lines(_comments(text))[0])
    assert (command, argv) == ("segment", ["--input", "a", "--output", "b", "--device", "cuda"])
    sql = 'panoptic-flow query out "SELECT 1\n  FROM t" --format csv  # comment'
    assert invocations(logical_lines(sql)[0]) == [("query", ["out", "SELECT 1\n  FROM t", "--format", "csv"])]


def test_readme_job_files_parse(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert blocks
    for k, block in enumerate(blocks):
        job = tmp_path / f"job{k}.yaml"
        job.write_text(block)
        config, _ = parse_job(["--config", str(job)])
        assert config.resources.device == "cuda"  # a cluster job: it requests GPUs
