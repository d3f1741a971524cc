"""Every score-distillation recipe through the trainer: a resumed run equals the straight one bitwise, and the
export (adapters merged) is a stock pipeline that a process without `distill` loads and that reproduces the EMA
student's own rollout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_export import CLEAN_LOAD, LABELS, _student_reference
from tiny import subprocess_env, tiny_overrides, weights

from distill.training.preflight import load_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (config, overrides): every recipe of the family, with and without one base in memory.
RUNS = {
    "dmd2_adapters": ("digits/dmd2_adapters.yaml", ("recipe.lora_rank=4", "recipe.gan=true")),
    "fdistill_adapters": ("digits/fdistill.yaml", ("recipe.adapters=true", "recipe.lora_rank=4")),
    "decoupled_2step": ("digits/decoupled_dmd.yaml", ("student.num_steps=2",)),
    "swiftbrush": ("digits/swiftbrush.yaml", ("recipe.lora_rank=4", "teacher.guidance_scale=2.0")),
    "swiftbrush_adapters": ("digits/swiftbrush.yaml", ("recipe.adapters=true", "recipe.lora_rank=4")),
}
COMMON = ("trainer.ema_decay=0.9", "trainer.checkpoint_every=1", "trainer.generator.lr=1e-3",
          "trainer.critic.lr=1e-3", "teacher.guidance_scale=1.5")


def _trainer(teacher, run, name: str, *extra: str) -> Trainer:
    yaml, overrides = RUNS[name]
    return Trainer(load_config(yaml, tiny_overrides(teacher, run, *COMMON, *overrides, *extra)))


@pytest.fixture(scope="module")
def runs(tiny_teacher, tmp_path_factory, one_thread):
    """Per recipe: 3 steps straight, and 2 steps then resumed to 3; all straight runs exported and loaded in one
    clean process."""
    root = tmp_path_factory.mktemp("score_runs")
    out = {}
    for name in RUNS:
        straight = _trainer(tiny_teacher, root / name / "straight", name, "run.max_steps=3")
        initial = weights(straight)
        straight.train()
        first = _trainer(tiny_teacher, root / name / "resumed", name, "run.max_steps=2")
        first.train()
        resumed = _trainer(tiny_teacher, root / name / "resumed", name, "run.max_steps=3", "trainer.resume=latest")
        resumed.train()
        folder = straight.export(root / name / "pipeline")
        out[name] = {"initial": initial, "straight": weights(straight), "resumed": weights(resumed),
                     "trainer": straight, "folder": folder, "resumed_step": resumed.step}
    labels = torch.tensor(LABELS)
    torch.save({"labels": labels}, root / "inputs.pt")
    spec = {"inputs": str(root / "inputs.pt"), "results": str(root / "results.pt"), "seed": 1234,
            "pipelines": {k: str(v["folder"]) for k, v in out.items()},
            "steps": {k: v["trainer"].cfg.student.num_steps for k, v in out.items()}}
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(root / "spec.json")], check=False,
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=root)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    results = torch.load(root / "results.pt")
    for name, r in out.items():
        r["loaded"] = results[name]["images"]
        r["reference"] = _student_reference(r["trainer"], labels)
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_resume_is_bitwise_exact(runs, name):
    r = runs[name]
    assert r["resumed_step"] == 3
    for net in ("generator", "critic", "ema"):
        a, b = r["straight"][net], r["resumed"][net]
        assert a.keys() == b.keys(), net
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: {net} differs after resume"
        assert any(not torch.equal(a[k], r["initial"][net][k]) for k in a), f"{name}: {net} did not train"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_export_is_stock_and_reproduces_the_student(runs, name):
    r = runs[name]
    got, want = r["loaded"], r["reference"]
    assert want.std() > 0.01
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    from safetensors.torch import load_file

    saved = load_file(r["folder"] / "unet/diffusion_pytorch_model.safetensors")
    assert not [k for k in saved if "lora" in k or "base_layer" in k]  # merged: a plain UNet2DModel


def test_adapter_checkpoints_hold_only_the_adapters(runs):
    """With one base in memory the trained state is the adapters (and heads): checkpoints stay small."""
    state = runs["dmd2_adapters"]["straight"]
    assert state["generator"] and all("lora" in k for k in state["generator"])
    assert all("lora" in k or k.startswith("head.") for k in state["critic"])
    full = runs["decoupled_2step"]["straight"]["generator"]
    assert sum(v.numel() for v in state["generator"].values()) < sum(v.numel() for v in full.values())
