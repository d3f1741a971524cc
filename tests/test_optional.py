"""Every import of the package is a core dependency or a declared optional one (`distill.base.optional`), and each
optional one, hidden, ends in a message naming the package and its install command (exit 2), not a traceback.

peft is a core dependency (every adapter mode and SwiftBrush's fake score need it; it is small and needs nothing
that distill does not already install), so `pip install -e .` alone runs every recipe."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import REPO, subprocess_env

from distill.base import optional

ROOTS = ("distill", "recipes", "kernels", "scripts")
#: modules imported directly that a core dependency pins exactly (pydantic requires pydantic-core==its version).
PINNED_BY_CORE = {"pydantic_core": "pydantic"}


def _sources() -> list[Path]:
    """The package's and scripts' Python files, each once (distill/kernels and distill/recipes are links)."""
    seen, files = set(), []
    for root in ROOTS:
        for p in sorted((REPO / root).rglob("*.py")):
            if p.resolve() not in seen:
                seen.add(p.resolve())
                files.append(p)
    return files


def _imports(tree: ast.AST):
    """(top-level module, line, inside a function, inside a try that catches ImportError) of every absolute
    import, function-level ones included."""
    def visit(node, in_function, in_try):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function = True
        if isinstance(node, ast.Try):
            catches = {getattr(h.type, "id", None) for h in node.handlers} | {
                getattr(e, "id", None) for h in node.handlers if isinstance(h.type, ast.Tuple) for e in h.type.elts}
            guarded = bool(catches & {"ImportError", "ModuleNotFoundError", "Exception"})
            for child in node.body:
                yield from visit(child, in_function, in_try or guarded)
            for child in node.handlers + node.orelse + node.finalbody:
                yield from visit(child, in_function, in_try)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno, in_function, in_try
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno, in_function, in_try
        for child in ast.iter_child_nodes(node):
            yield from visit(child, in_function, in_try)

    yield from visit(tree, False, False)


def _core_distributions() -> set[str]:
    """Normalized names of distill's dependencies that no extra gates (platform markers allowed)."""
    names = set()
    for req in importlib.metadata.requires("distill") or []:
        if "extra ==" in req:
            continue
        names.add(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", req).group(0)).lower())
    return names


def test_every_import_is_core_or_declared():
    core = _core_distributions()
    owners = importlib.metadata.packages_distributions()
    # modules of this repository's scripts/ and tests/ (a script may reuse the test fixtures' tiny pipelines)
    local_scripts = {p.stem for folder in ("scripts", "tests") for p in (REPO / folder).glob("*.py")}
    problems = []
    for path in _sources():
        source = path.read_text()
        for module, line, in_function, in_try in _imports(ast.parse(source)):
            where = f"{path.relative_to(REPO)}:{line} imports {module!r}"
            if module in sys.stdlib_module_names or module == "distill" or module in local_scripts:
                continue
            if module in optional.OPTIONAL:
                if not in_function:
                    problems.append(f"{where} at module level: import an optional package where it is used")
                if f'require("{module}"' not in source and f'exit_if_missing("{module}"' not in source:
                    problems.append(f"{where} without distill.base.optional.require / exit_if_missing")
                continue
            if module in optional.SOFT:
                guarded = any(m == module and t for m, _, _, t in _imports(ast.parse(source)))
                if not guarded:
                    problems.append(f"{where}: no import of it in this file handles its absence "
                                    f"({optional.SOFT[module]})")
                continue
            if PINNED_BY_CORE.get(module) in core:
                continue
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [])}
            if not dists & core:
                problems.append(f"{where}: not a core dependency ({sorted(dists) or 'not installed'}); add it to "
                                f"pyproject's dependencies or to distill.base.optional.OPTIONAL")
    assert not problems, "\n".join(problems)


def test_optional_packages_are_extras():
    """Each optional package's install command names an extra that exists and installs it."""
    meta = importlib.metadata.metadata("distill")
    extras = set(meta.get_all("Provides-Extra") or [])
    requires = importlib.metadata.requires("distill") or []
    for module, (distribution, extra) in optional.OPTIONAL.items():
        assert extra in extras, f"{module}: extra {extra!r} is not in pyproject's optional-dependencies"
        assert any(r.startswith(distribution) and f'extra == "{extra}"' in r for r in requires), (module, extra)
    assert "peft" in _core_distributions()


def test_require_names_package_and_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(optional.MissingPackage) as e:
        optional.require("matplotlib", "distill eval teacher --plot")
    text = str(e.value)
    assert "distill eval teacher --plot" in text and "'matplotlib'" in text
    assert "pip install 'matplotlib'" in text and '".[plot]"' in text
    with pytest.raises(KeyError, match="not a declared optional package"):
        optional.require("numpy", "anything")


def test_cli_turns_a_missing_package_into_exit_2(monkeypatch, capsys):
    from distill import cli

    def needs_plotting(args):
        optional.require("matplotlib", "this command")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args = parser.parse_args(["train", "recipes/digits/dmd2.yaml"])
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: type(args)(**{**vars(args), "fn": needs_plotting}))
    assert cli.main(["train", "recipes/digits/dmd2.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error: this command needs the package 'matplotlib'")


HIDDEN_CLI = """
import sys
sys.modules[{module!r}] = None          # as if the package were not installed
from distill.cli import main
sys.exit(main({argv!r}))
"""


def test_eval_teacher_without_matplotlib_stops_before_measuring(tmp_path):
    argv = ["eval", "teacher", "--steps", "1", "--plot", str(tmp_path / "curve.png")]
    proc = subprocess.run([sys.executable, "-c", HIDDEN_CLI.format(module="matplotlib", argv=argv)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "distill: error: distill eval teacher --plot needs the package 'matplotlib'" in proc.stderr
    assert "pip install" in proc.stderr
    assert proc.stdout == ""  # no cell was measured
    assert not (tmp_path / "curve.png").exists()


def test_without_triton_the_jvp_attention_runs_on_pytorch():
    """triton is a core dependency on Linux only: without it the kernel module imports, picks the PyTorch path
    and still gives the exact JVP."""
    code = """
import sys
sys.modules["triton"] = None
import torch
import distill.kernels.jvp_attention as J
from distill.kernels.jvp_attention_reference import jvp_reference
assert not J._HAS_TRITON
assert J.select_backend("cpu", torch.float32) == "torch"
g = torch.Generator().manual_seed(0)
q, k, v, tq, tk, tv = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(6))
o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv)
ro, rto = jvp_reference(q, k, v, tq, tk, tv)
assert torch.allclose(o.double(), ro, atol=1e-5) and torch.allclose(to.double(), rto, atol=1e-5)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_bench_without_the_peer_kernel_drops_its_column():
    code = """
import sys
sys.modules["jvp_flash_attention"] = None
sys.argv = ["scripts/bench_jvp_attention.py"]
import runpy
ns = runpy.run_path("scripts/bench_jvp_attention.py", run_name="not_main")
assert ns["peer_attention"] is None
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
