"""dvc.yaml's code deps are exact: each stage depends on every module its result depends on, no more.

A stage's modules are its entry module (cli.STAGES) and everything it imports, transitively, read
from the source: imports inside functions included, the modules registries import by name (a
string such as "diffrepro.models.dit"), and every module of a package that imports all of its own
(`pkgutil.iter_modules(__path__)`). The entry plumbing — cli.py, launch.py and
the docstring-only __init__.py of the package and of its stages — starts a stage but computes nothing in it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from diffrepro.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PLUMBING = {"diffrepro/cli.py", "diffrepro/launch.py", "diffrepro/__init__.py", "diffrepro/stages/__init__.py"}


def module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def imported(path: Path) -> set[str]:
    package = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    source = path.read_text()
    names: set[str] = set()
    if path.name == "__init__.py" and "pkgutil.iter_modules(__path__)" in source:
        names |= {f"{package}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("diffrepro."):
            names.add(node.value)  # importlib.import_module("diffrepro.<module>") in a registry
    return {n for n in names if n.split(".")[0] == "diffrepro"}


def closure(module: str) -> set[str]:
    """Repository-relative paths of `module` and of every diffrepro module it imports, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a module's packages run first
        path = module_file(name)
        if path is not None and path not in seen:
            seen.add(path)
            todo += imported(path)
    return {str(p.relative_to(SRC)) for p in seen} - PLUMBING


def stage_code_deps(stage: dict) -> list[str]:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return [d.removeprefix("src/") for d in deps if d.startswith("src/")]


def dvc_stages():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        command = stage["cmd"].split("python -m ", 1)[1].split()
        yield name, command, stage


def notebook_imports(path: Path) -> set[str]:
    """The diffrepro modules a notebook's code cells import (the figures stages run notebooks)."""
    cells = json.loads(path.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffrepro"):
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("diffrepro")}
    return names


def stage_modules(entry: str) -> set[str]:
    modules = closure(f"diffrepro.stages.{STAGES[entry][0]}")
    if entry == "figures":
        for notebook in (ROOT / "notebooks").glob("*.ipynb"):
            for name in notebook_imports(notebook):
                modules |= closure(name)
    return modules


@pytest.mark.parametrize("name, command, stage", list(dvc_stages()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_stage_depends_on_exactly_the_modules_it_runs(name, command, stage):
    entry = command[1]  # `diffrepro <stage>` or `diffrepro.launch <stage>`
    modules = stage_modules(entry)
    deps = stage_code_deps(stage)
    covered = {m for m in modules if any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps)}
    assert modules == covered, f"{name}: add to deps: {sorted(modules - covered)}"
    unused = [d for d in deps if not any(m == d or m.startswith(d.rstrip("/") + "/") for m in modules)]
    assert not unused, f"{name}: deps it does not run: {unused}"
    for d in deps:  # a folder dep is only exact when the stage runs all of it
        folder = SRC / d
        if folder.is_dir():
            files = {str(p.relative_to(SRC)) for p in folder.rglob("*.py")}
            assert files <= modules, f"{name}: {d} holds modules it does not run: {sorted(files - modules)}"


def test_a_sampling_param_reruns_that_runs_sampling_and_scoring_only(smoke_repo, tmp_path):
    """The README's first ablation, `-S runs.finediffusion.guidance_scale=...`: no retraining."""
    from diffrepro.profiles import compose
    from pipeline_repo import copy_repo, run

    repo = copy_repo(smoke_repo, tmp_path / "repo")
    params = compose("smoke", ("runs.finediffusion.guidance_scale=5.0",), conf_dir=repo / "conf")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(run(repo, "dvc", "status", "--json").stdout)
    assert set(changed) == {"sample@finediffusion", "evaluate@finediffusion", "report"}, changed


def test_the_committed_lock_holds_exactly_the_stages_dvc_yaml_defines():
    """DVC never prunes dvc.lock: a run or stage removed from the default would stay locked (and be
    tabulated as 'no record' by the benchmarks) until the lock is rebuilt."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        defined = {stage.addressing for stage in repo.index.stages}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked == defined, f"locked, not defined: {sorted(locked - defined)}; defined, not locked: " \
                              f"{sorted(defined - locked)}"
