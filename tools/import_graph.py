#!/usr/bin/env python3
"""Print mfli's import graph by floor, from the source, and check the rules that keep it layered.

Floors, bottom to top (docs/design.md, "Code map"):

* **shared** — ``mfli/``: config, events, wire formats, metrics, Kafka plumbing, storage, retrieval,
  sources. Imports nothing above it.
* **processes** — ``consumers/``, ``learner/``, ``indexer/``, ``server/``: one folder per process. They
  import the shared floor, not each other, except the learner, which runs the consumers in-process.
* **tools** — ``orchestration/`` (CLI, demo, chaos, supervisor, reports, producers), ``evaluation/``,
  ``benchmarks/``: they run the processes. Evaluation and benchmarks may use orchestration's
  supervisor and reports, and benchmarks may use evaluation; orchestration imports neither.

Every ``import`` counts, wherever it is: at module level, inside a function, under ``TYPE_CHECKING``.
A function-level import is still a dependency, and a type-only one is still a cycle a reader must
untangle. Checked: no import goes up a floor; no lateral import between packages of a floor unless
listed in :data:`LATERAL`; no module imports a package's private module (:data:`PRIVATE`); no cycle
between modules. Top-level folders map to ``mfli.*`` packages through ``[tool.setuptools]
package-dir`` in ``pyproject.toml``, which this script reads.

Usage: ``python tools/import_graph.py [--quiet]``; the exit status is 1 when a rule is broken.
``tests/test_structure.py`` runs the same checks.
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: floors bottom to top; a module is on the floor of its longest matching package prefix
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shared", ("mfli",)),
    ("processes", ("mfli.consumers", "mfli.learner", "mfli.indexer", "mfli.server")),
    ("tools", ("mfli.orchestration", "mfli.evaluation", "mfli.benchmarks")),
)
#: imports allowed between different packages of one floor (importer, imported); the shared floor's
#: packages may use each other freely (it is one library), so only the other floors are listed
LATERAL: frozenset[tuple[str, str]] = frozenset({
    ("mfli.learner", "mfli.consumers"),  # the consumers run inside the learner process
    ("mfli.evaluation", "mfli.orchestration"),  # mfli eval --report renders with orchestration.report
    ("mfli.benchmarks", "mfli.orchestration"),  # benchmarks supervise processes and produce streams
    ("mfli.benchmarks", "mfli.evaluation"),  # bench index reuses the evaluation's protocol
})
#: modules only their own package may import
PRIVATE: dict[str, str] = {
    "mfli.storage.index.layout": "mfli.storage.index",  # the index's bytes: readers use the reader API
}


@dataclass
class Graph:
    """Modules (dotted names) and the internal modules each imports, with the line of each import."""

    modules: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """``{"mfli.learner": "learner", ...}`` from ``pyproject.toml``."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"]["package-dir"])


def discover(root: Path, dirs: Mapping[str, str]) -> dict[str, Path]:
    """Every module under the mapped folders, by dotted name (subfolders become subpackages)."""
    modules: dict[str, Path] = {}
    # longest mapping first, so a folder mapped on its own is not also read as a subpackage of "mfli"
    claimed = {(root / folder).resolve() for folder in dirs.values()}
    for package, folder in sorted(dirs.items(), key=lambda kv: -len(kv[0])):
        base = (root / folder).resolve()
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if any(p == "__pycache__" for p in parts):
                continue
            inner = [base.joinpath(*parts[:i]) for i in range(1, len(parts))]
            if any(d in claimed and d != base for d in inner):
                continue  # belongs to another mapping
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build(root: Path = ROOT, dirs: Mapping[str, str] | None = None) -> Graph:
    """The internal import graph of the source tree at ``root``."""
    graph = Graph(modules=discover(root, dirs if dirs is not None else package_dirs(root)))
    known = set(graph.modules)
    for module, path in graph.modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node)
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
            for target in targets:
                while target and target not in known:  # `import a.b.c` of a module a.b: count a.b
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph.imports[module].setdefault(target, node.lineno)
    return graph


def floor_of(module: str) -> tuple[int, str]:
    """(floor index, package) of a module: the longest package prefix listed in :data:`FLOORS`."""
    matches = [(len(package), floor, package) for floor, (_, packages) in enumerate(FLOORS) for package in packages
               if module == package or module.startswith(package + ".")]
    if not matches:
        raise ValueError(f"{module} is on no floor")
    _, floor, package = max(matches)
    return floor, package


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:  # iterative, so deep graphs cannot hit the recursion limit
        nonlocal counter
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def violations(graph: Graph) -> list[str]:
    """Every broken rule, one line each (empty when the structure holds)."""
    out: list[str] = []
    for module, targets in sorted(graph.imports.items()):
        src_floor, src_pkg = floor_of(module)
        for target, line in sorted(targets.items()):
            dst_floor, dst_pkg = floor_of(target)
            where = f"{module} (line {line}) imports {target}"
            if dst_floor > src_floor:
                out.append(f"upward: {where} ({FLOORS[src_floor][0]} -> {FLOORS[dst_floor][0]})")
            elif dst_floor == src_floor and src_floor > 0 and src_pkg != dst_pkg and (src_pkg, dst_pkg) not in LATERAL:
                out.append(f"lateral: {where} ({src_pkg} -> {dst_pkg} is not in LATERAL)")
            owner = PRIVATE.get(target)
            if owner and not (module == owner or module.startswith(owner + ".")):
                out.append(f"private: {where} (only {owner} may)")
    for component in cycles({m: set(t) for m, t in graph.imports.items()}):
        out.append(f"cycle: {' <-> '.join(component)}")
    return out


def render(graph: Graph) -> str:
    """The graph by floor and package: each module with the internal modules it imports."""
    lines: list[str] = []
    by_floor: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module in graph.modules:
        floor, package = floor_of(module)
        by_floor[floor][package].append(module)
    for floor in sorted(by_floor, reverse=True):
        lines.append(f"== {FLOORS[floor][0]} ==")
        for package in sorted(by_floor[floor]):
            lines.append(f"  {package}")
            for module in sorted(by_floor[floor][package]):
                targets = sorted(graph.imports.get(module, {}))
                shown = ", ".join(t.removeprefix("mfli.") for t in targets) or "-"
                lines.append(f"    {module.removeprefix('mfli.')}: {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quiet", action="store_true", help="print only the rule check")
    args = parser.parse_args(argv)
    graph = build()
    if not args.quiet:
        sys.stdout.write(render(graph) + "\n\n")
    broken = violations(graph)
    edges = sum(len(t) for t in graph.imports.values())
    upward = sum(v.startswith("upward") for v in broken)
    cyc = sum(v.startswith("cycle") for v in broken)
    sys.stdout.write(f"{len(graph.modules)} modules, {edges} internal imports; upward imports: {upward}, "
                     f"cycles: {cyc}, other violations: {len(broken) - upward - cyc}\n")
    for line in broken:
        sys.stdout.write(f"  {line}\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
