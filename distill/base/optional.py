"""Packages outside the core dependencies, and the one way the package imports them.

A core dependency (pyproject's `dependencies`) is imported plainly. Anything else is imported through `require`,
which raises `MissingPackage` naming the package, what needs it and the command that installs it; `distill`'s
command line turns that into a one-paragraph message and exit status 2, never a traceback. A script checks its
optional packages with `exit_if_missing` while it parses its arguments, before it measures anything.

tests/test_optional.py walks every import of `distill`, `recipes`, `kernels` and `scripts` and fails on a package
that is neither a core dependency nor listed here, and runs each entry point below with its package hidden.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

#: import name -> (the PyPI distribution, the `distill` extra that installs it).
OPTIONAL: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plot"),
    "bitsandbytes": ("bitsandbytes", "optim8bit"),
}

#: import name -> why it is imported softly: a peer's implementation that a benchmark compares against when it
#: happens to be installed (never a dependency: its column is left out), or a core dependency that a platform
#: lacks (the code falls back to plain PyTorch).
SOFT: dict[str, str] = {
    "jvp_flash_attention": "scripts/bench_jvp_attention.py adds a column for this peer kernel when it is installed",
    "triton": "a core dependency on Linux only; without it the JVP attention runs on its PyTorch path",
}


class MissingPackage(ImportError):
    """An optional package that a requested feature needs is not installed; the message says how to get it."""


def install_command(module: str) -> str:
    distribution, extra = OPTIONAL[module]
    return f"pip install '{distribution}'  (or: pip install -e \".[{extra}]\" in a clone of distill)"


def missing_message(module: str, needed_by: str) -> str:
    distribution, _ = OPTIONAL[module]
    return f"{needed_by} needs the package {distribution!r}, which is not installed. Install it with: " \
           f"{install_command(module)}"


def require(module: str, needed_by: str) -> ModuleType:
    """Import the optional `module` (a key of OPTIONAL), or raise MissingPackage saying who needs it and how to
    install it. `needed_by` names the feature: a recipe and its config key, a script and its flag."""
    if module not in OPTIONAL:
        raise KeyError(f"{module!r} is not a declared optional package (distill.base.optional.OPTIONAL)")
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(missing_message(module, needed_by)) from None


def is_installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a module set to None in sys.modules counts as
    absent, as the import system treats it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def exit_if_missing(module: str, needed_by: str) -> None:
    """For scripts, while parsing arguments: print the MissingPackage message and exit with status 2."""
    if module not in OPTIONAL:
        raise KeyError(f"{module!r} is not a declared optional package (distill.base.optional.OPTIONAL)")
    if not is_installed(module):
        print(f"error: {missing_message(module, needed_by)}", file=sys.stderr)
        raise SystemExit(2)
