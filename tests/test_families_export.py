"""Each family's tiny whole pipeline: two DMD2 steps through the trainer, export to the family's stock pipeline,
then a process that cannot import `distill` loads the folder, samples with the model card's exact call, and
samples latents from given noise that must equal the student's own k-step rollout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import NO_DISTILL, subprocess_env
from tiny_pipelines import BUILDERS, PROMPTS, write_prompts

from distill.config import ConfigError, load_config
from distill.export import rollout
from distill.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 4321
# (family, student steps, expected pipeline); sdxl is the slowest to load and marked slow.
CASES = [("sd15", 2, "StableDiffusionPipeline"), ("sd3", 1, "StableDiffusion3Pipeline"),
         pytest.param("sd3", 2, "StableDiffusion3Pipeline", id="sd3-2"),
         pytest.param("sdxl", 2, "StableDiffusionXLPipeline", marks=pytest.mark.slow)]

CLEAN_LOAD = NO_DISTILL + r"""
import torch
from diffusers import DiffusionPipeline

spec = json.load(open(sys.argv[1]))
meta = json.load(open(spec["folder"] + "/distill.json"))
pipe = DiffusionPipeline.from_pretrained(spec["folder"])
pipe.set_progress_bar_config(disable=True)
card = open(spec["folder"] + "/README.md").read()
assert meta["call"] in card, "the model card states the call"
images = eval(meta["call"], {"pipe": pipe}).images  # the exact call of the model card, default output
assert len(images) == 1 and images[0].size == (meta["resolution"],) * 2, images
latents = torch.load(spec["noise"])
torch.manual_seed(spec["seed"])  # flow pipelines draw the re-noising from the global generator
kwargs = {"guidance_scale": spec["guidance"], "num_inference_steps": meta["num_inference_steps"],
          "height": meta["resolution"], "width": meta["resolution"], "output_type": "latent"}
if "generator" in __import__("inspect").signature(pipe.__call__).parameters:
    kwargs["generator"] = torch.Generator().manual_seed(spec["seed"])
out = pipe(spec["prompts"], latents=latents.clone(), **kwargs).images
torch.save({"latents": out, "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            "timesteps": pipe.scheduler.timesteps.clone(), "sigmas": getattr(pipe.scheduler, "sigmas", None)},
           spec["results"])
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def _run(family: str, steps: int, root: Path):
    teacher = BUILDERS[family](root / family)
    prompts = write_prompts(root / "prompts.txt")
    cfg = load_config("dmd2_sd15.yaml", [
        f"teacher.path={teacher}", f"run.output_dir={root / 'run'}", f"data.prompts={prompts}",
        f"data.cache_dir={root / 'cache'}", "data.resolution=16", "data.batch_size=2", "run.max_steps=2",
        "trainer.progress_bar=false", "trainer.checkpoint_every=0", f"student.num_steps={steps}",
        "teacher.guidance_scale=2.0", "trainer.ema_decay=0.5", "trainer.generator.lr=1e-3"])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


@pytest.mark.parametrize("family,steps,pipeline", CASES)
def test_family_trains_exports_and_reloads(family, steps, pipeline, tmp_path):
    trainer = _run(family, steps, tmp_path)
    folder = tmp_path / "run" / "pipeline"
    meta = json.loads((folder / "distill.json").read_text())
    assert meta["pipeline"] == pipeline and meta["num_inference_steps"] == steps
    ds = trainer.dataset
    noise = torch.randn(2, *ds.image_shape, generator=torch.Generator().manual_seed(0))
    torch.save(noise, tmp_path / "noise.pt")
    spec = {"folder": str(folder), "noise": str(tmp_path / "noise.pt"), "results": str(tmp_path / "out.pt"),
            "seed": SEED, "prompts": PROMPTS[:2], "guidance": ds.target.guidance_off()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(tmp_path / "spec.json")], capture_output=True,
                          text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["pipeline"] == pipeline
    # The pipeline visits exactly the trained timesteps ...
    trained = trainer.recipe.schedule.times
    visited = got["timesteps"] if trained.dtype == torch.int64 else got["sigmas"]  # VP: integer t; flow: sigma
    torch.testing.assert_close(visited[:steps].to(trained.dtype), trained, atol=0, rtol=1e-6)
    # ... and reproduces the EMA student's rollout from the same noise and re-noising draws.
    cond = {k: v[:2] for k, v in ds.cond.items()}  # PROMPTS[:2], encoded once by the teacher's pipeline
    with torch.no_grad(), trainer.ema_weights() as student:
        torch.manual_seed(SEED)
        want = rollout(student, trainer.recipe.schedule, cond, noise.clone())
    assert want.std() > 1e-3
    torch.testing.assert_close(got["latents"], want, atol=2e-5, rtol=1e-4)


def test_cached_prompt_embeddings_are_the_pipelines_and_reused(tmp_path, monkeypatch):
    from distill.targets import PromptDataset

    teacher = BUILDERS["sd15"](tmp_path / "sd15")
    prompts = write_prompts(tmp_path / "p.txt")
    first = PromptDataset(teacher, prompts, 16, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    torch.testing.assert_close(first.cond["encoder_hidden_states"], want)
    torch.testing.assert_close(first.null_condition["encoder_hidden_states"], empty)
    assert first.image_shape == (4, 8, 8)  # VAE factor 2 at 16 px
    from distill.targets import Target

    def no_encoder(*_):
        raise AssertionError("the text encoders ran again instead of the cache being read")

    monkeypatch.setattr(Target, "load_text_pipeline", no_encoder)
    again = PromptDataset(teacher, prompts, 16, tmp_path / "cache")
    assert torch.equal(again.cond["encoder_hidden_states"], first.cond["encoder_hidden_states"])


def test_flow_unet2d_teacher_is_refused_before_training(tmp_path):
    """The reported bug: a class-conditional flow-matching UNet2DModel teacher ended in a NotImplementedError from
    the export. No stock pipeline can sample it, so the config is refused when loaded, saying why."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tiny import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "t" / "unet", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "t" / "scheduler")
    with pytest.raises(ConfigError) as e:
        load_config("dmd2_digits.yaml", [f"teacher.path={tmp_path / 't'}", "teacher.prediction=null"])
    msg = str(e.value)
    assert msg.startswith("teacher.path") and "flow matching" in msg and "ConsistencyModelPipeline" in msg
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "train", "dmd2_digits.yaml",
                           f"teacher.path={tmp_path / 't'}", "teacher.prediction=null",
                           f"run.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ConsistencyModelPipeline" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_flux_dynamic_shift_comes_from_the_resolution():
    """Flux's shift mu is the pipeline's calculate_shift of the packed token count at the run's resolution."""
    from distill.parametrization import flow_shift_mu
    from distill.targets import TARGETS

    flux = TARGETS["FluxTransformer2DModel"]
    net = {"_class_name": "FluxTransformer2DModel", "in_channels": 64}
    assert flux.image_seq_len(Path("/nonexistent"), net, 1024) == 4096  # (1024 / 8 / 2)^2 with the VAE factor 8
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    from distill.denoiser import process_from_scheduler_config

    process, kind = process_from_scheduler_config(sched, flow_shift_mu(4096))
    assert kind == "flow" and process.mu == pytest.approx(1.15)
    with pytest.raises(ValueError, match="resolution"):
        process_from_scheduler_config(sched)
