"""Students leave as stock diffusers pipelines; their training sampler is the pipeline's sampler.

For each export target this module holds (a) the schedule a k-step student visits, exactly as the stock
pipeline will visit it (recipes train with it, so training and inference timesteps cannot drift apart), and
(b) the writer of the pipeline folder with a model card that states the exact call and how to seed it
(`distill.families.target.seeding`, also in `distill.json`).

Targets so far:

* class-conditional pixel-space UNet2DModel under EDM/consistency preconditioning ->
  `ConsistencyModelPipeline` + `CMStochasticIterativeScheduler` (one step by default; a k-step student is
  called with `num_inference_steps=k`, which reproduces its trained sigmas exactly);
* latent families (SD1.5, SDXL, SD3, Flux, Wan, PixArt, DiT) -> their own stock pipelines, with the schedules
  and writers of their targets (declared by each family module, `distill.families.target.Target`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from distill.models.denoiser import Denoiser
from distill.models.schedules import cm_scheduler, latent_target, student_schedule
from distill.parametrization import EDMProcess

# ---------------------------------------------------------------------------------------------------------------
# Writing the pipeline folder
# ---------------------------------------------------------------------------------------------------------------


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; an existing one is swapped out first, then removed."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _unet_without_null_class(unet):
    """A copy of a class-conditional UNet2DModel without its last (null, CFG-only) class embedding row, so the
    stock pipeline's default random labels are always real classes."""
    from diffusers import UNet2DModel

    n = unet.config.num_class_embeds
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["num_class_embeds"] = n - 1
    trimmed = UNet2DModel.from_config(config)
    state = unet.state_dict()
    state["class_embedding.weight"] = state["class_embedding.weight"][: n - 1]
    trimmed.load_state_dict(state)
    return trimmed


def export_pipeline(student: Denoiser, out_dir: str | Path, num_steps: int, config: Any = None,
                    drop_null_class: bool = True, timesteps: list[int] | None = None) -> Path:
    """Write `student` as a stock diffusers pipeline folder into `out_dir` (atomically) with a model card.

    A student trained on custom intermediate `timesteps` (see :func:`student_schedule`) is called with
    `timesteps=` (stated in the model card and `distill.json`) instead of `num_inference_steps=`."""
    from diffusers import ConsistencyModelPipeline, UNet2DModel

    from distill.families.target import seeding

    out_dir = Path(out_dir)
    adapter = None
    if callable(getattr(student, "merged", None)):  # an adapter on a shared base (distill.models.adapters): merge it
        adapter, student = student, student.merged()
    if latent_target(student) is not None:
        return _export_latent(student, out_dir, num_steps, config, adapter)
    if not (isinstance(student.process, EDMProcess) and student.prediction == "cm" and isinstance(student.model, UNet2DModel)):
        raise NotImplementedError(
            f"no stock pipeline target for a {type(student.model).__name__} student with "
            f"{type(student.process).__name__}/{student.prediction!r} yet")
    unet = student.model
    if drop_null_class and unet.config.num_class_embeds is not None:
        unet = _unet_without_null_class(unet)
    unet = unet.to("cpu").eval()
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=cm_scheduler(student.process))
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    sigmas = student_schedule(student, num_steps, timesteps).times.tolist()
    if timesteps is not None:
        steps_arg = f"timesteps={list(timesteps)}"
        call = f"pipe(batch_size=4, class_labels=[0, 1, 2, 3], num_inference_steps=None, {steps_arg})"
    else:
        steps_arg = f"num_inference_steps={num_steps}"
        call = "pipe(batch_size=4, class_labels=[0, 1, 2, 3])" if num_steps == 1 else f"pipe(batch_size=4, class_labels=[0, 1, 2, 3], {steps_arg})"
    seed = seeding("ConsistencyModelPipeline", True, num_steps >= 2)
    meta = {"num_inference_steps": num_steps, "trained_sigmas": sigmas, "guidance": "none (CFG was distilled in)",
            "seeding": seed, "recipe": getattr(config, "recipe_name", None)}
    if timesteps is not None:
        meta["timesteps"] = list(timesteps)
    (tmp / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(
        "---\nlibrary_name: diffusers\npipeline_tag: unconditional-image-generation\ntags: [distill, consistency]\n---\n\n"
        f"# {num_steps}-step distilled student\n\n"
        f"Distilled with `distill` ({meta['recipe']}). A stock `ConsistencyModelPipeline`; no custom code.\n\n"
        "```python\nfrom diffusers import DiffusionPipeline\n\n"
        f"pipe = DiffusionPipeline.from_pretrained(\"{out_dir.name}\")\n"
        f"images = {call}.images\n```\n\n"
        f"- steps: {num_steps} (the trained sigmas {['%.4g' % s for s in sigmas]} are what "
        f"`{steps_arg}` gives)\n"
        "- guidance: none; the teacher's classifier-free guidance was distilled into the student\n"
        + seeding_line(seed) +
        f"- classes: 0..{unet.config.num_class_embeds - 1}" + (" (omit `class_labels` for random classes)\n" if unet.config.num_class_embeds else "\n")
    )
    replace_dir(tmp, out_dir)
    return out_dir


def none_kwargs(components: list[str]) -> str:
    """`, text_encoder_3=None, tokenizer_3=None`: the from_pretrained arguments of components a folder lacks."""
    return "".join(f", {name}=None" for name in components)


def torch_import(call: str) -> str:
    """`import torch` and a newline for a model card's code whose call uses torch (its seeded generator), else ""."""
    return "import torch\n" if "torch." in call else ""


def seeding_line(seed: dict) -> str:
    """The model card's line on seeding, from distill.json's `seeding` (:func:`distill.families.target.seeding`)."""
    if seed["generator_alone"]:
        return f"- seeding: `{seed['call']}` fixes the sample: {seed['why']}\n"
    return f"- seeding: `{seed['call']}`, as in the call above: {seed['why']}\n"


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def add_lora(adapter, target, folder: Path, name: str, config: Any) -> None:
    """Beside a latent export in `folder` (its distill.json and model card written), the student's adapter (an
    `AdapterDenoiser`) alone as pytorch_lora_weights.safetensors in diffusers' LoRA format for `target`'s pipeline,
    written by the pipeline's own `save_lora_weights` (peft keys prefixed with `unet.` or `transformer.`, the LoRA
    config as metadata), so `pipe.load_lora_weights(folder)` on the teacher's pipeline rebuilds the student; the
    model card gets the calls (`name`: the folder's final name). Nothing for a pipeline without a LoRA loader (DiT,
    PixArt)."""
    cls = target.diffusers_pipeline()
    if adapter.adapter is None or target.subfolder not in (getattr(cls, "_lora_loadable_modules", None) or []):
        return
    state, lora = adapter.lora_weights()
    cls.save_lora_weights(folder, **{f"{target.subfolder}_lora_layers": state,
                                     f"{target.subfolder}_lora_adapter_metadata": lora},
                          weight_name=LORA_WEIGHTS, safe_serialization=True)
    teacher = getattr(getattr(config, "teacher", None), "path", None) or adapter.source["folder"]
    meta = json.loads((folder / "distill.json").read_text())
    meta["lora"] = {"weights": LORA_WEIGHTS, "rank": lora["r"], "alpha": lora["lora_alpha"], "base": teacher}
    (folder / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    output = meta.get("output", "images")
    with open(folder / "README.md", "a") as card:
        card.write(
            f"\n## The student as a LoRA on its teacher\n\n`{LORA_WEIGHTS}` holds the student alone: a rank-"
            f"{lora['r']} LoRA on `{teacher}` in diffusers' format (the folder above is the same student merged). "
            "Load it onto the teacher's pipeline and use this folder's scheduler:\n\n"
            f"```python\n{torch_import(meta['call'])}import diffusers\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{teacher}\"{none_kwargs(meta.get('absent_components', []))})\n"
            f"pipe.load_lora_weights(\"{name}\")\n"
            f"pipe.scheduler = diffusers.{scheduler}.from_pretrained(\"{name}\", subfolder=\"scheduler\")\n"
            f"{output} = {meta['call']}.{output}\n```\n")


def _export_latent(student: Denoiser, out_dir: Path, num_steps: int, config: Any, adapter=None) -> Path:
    """A latent family's student, written into its teacher's own pipeline (VAE, text encoders, tokenizers); a
    student trained as an adapter on the teacher (`adapter`) also as a LoRA file (:func:`add_lora`)."""
    target = latent_target(student)
    src = student.source
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    target.write(student.model.to("cpu").eval(), Path(src["folder"]), tmp, num_steps, src["scheduler_config"])
    times = student_schedule(student, num_steps).times.tolist()
    resolution = src["resolution"] or 0
    num_frames = getattr(getattr(config, "data", None), "num_frames", 1) if target.video else 1
    guidance = target.guidance_scale(src["network_config"])
    seed = target.seeding(num_steps)
    call = target.call(num_steps, resolution, guidance, num_frames, global_seed=not seed["generator_alone"])
    absent = target.absent_components(tmp)  # loaded as None (SD3 without T5)
    meta = {"pipeline": target.pipeline, "num_inference_steps": num_steps, "trained_timesteps": times,
            "resolution": resolution, "num_frames": num_frames, "call": call, "output": target.output,
            "guidance_scale": guidance, "guidance": "none (CFG was distilled in)", "seeding": seed,
            "recipe": getattr(config, "recipe_name", None)}
    if absent:
        meta["absent_components"] = absent
    if target.embedded_guidance(src["network_config"]) is not None:
        guidance_line = (f"- guidance: `guidance_scale={guidance}` is the embedded guidance the student was trained "
                         "with (Flux dev's default); the teacher's classifier-free guidance was distilled in\n")
    else:
        guidance_line = ("- guidance: off (the guidance_scale above); the teacher's classifier-free guidance was "
                         "distilled in\n")
    size = f"{resolution}x{resolution}" + (f", {num_frames} frames" if target.video else "")
    (tmp / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(
        "---\nlibrary_name: diffusers\ntags: [distill]\n---\n\n"
        f"# {num_steps}-step distilled student\n\n"
        f"Distilled with `distill` ({meta['recipe']}). A stock `{target.pipeline}` with `{type(target.scheduler(src['scheduler_config'], num_steps)).__name__}`; no custom code.\n\n"
        f"```python\n{torch_import(call)}from diffusers import DiffusionPipeline\n\n"
        f"pipe = DiffusionPipeline.from_pretrained(\"{out_dir.name}\"{none_kwargs(absent)})\n"
        f"{target.output} = {call}.{target.output}\n```\n\n"
        f"- steps: {num_steps}; `num_inference_steps={num_steps}` visits exactly the trained timesteps "
        f"{['%.4g' % t for t in times]}\n"
        + guidance_line + seeding_line(seed) +
        (f"- trained at {size}" + (" (DiTPipeline samples at its transformer's sample_size; class_labels are "
                                   "class indices)\n" if target.class_conditional else "\n")))
    if adapter is not None:
        add_lora(adapter, target, tmp, out_dir.name, config)
    replace_dir(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Students with one expert per step (Phased DMD): one stock folder per expert and a documented loop
# ---------------------------------------------------------------------------------------------------------------

#: The sampling loop of an expert-per-step export, written into its model card and run by the tests in a process
#: without `distill`. It is ConsistencyModelPipeline's own loop (same random draws: the initial noise, then one
#: draw per scheduler step) with the UNet switched per step.
EXPERT_LOOP = '''import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor


@torch.no_grad()
def sample_phased(folder, class_labels, generator=None):
    """Images in [0, 1] of shape (N, C, H, W): expert i of `folder` runs step i of the stock scheduler."""
    meta = __import__("json").load(open(f"{folder}/distill.json"))
    experts = [DiffusionPipeline.from_pretrained(f"{folder}/{name}").unet for name in meta["experts"]]
    scheduler = DiffusionPipeline.from_pretrained(f"{folder}/{meta['experts'][0]}").scheduler
    scheduler.set_timesteps(len(experts))
    labels = torch.as_tensor(class_labels)
    config = experts[0].config
    shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
    x = randn_tensor(shape, generator=generator) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = experts[i](scheduler.scale_model_input(x, t), t, class_labels=labels, return_dict=False)[0]
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    return (x / 2 + 0.5).clamp(0, 1)
'''


#: The sampling of a latent family's expert-per-step export, written into its model card and run by the tests in a
#: process without `distill`: the stock pipeline of expert 0 and its own `callback_on_step_end`, which hands step
#: i + 1 to expert i + 1 (and the pipeline back to expert 0 after the last step).
LATENT_EXPERT_LOOP = '''import json

from diffusers import DiffusionPipeline


def load_phased(folder):
    """(pipeline of expert 0, the callback that switches experts): pass callback_on_step_end=switch to each call."""
    meta = json.load(open(f"{folder}/distill.json"))
    pipe = DiffusionPipeline.from_pretrained(f"{folder}/{meta['experts'][0]}")
    part = meta["network"]  # "unet" or "transformer"
    first = getattr(pipe, part)
    experts = [first] + [type(first).from_pretrained(f"{folder}/{name}", subfolder=part)
                         for name in meta["experts"][1:]]

    def switch(pipe, i, t, callback_kwargs):
        setattr(pipe, part, experts[(i + 1) % len(experts)])
        return callback_kwargs

    return pipe, switch
'''


def export_experts(experts: list[Denoiser], out_dir: str | Path, num_steps: int, config: Any = None) -> Path:
    """Write a student whose step i runs `experts[i]`: each expert as a stock pipeline folder `phase_<i>/`
    (loads with `DiffusionPipeline.from_pretrained`, no custom code), `distill.json` and a model card with
    :data:`EXPERT_LOOP`. No stock diffusers pipeline switches UNets between steps, and a custom pipeline class
    would need remote code, so the loop is shipped as documentation instead. A latent family's experts go
    through :func:`_export_latent_experts`."""
    from distill.families.target import seeding

    if len(experts) != num_steps:
        raise ValueError(f"an expert-per-step student needs one expert per step: {len(experts)} experts, "
                         f"{num_steps} steps")
    out_dir = Path(out_dir)
    if latent_target(experts[0]) is not None:
        return _export_latent_experts(experts, out_dir, num_steps, config)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = [f"phase_{i}" for i in range(num_steps)]
    recipe = getattr(config, "recipe_name", None)
    for i, (name, expert) in enumerate(zip(names, experts)):
        export_pipeline(expert, tmp / name, num_steps=num_steps, config=config)
        (tmp / name / "README.md").write_text(
            f"# expert {i} of {num_steps} (phase {i}, step {i} of the sampler)\n\nA stock `ConsistencyModelPipeline` "
            "folder holding one expert of a phased student; it is not a sampler on its own. See ../README.md.\n")
    sigmas = student_schedule(experts[0], num_steps).times.tolist()
    seed = seeding("sample_phased", True, num_steps >= 2)  # the loop passes its generator to scheduler.step
    meta = {"experts": names, "num_inference_steps": num_steps, "trained_sigmas": sigmas, "recipe": recipe,
            "guidance": "none (CFG was distilled in)", "seeding": seed}
    (tmp / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(
        "---\nlibrary_name: diffusers\ntags: [distill, phased-dmd, mixture-of-experts]\n---\n\n"
        f"# {num_steps}-step phased student ({num_steps} experts)\n\n"
        f"Distilled with `distill` ({recipe}). Step i of the sampler runs expert i (`phase_<i>/`): each expert "
        "is a complete stock `ConsistencyModelPipeline` folder (safetensors, stock "
        "`CMStochasticIterativeScheduler`), loaded with `DiffusionPipeline.from_pretrained` and no custom code.\n\n"
        "Why no single pipeline: a stock diffusers pipeline holds one UNet and cannot switch it between steps, "
        "and a custom pipeline class would need `trust_remote_code`. The loop below is ConsistencyModelPipeline's "
        "own loop with the UNet chosen per step; it uses diffusers only.\n\n"
        f"```python\n{EXPERT_LOOP}\n"
        f"images = sample_phased(\"{out_dir.name}\", class_labels=[0, 1, 2, 3], "
        "generator=torch.Generator().manual_seed(0))\n```\n\n"
        f"- steps: {num_steps}, one per expert (sigmas {['%.4g' % s for s in sigmas]}, what "
        f"`set_timesteps({num_steps})` gives)\n"
        "- guidance: none; the teacher's classifier-free guidance was distilled into the student\n"
        + seeding_line(seed))
    replace_dir(tmp, out_dir)
    return out_dir


def _export_latent_experts(experts: list[Denoiser], out_dir: Path, num_steps: int, config: Any) -> Path:
    """Expert 0 as the family's stock pipeline (`phase_0/`, the student export of :func:`export_pipeline`), each
    later expert as its network folder alone (`phase_<i>/<unet or transformer>/`: the VAE and text encoders are
    shared), and a model card whose :data:`LATENT_EXPERT_LOOP` switches them through `callback_on_step_end`."""
    target = latent_target(experts[0])
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = [f"phase_{i}" for i in range(num_steps)]
    export_pipeline(experts[0], tmp / names[0], num_steps=num_steps, config=config)
    first = json.loads((tmp / names[0] / "distill.json").read_text())
    call, output = first["call"], first.get("output", "images")
    for name, expert in zip(names[1:], experts[1:]):
        expert.model.to("cpu").save_pretrained(tmp / name / target.subfolder, safe_serialization=True)
    times = student_schedule(experts[0], num_steps).times.tolist()
    recipe = getattr(config, "recipe_name", None)
    src = experts[0].source
    meta = {"experts": names, "network": target.subfolder, "pipeline": target.pipeline,
            "num_inference_steps": num_steps, "trained_timesteps": times, "resolution": src["resolution"] or 0,
            "call": call, "recipe": recipe, "guidance": "none (CFG was distilled in)", "seeding": first["seeding"]}
    (tmp / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / names[0] / "README.md").write_text(
        f"# expert 0 of {num_steps} (step 0 of the sampler)\n\nA stock `{target.pipeline}` holding the first expert "
        "of a phased student; alone it is not the student. See ../README.md.\n")
    switched = call[:-1] + ", callback_on_step_end=switch)"
    (tmp / "README.md").write_text(
        "---\nlibrary_name: diffusers\ntags: [distill, phased-dmd, mixture-of-experts]\n---\n\n"
        f"# {num_steps}-step phased student ({num_steps} experts)\n\n"
        f"Distilled with `distill` ({recipe}). Step i of the sampler runs expert i: `phase_0/` is a complete stock "
        f"`{target.pipeline}` holding expert 0, `phase_<i>/{target.subfolder}/` holds expert i. A stock pipeline "
        "holds one network; the pipeline's own `callback_on_step_end` hands it the next expert after each step "
        "(diffusers only, no custom code).\n\n"
        f"```python\n{torch_import(call)}{LATENT_EXPERT_LOOP}\n"
        f"pipe, switch = load_phased(\"{out_dir.name}\")\n"
        f"{output} = {switched}.{output}\n```\n\n"
        f"- steps: {num_steps}, one per expert; `num_inference_steps={num_steps}` visits exactly the trained timesteps "
        f"{['%.4g' % t for t in times]}\n"
        "- guidance: off (the guidance_scale above); the teacher's classifier-free guidance was distilled in\n"
        + seeding_line(first["seeding"]))
    replace_dir(tmp, out_dir)
    return out_dir
