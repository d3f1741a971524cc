"""Each family's tiny whole pipeline: two DMD2 steps through the trainer (with the family's shipped config, the
teacher swapped for the tiny pipeline), export to the family's stock pipeline, then a process that cannot import
`distill` loads the folder, samples with the model card's exact call, and samples from given noise (the same call,
only the prompt, latents and output type set) what must equal the student's own k-step rollout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import NO_DISTILL, subprocess_env
from tiny_pipelines import BUILDERS, CLASS_PROMPTS, PROMPTS, write_prompts

from distill.base.errors import ConfigError
from distill.models.schedules import rollout
from distill.training.preflight import load_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 4321
# (family, student steps, expected pipeline); sdxl is the slowest to load and marked slow, and so are the second
# PixArt pipeline class and DiT's 2-step case (each default case costs about 12 s of CPU, half of it the clean
# process importing diffusers).
CASES = [("sd15", 2, "StableDiffusionPipeline"), ("sd3", 1, "StableDiffusion3Pipeline"),
         pytest.param("sd3", 2, "StableDiffusion3Pipeline", id="sd3-2"),
         pytest.param("sdxl", 2, "StableDiffusionXLPipeline", marks=pytest.mark.slow),
         ("flux", 2, "FluxPipeline"), ("wan", 2, "WanPipeline"), ("pixart", 1, "PixArtAlphaPipeline"),
         ("pixart_1024", 2, "PixArtAlphaPipeline"), ("dit", 1, "DiTPipeline"),
         pytest.param("pixart_sigma", 2, "PixArtSigmaPipeline", marks=pytest.mark.slow),
         pytest.param("dit", 2, "DiTPipeline", id="dit-2", marks=pytest.mark.slow)]

# family -> (its shipped config, overrides of it for the tiny stand-in beyond the common ones in _run)
CONFIGS = {"sd15": ("sd15/dmd2.yaml", ()), "sd3": ("sd15/dmd2.yaml", ()), "sdxl": ("sd15/dmd2.yaml", ()),
           "flux": ("flux/dmd2.yaml", ("recipe.lora_rank=4",)), "wan": ("wan/dmd2.yaml", ("data.num_frames=5",)),
           "pixart": ("pixart/dmd2.yaml", ()), "pixart_1024": ("pixart/dmd2.yaml", ()),
           "pixart_sigma": ("pixart/dmd2.yaml", ()), "dit": ("dit/dmd2.yaml", ())}

CLEAN_LOAD = NO_DISTILL + r"""
import torch
from diffusers import DiffusionPipeline

spec = json.load(open(sys.argv[1]))
meta = json.load(open(spec["folder"] + "/distill.json"))
pipe = DiffusionPipeline.from_pretrained(spec["folder"])
pipe.set_progress_bar_config(disable=True)
card = open(spec["folder"] + "/README.md").read()
assert f"{meta['output']} = {meta['call']}.{meta['output']}" in card, "the model card states the call"


def card_call(**override):
    # the model card's exact call, with only the given arguments replaced (a prompt replaces the card's); torch's
    # global generator is seeded after the card's own arguments ran (a card's generator=torch.manual_seed(0))
    def call(*args, **kwargs):
        torch.manual_seed(spec["seed"])  # flow pipelines and DiT draw the re-noising from the global generator
        return pipe(*(() if "prompt" in override else args), **{**kwargs, **override})
    return getattr(eval(meta["call"], {"pipe": call, "torch": torch}), meta["output"])


samples = card_call()  # the exact call of the model card, default output
if spec["class_names"]:  # DiTPipeline kept the teacher's class names
    assert pipe.get_label_ids(list(spec["class_names"])) == list(spec["class_names"].values()), pipe.labels
side = meta["resolution"]
if meta["output"] == "frames":
    assert samples.shape == (1, meta["num_frames"], side, side, 3), samples.shape
else:
    assert samples and all(im.size == (side, side) for im in samples), samples
override = {"generator": torch.Generator().manual_seed(spec["seed"])}
if spec["class_labels"] is not None:  # DiTPipeline takes no latents: its generator draws them
    override.update(class_labels=spec["class_labels"], output_type="np",
                    generator=torch.Generator().manual_seed(spec["noise_seed"]))
else:
    override.update(prompt=spec["prompts"], latents=torch.load(spec["noise"]), output_type="latent")
out = card_call(**override)
torch.save({"samples": torch.as_tensor(out), "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__, "timesteps": pipe.scheduler.timesteps.clone(),
            "sigmas": getattr(pipe.scheduler, "sigmas", None)}, spec["results"])
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def _run(family: str, steps: int, root: Path, *extra: str):
    teacher = BUILDERS[family](root / family)
    prompts = write_prompts(root / "prompts.txt", CLASS_PROMPTS if family == "dit" else PROMPTS)
    yaml, overrides = CONFIGS[family]
    cfg = load_config(yaml, [
        f"teacher.path={teacher}", f"run.output_dir={root / 'run'}", f"data.prompts={prompts}",
        f"data.cache_dir={root / 'cache'}", "data.resolution=16", "data.batch_size=2", "run.max_steps=2",
        "trainer.progress_bar=false", "trainer.checkpoint_every=0", f"student.num_steps={steps}",
        "teacher.guidance_scale=2.0", "trainer.ema_decay=0.5", "trainer.generator.lr=1e-3",
        "trainer.gradient_accumulation_steps=1", *overrides, *extra])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def _decoded(folder: Path, latents: torch.Tensor) -> torch.Tensor:
    """DiTPipeline's output for `latents` (output_type="np"): the VAE's decode in [0, 1], channels last."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("family,steps,pipeline", CASES)
def test_family_trains_exports_and_reloads(family, steps, pipeline, tmp_path):
    from distill.families.flux import pack

    trainer = _run(family, steps, tmp_path)
    folder = tmp_path / "run" / "pipeline"
    meta = json.loads((folder / "distill.json").read_text())
    assert meta["pipeline"] == pipeline and meta["num_inference_steps"] == steps
    ds = trainer.dataset
    packed = trainer.recipe.schedule.packed if hasattr(trainer.recipe.schedule, "packed") else False
    noise = torch.randn(2, *ds.image_shape, generator=torch.Generator().manual_seed(0))
    torch.save(pack(noise) if packed else noise, tmp_path / "noise.pt")  # FluxPipeline takes packed latents
    cond = {k: v[:2] for k, v in ds.cond.items()}  # the first two prompts, encoded once by the teacher's pipeline
    labels = cond["class_labels"].tolist() if ds.target.class_conditional else None
    spec = {"folder": str(folder), "noise": str(tmp_path / "noise.pt"), "results": str(tmp_path / "out.pt"),
            "seed": SEED, "noise_seed": 0, "prompts": PROMPTS[:2], "class_labels": labels,
            "class_names": {"trio": 3, "nine": 9} if family == "dit" else None}
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
    with torch.no_grad(), trainer.ema_weights() as student:
        torch.manual_seed(SEED)
        want = rollout(student, trainer.recipe.schedule, cond, noise.clone())
    assert want.std() > 1e-3
    if labels is not None:  # DiTPipeline returns decoded images only
        torch.testing.assert_close(got["samples"], _decoded(folder, want), atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(got["samples"], pack(want) if packed else want, atol=2e-5, rtol=1e-4)


def test_cached_prompt_embeddings_are_the_pipelines_and_reused(tmp_path, monkeypatch):
    from distill.data.prompts import PromptDataset

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
    from distill.families.target import Target

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
        load_config("digits/dmd2.yaml", [f"teacher.path={tmp_path / 't'}", "teacher.prediction=null"])
    msg = str(e.value)
    assert msg.startswith("teacher.path") and "flow matching" in msg and "ConsistencyModelPipeline" in msg
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "train", "digits/dmd2.yaml",
                           f"teacher.path={tmp_path / 't'}", "teacher.prediction=null",
                           f"run.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ConsistencyModelPipeline" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_flux_dynamic_shift_comes_from_the_resolution():
    """Flux's shift mu is the pipeline's calculate_shift of the packed token count at the run's resolution."""
    from distill.families.flux import FLUX as flux
    from distill.parametrization import flow_shift_mu
    net = {"_class_name": "FluxTransformer2DModel", "in_channels": 64}
    assert flux.image_seq_len(Path("/nonexistent"), net, 1024) == 4096  # (1024 / 8 / 2)^2 with the VAE factor 8
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    from distill.models.denoiser import process_from_scheduler_config

    process, kind = process_from_scheduler_config(sched, flow_shift_mu(4096))
    assert kind == "flow" and process.mu == pytest.approx(1.15)
    with pytest.raises(ValueError, match="resolution"):
        process_from_scheduler_config(sched)


def _load_refused(yaml: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(yaml, list(overrides))
    return str(e.value)


def test_dit_at_another_size_than_its_transformer_is_refused_before_training(tmp_path):
    """DiTPipeline has no height or width argument: it samples at its transformer's sample_size, so a student
    trained at any other size could not leave as it. Refused when the config is loaded, saying the size to use."""
    teacher = BUILDERS["dit"](tmp_path / "dit")
    prompts = write_prompts(tmp_path / "classes.txt", CLASS_PROMPTS)
    msg = _load_refused("dit/dmd2.yaml", f"teacher.path={teacher}", f"data.prompts={prompts}", "data.resolution=32")
    assert msg.startswith("data.resolution") and "sample_size" in msg and "data.resolution=16" in msg
    assert load_config("dit/dmd2.yaml", [f"teacher.path={teacher}", f"data.prompts={prompts}",
                                         "data.resolution=16"]).data.resolution == 16
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "train", "dit/dmd2.yaml", f"teacher.path={teacher}",
                           f"data.prompts={prompts}", "data.resolution=32", f"run.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "data.resolution=16" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lines,words", [(["3", "a red square"], "one class index per line"),
                                         (["3", "10"], "classes 0..9")])
def test_dit_prompts_must_be_its_class_indices(tmp_path, lines, words):
    teacher = BUILDERS["dit"](tmp_path / "dit")
    prompts = write_prompts(tmp_path / "classes.txt", lines)
    msg = _load_refused("dit/dmd2.yaml", f"teacher.path={teacher}", f"data.prompts={prompts}", "data.resolution=16")
    assert msg.startswith("data.prompts") and words in msg


def test_video_and_image_frame_counts_are_checked_when_the_config_loads(tmp_path):
    """WanPipeline rounds num_frames to temporal-factor k + 1 (the tiny VAE's factor is 2); an image pipeline makes
    one frame. Either mismatch would export a student that samples another shape than it trained on."""
    wan = BUILDERS["wan"](tmp_path / "wan")
    prompts = write_prompts(tmp_path / "prompts.txt")
    msg = _load_refused("wan/dmd2.yaml", f"teacher.path={wan}", f"data.prompts={prompts}", "data.num_frames=6")
    assert msg.startswith("data.num_frames") and "2k + 1" in msg
    msg = _load_refused("wan/dmd2.yaml", f"teacher.path={wan}", f"data.prompts={prompts}", "data.resolution=40")
    assert msg.startswith("data.resolution") and "multiple of 16" in msg  # WanPipeline: height % 16
    pixart = BUILDERS["pixart"](tmp_path / "pixart")
    msg = _load_refused("pixart/dmd2.yaml", f"teacher.path={pixart}", f"data.prompts={prompts}", "data.num_frames=5")
    assert msg.startswith("data.num_frames") and "images" in msg


def test_hub_class_names_and_pipelines_pick_the_target():
    """Hub checkpoints of DiT-XL-2 and PixArt-alpha name their transformer `Transformer2DModel` (diffusers loads it
    by its norm_type); a PixArt teacher exports into the pipeline class its folder was saved as."""
    from distill.families.target import target_for

    vp = {"_class_name": "DDIMScheduler", "beta_schedule": "linear"}
    dit = target_for({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"}, vp)
    assert dit.pipeline == "DiTPipeline" and dit.class_conditional
    pixart = {"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single"}
    assert target_for(pixart, vp, pipeline="PixArtAlphaPipeline").pipeline == "PixArtAlphaPipeline"
    assert target_for(pixart, vp, pipeline="PixArtSigmaPipeline").pipeline == "PixArtSigmaPipeline"
    assert target_for({**pixart, "_class_name": "PixArtTransformer2DModel"}, vp).pipeline == "PixArtSigmaPipeline"
    with pytest.raises(ValueError, match="Transformer2DModel"):  # a plain (non-DiT, non-PixArt) one has no target
        target_for({"_class_name": "Transformer2DModel", "norm_type": "layer_norm"}, vp)


def test_pixart_1024_needs_its_micro_conditions():
    """PixArt-alpha 1024 (sample_size 128) embeds the image size and aspect ratio; without them in the condition
    the call says so instead of failing inside diffusers."""
    from diffusers import PixArtTransformer2DModel

    from distill.families.dit import PixArtFamily

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                                     attention_head_dim=12, num_attention_heads=2, cross_attention_dim=24,
                                     caption_channels=8, norm_type="ada_norm_single")
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="resolution"):
        PixArtFamily().call(model, x, t, {"encoder_hidden_states": text})
    cond = {"encoder_hidden_states": text, "resolution": torch.tensor([[16.0, 16.0]] * 2),
            "aspect_ratio": torch.ones(2, 1)}
    want = model(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs={
        "resolution": cond["resolution"], "aspect_ratio": cond["aspect_ratio"]}).sample[:, :4]
    torch.testing.assert_close(PixArtFamily().call(model, x, t, cond), want)
    other = PixArtFamily().call(model, x, t, {**cond, "resolution": torch.tensor([[32.0, 32.0]] * 2)})
    assert (other - want).abs().max() > 1e-6  # the size reaches the network


def test_flow_k_step_schedules_end_at_the_trailing_step():
    """SD3 and Wan sample through `set_timesteps(k)`, which alone ends at sigma_min (a last step at sigma 0.003,
    nearly a no-op); the exported scheduler's shift_terminal puts the last step at shift(1/k), as Flux's
    linspace(1, 1/k, k) does, and the first stays at 1."""
    from distill.families.sd3 import SD3
    from distill.families.wan import WAN
    from distill.models.schedules import student_times

    def shifted(s, shift=3.0):
        return shift * s / (1 + (shift - 1) * s)

    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    wan = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0}
    for target, sched in ((SD3, sd3), (WAN, wan)):
        assert student_times(target, sched, 1, 0).tolist() == [1.0]
        for k in (2, 3, 4):
            times = student_times(target, sched, k, 0)
            assert times[0] == 1.0 and times[-1].item() == pytest.approx(shifted(1 / k), abs=1e-6)
            assert (times[1:] < times[:-1]).all()
        assert student_times(target, sched, 2, 0).tolist() == pytest.approx([1.0, 0.75])


def test_latent_teacher_refuses_pixel_sample_grids(tmp_path):
    """A latent family's samples are VAE latents: trainer.sample_every > 0 is an error naming the key, before any
    update, instead of a crash in the grid writer at that step."""
    teacher = BUILDERS["sd15"](tmp_path / "sd15")
    prompts = write_prompts(tmp_path / "prompts.txt")
    cfg = load_config("sd15/dmd2.yaml", [
        f"teacher.path={teacher}", f"run.output_dir={tmp_path / 'run'}", f"data.prompts={prompts}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=16", "data.batch_size=2", "run.max_steps=2",
        "trainer.progress_bar=false", "trainer.sample_every=1"])
    with pytest.raises(ConfigError, match=r"^trainer\.sample_every: .*VAE latents"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()
