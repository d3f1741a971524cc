"""`distill demo --task text` and `--task text-flow` end to end on a tiny budget: DMD2 on a shipped text teacher (the
VP StableDiffusionPipeline, the flow-matching StableDiffusion3Pipeline), export, the table and the grid; then a
process that cannot import `distill` loads the exported folder, samples with the model card's exact call, and
samples latents from given noise that must equal the exported student's own one-step rollout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny import NO_DISTILL, subprocess_env

from distill.base.paths import ASSETS
from distill.cli import DEMO_CONFIG, main
from distill.demo.shapes import CAPTIONS
from distill.training.preflight import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_TEACHER = ASSETS / "text_teacher"
FLOW_TEXT_TEACHER = ASSETS / "flow_text_teacher"
PROMPTS = ["a red circle at the top left", "a blue triangle at the bottom right"]
SEED = 99

#: per demo task: its teacher, and the exported pipeline's class, scheduler and one-step schedule
DEMOS = {
    "text": (TEXT_TEACHER, "StableDiffusionPipeline", "LCMScheduler", [999]),
    "text-flow": (FLOW_TEXT_TEACHER, "StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", [1000.0]),
}

CLEAN_LOAD = NO_DISTILL + r"""
import torch
import diffusers
from diffusers import DiffusionPipeline

spec = json.load(open(sys.argv[1]))
meta = json.load(open(spec["folder"] + "/distill.json"))
absent = meta.get("absent_components", [])  # SD3 without T5: from_pretrained needs them named
pipe = DiffusionPipeline.from_pretrained(spec["folder"], **{name: None for name in absent})
assert type(pipe) is getattr(diffusers, meta["pipeline"]), type(pipe)
pipe.set_progress_bar_config(disable=True)
card = open(spec["folder"] + "/README.md").read()
load = "".join(f", {name}=None" for name in absent)
assert f'DiffusionPipeline.from_pretrained("pipeline"{load})' in card, "the model card states the load"
assert meta["call"] in card, "the model card states the call"
images = eval(meta["call"], {"pipe": pipe, "torch": torch}).images  # the model card's exact call (its seed may use torch)
assert len(images) == 1 and images[0].size == (24, 24), images
out = pipe(spec["prompts"], latents=torch.load(spec["noise"]), num_inference_steps=meta["num_inference_steps"],
           guidance_scale=0.0, output_type="latent").images
torch.save({"latents": out, "timesteps": pipe.scheduler.timesteps.clone(), "scheduler": type(pipe.scheduler).__name__},
           spec["results"])
assert not NoDistill.tried and not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""

FLOW_TEACHER_LOAD = NO_DISTILL + r"""
import torch
from diffusers import StableDiffusion3Pipeline

folder, captions = sys.argv[1], json.loads(sys.argv[2])
pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
pipe.set_progress_bar_config(disable=True)
images = pipe(captions[:2], num_inference_steps=2, guidance_scale=2.0).images  # the default size
# Each CLIP encoder as the pipeline reads it: the penultimate token states and the pooled projection
ids = pipe.tokenizer(captions + [""], padding="max_length", max_length=pipe.tokenizer_max_length,
                     truncation=True, return_tensors="pt").input_ids
gaps = {}
for name in ("text_encoder", "text_encoder_2"):
    with torch.no_grad():
        out = getattr(pipe, name)(ids, output_hidden_states=True)
    for part, value in (("tokens", out.hidden_states[-2]), ("pooled", out.text_embeds)):
        flat = value.flatten(1)
        gaps[f"{name}.{part}"] = float((torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9).min())
assert not NoDistill.tried and not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print(json.dumps({"sizes": [im.size for im in images], "t5": pipe.text_encoder_3 is None,
                  "vae_scale_factor": pipe.vae_scale_factor, "gaps": gaps}))
"""


def test_shipped_text_teacher_is_a_stock_pipeline_with_its_captions():
    from diffusers import StableDiffusionPipeline

    assert (TEXT_TEACHER / "prompts.txt").read_text().splitlines() == list(CAPTIONS)
    pipe = StableDiffusionPipeline.from_pretrained(TEXT_TEACHER)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 12  # 24x24 images by default
    ids = pipe.tokenizer(list(CAPTIONS)).input_ids
    assert all(len(i) == len(c.split()) + 2 for i, c in zip(ids, CAPTIONS))  # one token per word
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(CAPTIONS) + [""], "cpu", 1, False)
    gaps = torch.cdist(embeds.flatten(1), embeds.flatten(1)) + torch.eye(len(embeds)) * 1e9
    assert float(gaps.min()) > 0.1  # every caption (and the empty prompt) has its own embedding


def test_shipped_flow_text_teacher_loads_without_distill_and_reads_every_caption():
    """The flow teacher is a stock StableDiffusion3Pipeline without T5 that plain diffusers loads and samples at
    24x24, and each of its two frozen random CLIP encoders tells all 48 captions and the empty prompt apart."""
    assert (FLOW_TEXT_TEACHER / "prompts.txt").read_text().splitlines() == list(CAPTIONS)
    proc = subprocess.run([sys.executable, "-c", FLOW_TEACHER_LOAD, str(FLOW_TEXT_TEACHER), json.dumps(CAPTIONS)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["sizes"] == [[24, 24], [24, 24]] and got["t5"] and got["vae_scale_factor"] == 2
    assert set(got["gaps"]) == {f"{e}.{p}" for e in ("text_encoder", "text_encoder_2") for p in ("tokens", "pooled")}
    assert min(got["gaps"].values()) > 0.1, got["gaps"]


@pytest.mark.parametrize("task", sorted(DEMOS))
def test_text_demo_trains_exports_scores_and_reloads(task, tmp_path, capsys):
    teacher_folder, pipeline, scheduler, timesteps = DEMOS[task]
    out = tmp_path / "demo"
    rc = main(["demo", "--task", task, "--out", str(out), "--teacher-steps", "2", "run.max_steps=2",
               "data.batch_size=4", "trainer.critic_steps=1", "trainer.checkpoint_every=0",
               "trainer.progress_bar=false", f"data.cache_dir={tmp_path / 'cache'}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "agree" in printed and "FD-shapes" in printed and "not Inception FID" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    floor, teacher, student = metrics["rows"].values()
    guidance = load_config(DEMO_CONFIG[task].format(recipe="dmd2")).teacher.guidance_scale
    assert metrics["count"] == 960 and metrics["teacher_guidance_scale"] == guidance > 1
    assert floor["agreement"] > 0.98 and 0 < floor["fd_shapes"] < teacher["fd_shapes"]  # 2 teacher steps: far off
    assert teacher["nfe"] == 4 and student["nfe"] == 1  # CFG doubles the teacher's calls
    assert 0 <= student["agreement"] <= 1 and student["fd_shapes"] > 0
    grid = Image.open(out / "teacher_vs_student.png")
    assert grid.size[0] > 8 * 24 * 4 and grid.size[1] > 16 * 24 * 4  # 8 columns, 16 labelled rows, scaled 4x

    folder = out / "pipeline"
    meta = json.loads((folder / "distill.json").read_text())
    assert meta["pipeline"] == pipeline and meta["num_inference_steps"] == 1
    noise = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(SEED))
    torch.save(noise, tmp_path / "noise.pt")
    spec = {"folder": str(folder), "noise": str(tmp_path / "noise.pt"), "results": str(tmp_path / "out.pt"),
            "prompts": PROMPTS}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(tmp_path / "spec.json")], capture_output=True,
                          text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["scheduler"] == scheduler and got["timesteps"].tolist() == timesteps

    # The student the trainer exported, through distill's own sampler: the same one step from the same noise, the
    # prompts encoded by the teacher's pipeline as its call encodes them.
    from distill.families.target import teacher_target
    from distill.models.denoiser import load_denoiser
    from distill.models.schedules import rollout, student_schedule

    student = load_denoiser(folder, resolution=24)
    target, _, _ = teacher_target(teacher_folder)
    cond = target.encode(target.load_text_pipeline(teacher_folder), PROMPTS, 24, torch.device("cpu"))
    with torch.no_grad():
        want = rollout(student, student_schedule(student, 1), cond, noise.clone())
    assert want.std() > 1e-3
    torch.testing.assert_close(got["latents"], want, atol=2e-5, rtol=1e-4)
