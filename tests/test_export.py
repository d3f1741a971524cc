"""The export: a stock diffusers folder that a process without `distill` loads, samples with default arguments,
and that reproduces the student's own rollout (1 step, and 2 steps with the trained sigmas)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import NO_DISTILL, subprocess_env, tiny_config

from distill.models.schedules import rollout, student_schedule
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 7]
SEED = 1234

# Runs in a fresh interpreter in which importing `distill` fails: loading and sampling must need diffusers only.
CLEAN_LOAD = NO_DISTILL + r"""
import torch
from diffusers import ConsistencyModelPipeline, DiffusionPipeline

spec = json.load(open(sys.argv[1]))
inputs = torch.load(spec["inputs"])
results = {}
for name, folder in spec["pipelines"].items():
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is ConsistencyModelPipeline, type(pipe)
    assert pipe.unet.config.num_class_embeds == 10 and pipe.unet.class_embedding.weight.shape[0] == 10
    # Default arguments (random classes, default steps, PIL output), only the batch size given.
    default = pipe(batch_size=3).images
    assert len(default) == 3 and all(im.size == (8, 8) for im in default), default
    steps = spec["steps"][name]
    # The noise comes from the generator: `latents=` is refused for non-RGB models (check_inputs expects 3 channels).
    out = pipe(batch_size=len(inputs["labels"]), class_labels=inputs["labels"].tolist(), num_inference_steps=steps,
               generator=torch.Generator().manual_seed(spec["seed"]), output_type="pt").images
    pipe.scheduler.set_timesteps(steps)
    results[name] = {"images": out, "sigmas": pipe.scheduler.sigmas.clone()}
torch.save(results, spec["results"])
assert not NoDistill.tried, NoDistill.tried
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def _student_reference(trainer: Trainer, labels: torch.Tensor) -> torch.Tensor:
    """The EMA student's rollout from the random numbers the pipeline draws with a generator seeded SEED (the
    initial noise, then one re-noising draw per step), mapped like output_type="pt" ([-1, 1] -> [0, 1])."""
    with torch.no_grad(), trainer.ema_weights() as gen:
        torch.manual_seed(SEED)
        noise = torch.randn(len(labels), 1, 8, 8)
        x0 = rollout(gen, trainer.recipe.schedule, {"class_labels": labels}, noise)  # re-noises from the same stream
    return (x0 / 2 + 0.5).clamp(0, 1)


def _train(teacher: Path, run: Path, *extra: str) -> Trainer:
    trainer = Trainer(tiny_config(teacher, run, "trainer.checkpoint_every=2", "trainer.ema_decay=0.9", *extra))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def exported(tiny_teacher, tmp_path_factory, one_thread):
    """A 1-step student exported with `distill export` and a 2-step student exported at the end of training,
    both loaded and sampled in a clean process."""
    root = tmp_path_factory.mktemp("export")
    labels = torch.tensor(LABELS)

    one = _train(tiny_teacher, root / "one_step", "run.max_steps=2")
    cli = [shutil.which("distill") or sys.executable] + ([] if shutil.which("distill") else ["-m", "distill.cli"])
    proc = subprocess.run([*cli, "export", str(root / "one_step"), str(root / "one_step_pipe")], check=False,
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = _train(tiny_teacher, root / "two_step", "run.max_steps=2", "student.num_steps=2", "export.at_end=true")

    torch.save({"labels": labels}, root / "inputs.pt")
    spec = {"inputs": str(root / "inputs.pt"), "results": str(root / "results.pt"), "seed": SEED,
            "pipelines": {"one": str(root / "one_step_pipe"), "two": str(root / "two_step" / "pipeline")},
            "steps": {"one": 1, "two": 2}}
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(root / "spec.json")], check=False,
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=root)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    return {
        "trainers": {"one": one, "two": two},
        "folders": {k: Path(v) for k, v in spec["pipelines"].items()},
        "results": torch.load(root / "results.pt"),
        "reference": {"one": _student_reference(one, labels), "two": _student_reference(two, labels)},
    }


@pytest.mark.parametrize("name", ["one", "two"])
def test_pipeline_reproduces_the_student(exported, name):
    got, want = exported["results"][name]["images"], exported["reference"][name]
    assert got.shape == want.shape == (len(LABELS), 1, 8, 8)
    assert want.std() > 0.01  # not a constant image that anything would match
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_two_step_pipeline_uses_the_trained_sigmas(exported):
    trainer = exported["trainers"]["two"]
    trained = student_schedule(trainer.recipe.generator, 2).times
    assert torch.equal(trained, trainer.recipe.schedule.times)
    torch.testing.assert_close(exported["results"]["two"]["sigmas"][:2].float(), trained, atol=0, rtol=1e-6)
    folder = exported["folders"]["two"]
    assert "num_inference_steps=2" in (folder / "README.md").read_text()
    meta = json.loads((folder / "distill.json").read_text())
    assert meta["num_inference_steps"] == 2
    assert meta["trained_sigmas"] == pytest.approx(trained.tolist(), rel=1e-6)


def test_one_step_model_card_states_the_call(exported):
    card = (exported["folders"]["one"] / "README.md").read_text()
    assert "ConsistencyModelPipeline" in card and "DiffusionPipeline.from_pretrained" in card
    assert "num_inference_steps" not in card.split("```python")[1].split("```")[0]  # one step is the default
    assert json.loads((exported["folders"]["one"] / "distill.json").read_text())["num_inference_steps"] == 1


@pytest.mark.parametrize("name", ["one", "two"])
def test_export_holds_ema_weights_as_safetensors_only(exported, name):
    from safetensors.torch import load_file

    folder = exported["folders"][name]
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert "unet/diffusion_pytorch_model.safetensors" in files and "scheduler/scheduler_config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pt", ".pth", ".ckpt"))], files
    assert not list(folder.parent.glob(".tmp-*")) and not list(folder.parent.glob(".old-*"))

    trainer = exported["trainers"][name]
    saved = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    with trainer.ema_weights() as gen:
        ema = {k: v.detach().cpu().clone() for k, v in gen.model.state_dict().items()}
    raw = trainer.recipe.generator.model.state_dict()
    assert saved.keys() == ema.keys()
    assert torch.equal(saved["class_embedding.weight"], ema["class_embedding.weight"][:10])  # null class dropped
    for k in saved:
        if k != "class_embedding.weight":
            assert torch.equal(saved[k], ema[k]), k
    assert any(not torch.equal(saved[k], raw[k].cpu()) for k in saved if k != "class_embedding.weight")
