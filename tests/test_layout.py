"""The architecture stays as the README draws it: dependencies run `jobs -> pipeline -> model`, only
`pipeline/` and `jobs/` import Ray, and every module says what it is in a docstring."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level names its modules must not import
FORBIDDEN = {
    "model": {"ray", "pipeline", "jobs"},
    "pipeline": {"jobs"},
}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_run_one_way(package: str) -> None:
    modules = _modules(package)
    assert len(modules) >= 5  # the package was found
    offending = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN[package])
        for path in modules
        if _imported_roots(path) & FORBIDDEN[package]
    }
    assert offending == {}


@pytest.mark.parametrize("package", ["model", "pipeline", "jobs"])
def test_every_module_has_a_docstring(package: str) -> None:
    missing = [
        str(path.relative_to(ROOT))
        for path in _modules(package)
        if path.name != "__init__.py" and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert missing == []


def test_cpu_stages_never_import_torch() -> None:
    """Ray workers import a stage function's module: the resume plan's stages (inspecting committed parts,
    their rows, manifest lines, the decision, retractions; `pipeline.exactly_once.resume` which wires them) and the
    commit protocol live in modules without torch (each worker would otherwise pay ~4 s
    of CPU and ~300 MB for an import it never uses); only the model actor loads it."""
    import subprocess
    import sys

    from pipeline.exactly_once import commit, inspection, resume_decision, retraction
    from pipeline.inputs import sources

    stages = [inspection.inspect_parts, inspection.committed_rows, retraction.retraction_rows, sources.manifest_rows,
              commit.OutputCommitter.write_part, commit.OutputCommitter.retract,
              resume_decision.decide_file_keys, resume_decision.group_shards]  # fmt: skip
    modules = sorted({f.__module__ for f in stages} | {"pipeline.exactly_once.resume"})
    assert modules == ["pipeline.exactly_once.commit", "pipeline.exactly_once.inspection",
                       "pipeline.exactly_once.resume", "pipeline.exactly_once.resume_decision",
                       "pipeline.exactly_once.retraction", "pipeline.inputs.sources"]  # fmt: skip
    probe = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# jobs/: the command modules (one per `panoptic-flow` command, `jobs.cli.COMMANDS`) and the shared helpers of
# the command line (`cli` dispatches, `options` generates options, `segment_options` declares segment's,
# `snapshot_options` the readers' choice of snapshot, `usage` is the exit-code convention, `overlay` draws results
# for show). Anything two commands share lives in a helper or in pipeline/.
JOBS_HELPERS = {"jobs.cli", "jobs.options", "jobs.overlay", "jobs.segment_options", "jobs.snapshot_options"}
JOBS_HELPERS |= {"jobs.usage"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from jobs import query`
    return names


def test_no_command_imports_another_command() -> None:
    from jobs.cli import COMMANDS

    commands = {module for module, _ in COMMANDS.values()}
    jobs_modules = {f"jobs.{p.stem}" for p in _modules("jobs") if p.name != "__init__.py"}
    assert jobs_modules == commands | JOBS_HELPERS  # a new module in jobs/ is declared one or the other
    offending = {
        f"jobs/{p.name}": sorted(_imported_modules(p) & (commands - {f"jobs.{p.stem}"}))
        for p in _modules("jobs")
        if _imported_modules(p) & (commands - {f"jobs.{p.stem}"}) and f"jobs.{p.stem}" != "jobs.cli"
    }
    assert offending == {}  # jobs.cli imports commands by name (importlib), never statically either
    helper_imports = {
        f"jobs/{p.name}": sorted(_imported_modules(p) & commands) for p in _modules("jobs") if p.stem == "cli"
    }
    assert helper_imports == {"jobs/cli.py": []}


def _package_imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that ``path`` imports, at any depth (lazy imports count: they run too), except
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == package:  # `from pipeline import resume`
                names.update(f"{package}.{alias.name}" for alias in node.names)
            elif node.module.startswith(f"{package}."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith(f"{package}."))
    return names


def _a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> modules it imports), or [] when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("package", ["model", "pipeline", "jobs"])
def test_no_package_has_an_import_cycle(package: str) -> None:
    modules = {f"{package}.{p.stem}": p for p in _modules(package) if p.name != "__init__.py"}
    graph = {name: _package_imports(path, package) & set(modules) for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 5  # imports were found
    assert _a_cycle(graph) == []


def test_the_readmes_module_map_names_every_pipeline_module_in_its_folder() -> None:
    """README's "Development" map groups `pipeline/` as the folders do: each module is named in its folder's
    entry (a module moved or added without the map fails here)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("\npipeline/   ") : text.index("\njobs/       ")]
    entries = re.split(r"\n  (\w+)/ +", block)  # [top level, folder, its text, folder, its text, ...]
    folders = {"": entries[0], **dict(zip(entries[1::2], entries[2::2]))}
    package = ROOT / "pipeline"
    assert set(folders) == {""} | {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    missing = {
        folder or "pipeline": sorted(
            m.stem
            for m in (package / folder).glob("*.py")
            if m.stem != "__init__" and not re.search(rf"\b{m.stem}\b", words)
        )
        for folder, words in folders.items()
    }
    assert missing == {key: [] for key in missing}


def test_the_job_driver_never_imports_torch() -> None:
    """The segment job's driver plans, commits and reports without the model: importing torch (and torchvision)
    cost every job ~5 s before its first line of work. Only the model actors, and a driver checking real weights
    (`pipeline.segmenting.weights`), load it."""
    import subprocess
    import sys

    probe = (
        "import sys; import jobs.segment, jobs.cli, pipeline.run, model.checkpoint_source; "
        "from jobs.segment import main; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
