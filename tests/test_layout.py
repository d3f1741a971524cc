"""The package's layout, read from its source: stages whose imports only run downward, and no import circle.

Every `import` and `from ... import` in `distill/` counts, at module level or inside a function (a function-level
import that closes a circle still ties the two modules together; it only hides the circle until the function runs).
The walk follows the links `distill/kernels` and `distill/recipes` to the top-level folders, as Python does.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill"

#: the stages, bottom first: a module may import its own stage and the stages below it, never one above.
#: docs/design.md draws the same list (test_design_doc_draws_the_stages).
STAGES = ["base", "config", "parametrization", "kernels", "families", "models", "data", "export", "training",
          "recipes", "plan", "evaluation", "demo", "evaluate", "cli"]


def modules() -> dict[str, Path | None]:
    """Dotted name -> file of every module under distill/, through the kernels and recipes links (None for a
    folder without `__init__.py`: a namespace package)."""
    found: dict[str, Path | None] = {}
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):
        rel = Path(folder).relative_to(PACKAGE)
        dirs[:] = sorted(d for d in dirs if d not in ("assets", "__pycache__"))
        prefix = ".".join(("distill", *rel.parts))
        found.setdefault(prefix, None)
        for f in sorted(files):
            if f.endswith(".py"):
                found[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = Path(folder) / f
    return found


def imports(name: str, path: Path, known: dict[str, Path | None]) -> set[str]:
    """The package modules `name` imports anywhere in its body (each `from X import a` names X.a when it is a
    module, else X)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("distill"):
                assert target in known, f"{path}: imports {target!r}, which is not a module of the package"
                out.add(target)
    return out - {name}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) if path else set() for name, path in known.items()}


def test_every_module_belongs_to_a_stage(graph):
    strays = sorted(m for m in graph if stage(m) not in STAGES and m != "distill")
    assert not strays, f"modules outside the stages {STAGES}: {strays} (add them to a stage, and to docs/design.md)"


def test_the_walk_sees_the_linked_folders(graph):
    # a negative control for the walk: the kernel and the recipes are reached through their links
    assert "distill.kernels.jvp_attention" in graph and "distill.recipes.dmd2" in graph
    assert "distill.models.jvp" in {m for m, deps in graph.items() if "distill.kernels.diffusers_attention" in deps}


def test_imports_only_run_down_the_stages(graph):
    rank = {s: i for i, s in enumerate(STAGES)}
    upward = [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
              if m != "distill" and rank[stage(d)] > rank[stage(m)]]
    assert not upward, "imports that run upward between stages (" + " < ".join(STAGES) + "):\n" + "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_no_import_circles(graph):
    assert cycles(graph) == [], "modules that import each other in a circle (imports inside functions count)"


def test_the_circle_finder_finds_circles():
    # the check can fail: a circle through a function-level import, and one of three modules
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = "def f():\n    from distill.models.denoiser import Denoiser\n"
    path = Path(__file__).with_name("_layout_probe.py")
    try:
        path.write_text(src)
        assert imports("distill.base.probe", path, {"distill.models.denoiser": path}) == {"distill.models.denoiser"}
    finally:
        path.unlink()


def test_design_doc_draws_the_stages():
    doc = (PACKAGE.parent / "docs" / "design.md").read_text()
    drawn = re.search(r"<!-- stages -->\n```\n(.*?)```", doc, re.S)
    assert drawn, "docs/design.md: the package picture sits in a ``` block after <!-- stages -->"
    names = re.findall(r"^\s*(?:distill/)?([a-z_]+)(?:/|\.py)", drawn.group(1), re.M)
    assert [n for n in names if n in STAGES] == STAGES[::-1], (
        f"docs/design.md draws the stages {names}; the package's are {STAGES[::-1]} (top first)")


def stage_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The stage-to-stage imports, less those implied by others (the transitive reduction of an acyclic graph,
    which is unique): the arrows docs/design.md draws."""
    edges: dict[str, set[str]] = {}
    for m, deps in graph.items():
        for d in deps:
            if m != "distill" and stage(m) != stage(d):
                edges.setdefault(stage(m), set()).add(stage(d))

    def reachable(start: str, without: tuple[str, str]) -> set[str]:
        seen: set[str] = set()
        todo = [s for s in edges.get(start, ()) if (start, s) != without]
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(edges.get(s, ()))
        return seen

    return {(a, b) for a, bs in edges.items() for b in bs if b not in reachable(a, (a, b))}


def test_design_doc_draws_the_arrows(graph):
    doc = (PACKAGE.parent / "docs" / "design.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", doc, re.S)
    assert block, "docs/design.md: the arrows between the stages sit in a ```mermaid block"
    drawn = set(re.findall(r"^\s*(\w+) --> (\w+)", block.group(1), re.M))
    actual = stage_arrows(graph)
    assert drawn == actual, (f"docs/design.md draws arrows the imports do not have: {sorted(drawn - actual)}; "
                             f"and lacks: {sorted(actual - drawn)}")


def test_stage_arrows_leave_out_the_implied_ones():
    graph = {"distill.cli": {"distill.training.t", "distill.base.b"}, "distill.training.t": {"distill.base.b"},
             "distill.base.b": set()}
    assert stage_arrows(graph) == {("cli", "training"), ("training", "base")}
