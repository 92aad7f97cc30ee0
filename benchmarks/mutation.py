"""Mutation check of tim_core's transports.py, objective.py and sampler.py against tests/core (a benchmark,
not run in CI). A small AST mutator (no dependency): each mutant changes one operator or constant, is written
into a throw-away copy of the project, and the core tests run on it; a mutant the tests do not fail "survives".

  .venv/bin/python benchmarks/mutation.py [--per-file 20] [--seed 0] [--jobs 2] [--out benchmarks/results/mutation.md]
  .venv/bin/python benchmarks/mutation.py --sites transports.py:212,objective.py:68   # re-check given mutants

--sites runs only the named mutants (FILE:SITE, the "site" column of the results table; FILE a target's name or
path) and prints a markdown table of them with the first failing test of each killed one; the results file is
left as it is.

Operators: comparison flips (< <=, > >=, == !=), arithmetic swaps (+ -, * /), a numeric constant changed
(0 <-> 1, n -> n + 1, x -> 2x for floats), True <-> False, a unary minus dropped. Mutants are sampled (the
full set takes hours on 2 cores): --per-file of each file, seeded. The test run per mutant uses the fast core
tests (test_transports, test_objective, test_sampler, test_model; test_learning trains for 30 s and is left out)
with -x and a 120 s limit (--timeout; a timeout counts as killed: the mutant made the code hang, or the machine
is too loaded for the limit, so raise it there).
"""

from __future__ import annotations

import argparse
import ast
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["tim_core/transports.py", "tim_core/objective.py", "tim_core/sampler.py"]
TESTS = ["tests/core/test_transports.py", "tests/core/test_objective.py", "tests/core/test_sampler.py",
         "tests/core/test_model.py"]
SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


@dataclass
class Mutant:
    file: str
    index: int       # the n-th mutation site of the file
    line: int
    change: str
    status: str = ""
    seconds: float = 0.0
    failure: str = ""  # the first FAILED line of a killed mutant's test run


class Sites(ast.NodeTransformer):
    """Walks the tree; at site ``target`` applies the mutation and records it (target -1: only count)."""

    def __init__(self, target: int = -1):
        self.count, self.target, self.done = 0, target, None

    def _site(self, node, change: str, apply) -> ast.AST:
        if self.count == self.target:
            self.done = (node.lineno, change)
            node = apply()
        self.count += 1
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        op = type(node.ops[0])
        if op in SWAP:
            def apply():
                node.ops[0] = SWAP[op]()
                return node
            return self._site(node, f"{op.__name__} -> {SWAP[op].__name__}", apply)
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        op = type(node.op)
        if op in SWAP:
            def apply():
                node.op = SWAP[op]()
                return node
            return self._site(node, f"{op.__name__} -> {SWAP[op].__name__}", apply)
        return node

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            return self._site(node, f"{v} -> {not v}", lambda: ast.copy_location(ast.Constant(not v), node))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            new = 1 if v == 0 else (v + 1 if isinstance(v, int) else v * 2)
            return self._site(node, f"{v!r} -> {new!r}", lambda: ast.copy_location(ast.Constant(new), node))
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.USub):
            return self._site(node, "-x -> x", lambda: node.operand)
        return node


def skip_docstrings(tree: ast.Module) -> ast.Module:
    """Remove docstrings (their constants are not code); annotations are kept: they hold no numbers here."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                del body[0]  # removed, not replaced: `from __future__` must stay the first statement
                if not body:
                    body.append(ast.Pass())
    return tree


def sites(file: str) -> int:
    walker = Sites()
    walker.visit(skip_docstrings(ast.parse((REPO / file).read_text())))
    return walker.count


def mutated_source(file: str, index: int) -> tuple[str, int, str]:
    walker = Sites(index)
    tree = walker.visit(skip_docstrings(ast.parse((REPO / file).read_text())))
    ast.fix_missing_locations(tree)
    return ast.unparse(tree), *walker.done


def site(spec: str, totals: dict[str, int]) -> tuple[str, int, int, str]:
    """"objective.py:68" (or "tim_core/objective.py:68") -> the Mutant fields (file, index, line, change)."""
    name, _, index = spec.strip().rpartition(":")
    files = [f for f in TARGETS if name in (f, Path(f).name)]
    if not files or not index.isdigit() or int(index) >= totals[files[0]]:
        sys.exit(f"bad site {spec!r}: FILE:SITE with FILE one of {', '.join(TARGETS)} and SITE below its count "
                 f"({', '.join(f'{Path(f).name} {n}' for f, n in totals.items())})")
    return files[0], int(index), 0, ""


def run_mutant(m: Mutant, timeout_s: float) -> Mutant:
    with tempfile.TemporaryDirectory(prefix="tim-mutant-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "tim_core", root / "tim_core")
        shutil.copytree(REPO / "tests" / "core", root / "tests" / "core")
        (root / "tests" / "__init__.py").write_text("")
        shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
        if m.index < 0:  # the null mutant: the unparsed but unchanged file, in the same throw-away layout
            source, m.line, m.change = ast.unparse(skip_docstrings(ast.parse((REPO / m.file).read_text()))), 0, "none"
        else:
            source, m.line, m.change = mutated_source(m.file, m.index)
        (root / m.file).write_text(source)
        start = time.monotonic()
        try:
            res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                                 cwd=root, capture_output=True, text=True, timeout=timeout_s)
            m.status = "survived" if res.returncode == 0 else "killed"
            m.failure = next((line for line in res.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))),
                             "")
        except subprocess.TimeoutExpired:
            m.status = "killed (timeout)"
        m.seconds = time.monotonic() - start
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-file", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--sites", nargs="+", help="FILE:SITE mutants to run, comma- or space-separated (re-check)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mutation.md")
    args = ap.parse_args()

    # Unmutated code must pass, else every mutant would look killed.
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    if baseline.returncode != 0:
        sys.exit(f"the core tests fail on unmutated code:\n{baseline.stdout[-2000:]}")

    rng = random.Random(args.seed)
    totals = {f: sites(f) for f in TARGETS}
    if args.sites:
        chosen = [Mutant(*site(spec, totals)) for item in args.sites for spec in item.split(",") if spec]
    else:
        chosen = [Mutant(f, i, 0, "") for f in TARGETS
                  for i in sorted(rng.sample(range(totals[f]), min(args.per_file, totals[f])))]
    # The copy layout and the unparsed sources must pass too, else "killed" would mean nothing.
    nulls = [run_mutant(Mutant(f, -1, 0, ""), args.timeout) for f in TARGETS if f in {m.file for m in chosen}]
    if any(m.status != "survived" for m in nulls):
        sys.exit(f"unmutated code fails in the mutant layout: {[(m.file, m.status) for m in nulls]}")
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda m: run_mutant(m, args.timeout), chosen))
    wall = time.monotonic() - start
    for m in done:
        print(f"{m.status:>16}  {m.file}:{m.line}  (site {m.index}) {m.change}  {m.seconds:.0f} s", flush=True)
    killed = sum(m.status.startswith("killed") for m in done)
    if args.sites:
        names = ",".join(f"{Path(m.file).name}:{m.index}" for m in done)
        print(f"\n`.venv/bin/python benchmarks/mutation.py --sites {names}`: {killed}/{len(done)} killed, "
              f"{wall / 60:.1f} min on {args.jobs} workers.\n")
        print("| status | where | site | change | first failing test |\n|---|---|---|---|---|")
        for m in done:
            print(f"| {m.status} | `{m.file}:{m.line}` | {m.index} | `{m.change}` | {m.failure[:160]} |")
        return
    lines = [
        "# Mutation check of tim_core (transports, objective, sampler) against tests/core",
        "",
        f"`.venv/bin/python benchmarks/mutation.py --per-file {args.per_file} --seed {args.seed}`: "
        f"{len(done)} mutants sampled from {sum(totals.values())} sites "
        f"({', '.join(f'{Path(f).name} {n}' for f, n in totals.items())}); tests: {', '.join(TESTS)}; "
        f"{wall / 60:.1f} min on {args.jobs} workers.",
        "",
        f"**Mutation score: {killed}/{len(done)} = {killed / max(len(done), 1):.0%} killed.**",
        "",
        "| status | where | site | change |",
        "|---|---|---|---|",
        *[f"| {m.status} | `{m.file}:{m.line}` | {m.index} | `{m.change}` |" for m in done],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"score {killed}/{len(done)}; written {args.out}")


if __name__ == "__main__":
    main()
