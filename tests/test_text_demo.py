"""`distill demo --task text` end to end on a tiny budget: DMD2 on the shipped text teacher, export, the table and the
grid; then a process that cannot import `distill` loads the exported folder, samples with the model card's exact
call, and samples latents from given noise that must equal the exported student's own one-step rollout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny import NO_DISTILL, subprocess_env

from distill.cli import main
from distill.config import ASSETS

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_TEACHER = ASSETS / "text_teacher"
PROMPTS = ["a red circle at the top left", "a blue triangle at the bottom right"]
SEED = 99

CLEAN_LOAD = NO_DISTILL + r"""
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

spec = json.load(open(sys.argv[1]))
meta = json.load(open(spec["folder"] + "/distill.json"))
pipe = DiffusionPipeline.from_pretrained(spec["folder"])
assert type(pipe) is StableDiffusionPipeline, type(pipe)
pipe.set_progress_bar_config(disable=True)
assert meta["call"] in open(spec["folder"] + "/README.md").read(), "the model card states the call"
images = eval(meta["call"], {"pipe": pipe}).images  # the exact call of the model card, default output
assert len(images) == 1 and images[0].size == (24, 24), images
out = pipe(spec["prompts"], latents=torch.load(spec["noise"]), num_inference_steps=meta["num_inference_steps"],
           guidance_scale=0.0, output_type="latent").images
torch.save({"latents": out, "timesteps": pipe.scheduler.timesteps.clone(), "scheduler": type(pipe.scheduler).__name__},
           spec["results"])
assert not NoDistill.tried and not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def test_shipped_text_teacher_is_a_stock_pipeline_with_its_captions():
    from diffusers import StableDiffusionPipeline

    from distill.shapes import CAPTIONS

    assert (TEXT_TEACHER / "prompts.txt").read_text().splitlines() == list(CAPTIONS)
    pipe = StableDiffusionPipeline.from_pretrained(TEXT_TEACHER)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 12  # 24x24 images by default
    ids = pipe.tokenizer(list(CAPTIONS)).input_ids
    assert all(len(i) == len(c.split()) + 2 for i, c in zip(ids, CAPTIONS))  # one token per word
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(CAPTIONS) + [""], "cpu", 1, False)
    gaps = torch.cdist(embeds.flatten(1), embeds.flatten(1)) + torch.eye(len(embeds)) * 1e9
    assert float(gaps.min()) > 0.1  # every caption (and the empty prompt) has its own embedding


def test_text_demo_trains_exports_scores_and_reloads(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--task", "text", "--out", str(out), "--teacher-steps", "2", "run.max_steps=2",
               "data.batch_size=4", "trainer.critic_steps=1", "trainer.checkpoint_every=0",
               "trainer.progress_bar=false", f"data.cache_dir={tmp_path / 'cache'}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "agree" in printed and "FD-shapes" in printed and "not Inception FID" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    floor, teacher, student = metrics["rows"].values()
    assert metrics["count"] == 960 and metrics["teacher_guidance_scale"] == 1.5
    assert floor["agreement"] > 0.98 and 0 < floor["fd_shapes"] < teacher["fd_shapes"]  # 2 teacher steps: far off
    assert teacher["nfe"] == 4 and student["nfe"] == 1  # CFG doubles the teacher's calls
    assert 0 <= student["agreement"] <= 1 and student["fd_shapes"] > 0
    grid = Image.open(out / "teacher_vs_student.png")
    assert grid.size[0] > 8 * 24 * 4 and grid.size[1] > 16 * 24 * 4  # 8 columns, 16 labelled rows, scaled 4x

    folder = out / "pipeline"
    meta = json.loads((folder / "distill.json").read_text())
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["num_inference_steps"] == 1
    noise = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(SEED))
    torch.save(noise, tmp_path / "noise.pt")
    spec = {"folder": str(folder), "noise": str(tmp_path / "noise.pt"), "results": str(tmp_path / "out.pt"),
            "prompts": PROMPTS}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(tmp_path / "spec.json")], capture_output=True,
                          text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["scheduler"] == "LCMScheduler" and got["timesteps"].tolist() == [999]

    # The student the trainer exported, through distill's own sampler: the same one step from the same noise.
    from diffusers import StableDiffusionPipeline

    from distill.denoiser import load_denoiser
    from distill.export import rollout, student_schedule

    student = load_denoiser(folder, resolution=24)
    with torch.no_grad():
        embeds, _ = StableDiffusionPipeline.from_pretrained(TEXT_TEACHER).encode_prompt(PROMPTS, "cpu", 1, False)
        want = rollout(student, student_schedule(student, 1), {"encoder_hidden_states": embeds}, noise.clone())
    assert want.std() > 1e-3
    torch.testing.assert_close(got["latents"], want, atol=2e-5, rtol=1e-4)
