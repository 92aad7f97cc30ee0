"""No stage output can go stale: every project module a DVC stage's command runs (found by following the imports
in the code, from the `tim` command the stage calls) lies under one of that stage's deps in dvc.yaml."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "tim_core")


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Project modules named by every import statement in ``tree`` (top level or inside functions)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            names.add(parent)
            # `from package import module` imports a module, not only a name.
            names.update(f"{parent}.{alias.name}" for alias in node.names if module_file(f"{parent}.{alias.name}"))
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}


def reached_files(roots: set[str]) -> set[Path]:
    """Files of every project module reachable from ``roots``, with the packages they live in."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a module runs its packages
        path = module_file(name)
        todo += imported_modules(ast.parse(path.read_text()), name, path.name == "__init__.py")
    return {module_file(n) for n in seen}


def command_roots() -> dict[str, set[str]]:
    """`tim` command name -> the project modules its function in components/cli.py imports (plus cli.py's own
    top-level imports); cli.py itself is counted by the test, not walked (its other commands import more)."""
    tree = ast.parse((REPO / "components" / "cli.py").read_text())
    top = imported_modules(ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                                      type_ignores=[]), "components.cli", False)
    commands = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "command":
                name = deco.args[0].value if deco.args else node.name.replace("_", "-")
                # Helpers the command calls (tracking(), source()) import too: follow calls to cli functions.
                called = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                helpers = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in called]
                roots = set(top)
                for fn in [node, *helpers]:
                    roots |= imported_modules(fn, "components.cli", False)
                commands[name] = roots
    return commands


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_runs_a_tim_command():
    commands = command_roots()
    for name, stage in STAGES.items():
        words = stage["cmd"].split()
        assert words[0] == "tim" and words[1] in commands, f"{name}: {stage['cmd']!r} is not a `tim` command"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage):
    command = STAGES[stage]["cmd"].split()[1]
    deps = [REPO / d for d in STAGES[stage]["deps"]]
    missing = sorted(
        str(path.relative_to(REPO)) for path in reached_files(command_roots()[command]) | {REPO / "components/cli.py"}
        if path.read_text().strip()  # an empty __init__.py holds no code that could change an output
        and not any(path == dep or dep in path.parents for dep in deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs code that is not among its deps: {missing}"
