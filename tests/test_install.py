"""A fresh clone works from its own root: no folder of the repository shadows an installed package, the README's
multi-process command trains from there, and the environment is the lock (constraints.txt) that CI installs.

Python puts the working directory first on `sys.path` for `python -m ...`, `python -c` and `accelerate launch -m`,
so a top-level folder that is a regular package (has an `__init__.py`) wins over an installed package of the same
name. transformers 5 depends on Hugging Face's `kernels`, and the repository's `kernels/` once shadowed it:
importing a UNet died with "cannot import name 'CUDAProperties' from 'kernels'". A folder without `__init__.py` is
only a namespace portion, which yields to the installed package. The kernels and the recipes live in the package
(`distill/kernels/`, `distill/recipes/`, where their imports point); the top-level `kernels` and `recipes` are links
to them, the repository's stated layout.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import REPO, subprocess_env

IMPORTS_FROM_ROOT = r"""
import json, sys
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
import diffusers.loaders.peft
UNet2DConditionModel  # resolve the lazy attributes: this is where the shadowed `kernels` used to fail
StableDiffusionPipeline
import kernels
print(json.dumps({"file": kernels.__file__, "path": list(kernels.__path__), "cwd_first": sys.path[0]}))
"""


def _kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_only_distill_is_a_regular_package_at_the_root():
    """Every other top-level folder would shadow an installed package of its name (PyPI has `kernels`,
    `recipes`, `scripts`, `tests`, `docs`) when Python runs from the repository root."""
    regular = sorted(p.name for p in REPO.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and (p / "__init__.py").exists())
    assert regular == ["distill"]
    modules = sorted(p.name for p in REPO.glob("*.py"))
    assert modules == [], f"top-level modules shadow installed ones of their name: {modules}"


def test_kernels_and_recipes_live_in_the_package_and_the_top_level_links_to_them():
    """distill/kernels and distill/recipes are real folders, so an import and every tool that follows imports lands
    on the file itself; the top-level kernels/ and recipes/ of the stated layout are links to them. The source tree
    imports (uninstalled) the way it installs."""
    for name in ("kernels", "recipes"):
        folder, link = REPO / "distill" / name, REPO / name
        assert folder.is_dir() and not folder.is_symlink(), f"distill/{name} should be the real folder"
        assert link.is_symlink() and os.readlink(link) == f"distill/{name}", f"{name} should link to distill/{name}"
        assert not (folder / "__init__.py").exists(), f"distill/{name} is a namespace subpackage (no __init__.py)"
    import distill.kernels.jvp_attention
    import distill.recipes.dmd2

    assert Path(distill.kernels.jvp_attention.__file__) == REPO / "distill" / "kernels" / "jvp_attention.py"
    assert Path(distill.recipes.dmd2.__file__) == REPO / "distill" / "recipes" / "dmd2.py"


@pytest.mark.skipif(not _kernels_installed(), reason="Hugging Face's `kernels` is not installed here (the lock, "
                                                     "through transformers 5, installs it)")
def test_installed_kernels_wins_from_the_repository_root():
    """From the repository root (cwd first on sys.path), diffusers' UNet, pipeline and peft loaders import, and
    `import kernels` is the installed package, not the repository's folder."""
    proc = subprocess.run([sys.executable, "-c", IMPORTS_FROM_ROOT], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["cwd_first"] in ("", str(REPO))  # the condition under which the shadowing happened
    assert found["file"] is not None, f"`kernels` is the repository's namespace folder: {found['path']}"
    origin = Path(found["file"]).resolve()
    assert not origin.is_relative_to(REPO / "kernels"), f"`kernels` came from the repository's folder: {origin}"
    installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert origin == installed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_multiprocess_command_from_the_repository_root(tmp_path):
    """The README's CPU DDP command, as written (relative config path, `-m distill.cli`, run from the repository
    root), for two steps on 2 processes: it trains, checkpoints and exports a loadable pipeline."""
    readme = (REPO / "README.md").read_text()
    command = ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m distill.cli train "
               "recipes/digits/dmd2.yaml")
    assert command in readme, "the README's command changed: update this test with it"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "the `accelerate` command is not installed beside this Python"
    run = tmp_path / "run"
    argv = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
            "-m", "distill.cli", "train", "recipes/digits/dmd2.yaml",
            f"run.output_dir={run}", "run.max_steps=2", "data.batch_size=8", "trainer.checkpoint_every=2",
            "trainer.sample_every=0", "trainer.progress_bar=false"]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "CUDAProperties" not in proc.stderr
    assert (run / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    assert (run / "pipeline" / "model_index.json").is_file(), sorted(p.name for p in run.iterdir())


def test_environment_is_the_lock():
    """What the suite runs with is constraints.txt exactly (CI installs through it): `.ci/lock.py check`.
    Skipped only outside CI when the environment was installed without the lock on purpose."""
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "lock.py"), "check"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0 and os.environ.get("DISTILL_UNLOCKED") == "1":
        pytest.skip(f"DISTILL_UNLOCKED=1 (.ci/run --latest or --oldest): {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
