#!/usr/bin/env python3
"""make mutants: plant one small bug at a time in packdebug.py; list the ones no test notices.

1. Coverage: the suite runs once (harness tests aside) with a profiler in
   every Python process it starts (a sitecustomize on PYTHONPATH), which
   records, per test, the packdebug functions that ran.
2. Mutants: ast edits of packdebug.py, one at a time -- a comparison
   flipped, `and`/`or` swapped, a `& mask` dropped, a `not` dropped, a
   constant moved by one, an early `return` -- spread over every part.
3. Each mutant is copied with the tests into a scratch directory, and the
   tests that ran its function run against it (pytest -x).  A mutant whose
   tests all pass survived; the report lists them and the survival rate.

    python3 tests/mutants.py [--max N] [--jobs J] [--seed S] [--only NAME]
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import copy
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
import typing

HERE = pathlib.Path(__file__).resolve().parent.parent
SOURCE = HERE / "packdebug.py"

SITECUSTOMIZE = """
import atexit, itertools, json, os, sys, threading
_trace = os.environ.get("MUTANTS_TRACE")
_seen = set()
_files = itertools.count()


def flush(test):
    # The first lines of the packdebug functions that ran, for this test.
    if _trace and test and _seen:
        with open(os.path.join(_trace, f"{os.getpid()}-{next(_files)}.json"), "w") as f:
            f.write(json.dumps([test, sorted(_seen)]))
    _seen.clear()


if _trace:
    def _profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith("packdebug.py"):
            _seen.add(frame.f_code.co_firstlineno)

    sys.setprofile(_profile)
    threading.setprofile(_profile)
    atexit.register(lambda: flush(os.environ.get("MUTANTS_TEST", "")))
"""

PLUGIN = """
import os
import sitecustomize


def pytest_runtest_setup(item):
    sitecustomize.flush("")  # what ran between tests belongs to none
    os.environ["MUTANTS_TEST"] = item.nodeid


def pytest_runtest_teardown(item):
    sitecustomize.flush(item.nodeid)
"""


def functions(tree: ast.Module) -> dict[int, str]:
    """First line (of the def, as co_firstlineno says) -> qualified name."""
    names = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = (
                    child.decorator_list[0].lineno
                    if child.decorator_list
                    else child.lineno
                )
                names[first] = prefix + child.name
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(tree, "")
    return names


def coverage(work: pathlib.Path, snapshot: pathlib.Path) -> dict[str, set[str]]:
    """{function name: node ids of the tests that ran it}, from one run of the suite."""
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (site / "mutants_plugin.py").write_text(PLUGIN)
    trace = work / "trace"
    trace.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{site}:{snapshot}",
        "MUTANTS_TRACE": str(trace),
        "PACKDEBUG_HARNESS_TESTS": "0",
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "mutants_plugin",
        "test_packdebug.py",
    ]
    subprocess.run(
        command, cwd=snapshot, env=env, check=False, stdout=subprocess.DEVNULL
    )
    names = functions(ast.parse((snapshot / "packdebug.py").read_text()))
    covered: dict[str, set[str]] = collections.defaultdict(set)
    for path in trace.glob("*.json"):
        test, lines = json.loads(path.read_text())
        for line in lines:
            if line in names:
                covered[names[line]].add(test)
    return covered


class Mutator(ast.NodeTransformer):
    """Applies mutation number `target` of a function, counting candidates on the way."""

    FLIP: typing.ClassVar[dict] = {
        ast.Lt: ast.GtE,
        ast.GtE: ast.Lt,
        ast.Gt: ast.LtE,
        ast.LtE: ast.Gt,
        ast.Eq: ast.NotEq,
        ast.NotEq: ast.Eq,
        ast.In: ast.NotIn,
        ast.NotIn: ast.In,
        ast.Is: ast.IsNot,
        ast.IsNot: ast.Is,
    }

    def __init__(self, target: int = -1) -> None:
        self.target, self.count, self.description = target, 0, ""

    def _hit(self, description: str) -> bool:
        hit = self.count == self.target
        self.count += 1
        if hit:
            self.description = description
        return hit

    def visit_Compare(self, node):
        self.generic_visit(node)
        op = node.ops[0]
        if type(op) in self.FLIP and self._hit(
            f"line {node.lineno}: flip {type(op).__name__}"
        ):
            node.ops = [self.FLIP[type(op)]()] + node.ops[1:]
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        if self._hit(f"line {node.lineno}: swap {type(node.op).__name__}"):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        mask = isinstance(node.op, ast.BitAnd) and isinstance(node.right, ast.Constant)
        if mask and self._hit(f"line {node.lineno}: drop & {node.right.value:#o}"):
            return node.left
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._hit(f"line {node.lineno}: drop not"):
            return node.operand
        return node

    def visit_Constant(self, node):
        if (
            type(node.value) is int
            and node.value not in (0, 1)
            and self._hit(f"line {node.lineno}: {node.value} -> {node.value + 1}")
        ):
            return ast.copy_location(ast.Constant(node.value + 1), node)
        return node

    def visit_Return(self, node):
        self.generic_visit(node)
        returns_none = node.value is None or (
            isinstance(node.value, ast.Constant) and node.value.value is None
        )
        if not returns_none and self._hit(f"line {node.lineno}: return None"):
            return ast.copy_location(ast.Return(ast.Constant(None)), node)
        return node


def mutants(
    tree: ast.Module, covered: dict, rng: random.Random, limit: int
) -> list[tuple[str, int, str]]:
    """(function, mutation number, description) of up to `limit` mutants, spread over the file."""
    names = functions(tree)
    candidates = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = (
                node.decorator_list[0].lineno if node.decorator_list else node.lineno
            )
            name = names.get(first)
            if name not in covered:
                continue
            counter = Mutator()  # counts as apply() mutates: the body only
            for statement in copy.deepcopy(node.body):
                counter.visit(statement)
            candidates += [(name, i) for i in range(counter.count)]
    rng.shuffle(candidates)
    chosen = sorted(candidates[:limit])
    out = []
    for name, number in chosen:
        _, description = apply(tree, name, number)
        out.append((name, number, description))
    return out


def apply(tree: ast.Module, name: str, number: int) -> tuple[str, str]:
    """The source with mutation `number` of function `name` applied."""
    tree = copy.deepcopy(tree)
    names = functions(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = (
                node.decorator_list[0].lineno if node.decorator_list else node.lineno
            )
            if names.get(first) == name:
                mutator = Mutator(number)
                body = [mutator.visit(statement) for statement in node.body]
                node.body = [s for s in body if s is not None]
                ast.fix_missing_locations(tree)
                return ast.unparse(tree), mutator.description
    raise KeyError(name)


def run_mutant(
    work: pathlib.Path, index: int, source: str, tests: list[str], timeout: float
) -> str:
    """'killed', 'survived' or 'timeout' for one mutant."""
    scratch = work / f"m{index}"
    shutil.copytree(work / "snapshot", scratch)
    (scratch / "packdebug.py").write_text(source)
    env = {**os.environ, "PACKDEBUG_HARNESS_TESTS": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        *tests,
    ]
    try:
        result = subprocess.run(
            command,
            cwd=scratch,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        outcome = "survived" if result.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        outcome = "timeout"  # an infinite loop is noticed too
    shutil.rmtree(scratch, ignore_errors=True)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max", type=int, default=150, help="mutants to try (default 150)"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--only", help="only mutants of this function")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="packdebug-mutants.") as tmp:
        work = pathlib.Path(tmp)
        snapshot = work / "snapshot"  # the code and tests as they are now
        shutil.copytree(HERE / "tests", snapshot / "tests")
        shutil.copy(HERE / "test_packdebug.py", snapshot)
        shutil.copy(SOURCE, snapshot)
        start = time.monotonic()
        covered = coverage(work, snapshot)
        tree = ast.parse((snapshot / "packdebug.py").read_text())
        print(
            f"coverage: {len(covered)} functions ran under the tests ({time.monotonic() - start:.0f} s)"
        )
        if args.only:
            covered = {k: v for k, v in covered.items() if k == args.only}
        chosen = mutants(tree, covered, random.Random(args.seed), args.max)
        outcomes: collections.Counter = collections.Counter()
        survivors = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {}
            for index, (name, number, description) in enumerate(chosen):
                source, _ = apply(tree, name, number)
                tests = sorted(covered[name])
                futures[
                    pool.submit(run_mutant, work, index, source, tests, args.timeout)
                ] = (name, description)
            for future in concurrent.futures.as_completed(futures):
                name, description = futures[future]
                outcome = future.result()
                outcomes[outcome] += 1
                if outcome == "survived":
                    survivors.append(f"{name}: {description}")
                print(f"  {outcome:<8} {name}: {description}", flush=True)
    total = sum(outcomes.values())
    print(
        f"\n{total} mutants: {outcomes['killed']} killed, {outcomes['timeout']} timed out, "
        f"{outcomes['survived']} survived ({100 * outcomes['survived'] / max(total, 1):.0f}% survival)"
    )
    for line in sorted(survivors):
        print(f"  survived: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
