"""The package's shape (issue "Driver and worker apart"): no import cycle among raytrainer's modules, counting
imports inside functions; no module over ~500 lines and the driver facade under 400; driver and worker code in
their own modules; every module listed in docs/contributing.md's layout."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "raytrainer")
MAX_LINES = 500
MAX_FACADE_LINES = 400


def _modules() -> dict[str, str]:
    found = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> raytrainer modules it imports anywhere in its file (module level or inside a function).
    `from pkg import name` counts as an import of pkg.name when that is a module, else of pkg."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_raytrainers_modules():
    graph = import_graph()
    assert graph["raytrainer.trainer"] and graph["raytrainer.launch"]  # the graph sees imports at all
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_driver_and_worker_are_separate_and_the_spec_imports_neither():
    graph = import_graph()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    driver = {"raytrainer.trainer", "raytrainer.launch", "raytrainer.checkpoint.resume", "raytrainer.tune.search"}
    worker = {"raytrainer.worker", "raytrainer.loop", "raytrainer.loop_trainer"}
    assert not reaches("raytrainer.spec") & (driver | worker)
    for module in worker:
        assert not reaches(module) & {"raytrainer.trainer", "raytrainer.launch", "raytrainer.tune.search"}, module


def test_module_sizes():
    sizes = {name: len(open(path, encoding="utf-8").read().splitlines()) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
    assert sizes["raytrainer.trainer"] <= MAX_FACADE_LINES
    with open(os.path.join(ROOT, "jobs", "finetune.py"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 150


def test_the_layout_lists_every_module_once():
    text = open(os.path.join(ROOT, "docs", "contributing.md"), encoding="utf-8").read()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = [line.split()[0] for line in block.splitlines() if line.startswith("raytrainer/")]
    files = sorted(os.path.relpath(p, ROOT) for p in _modules().values())
    assert sorted(p for p in listed if p.endswith(".py")) == files
