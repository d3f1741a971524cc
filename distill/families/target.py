"""What every export target of a latent (text- or class-conditioned) family shares: the stock pipeline a student
leaves as, the schedule its k-step sampler visits, the exported call, and what cannot be exported (and why).

The targets themselves live with their families (`distill/families/<family>.py`): each family module declares its
`Target` instances (a subclass where its pipeline encodes prompts, adds conditions or is called its own way) and
picks one from a teacher's configs (`export_target`); `target_for` finds it through the family registry, so a new
family is one new module plus one registry line in `distill/families/__init__.py`, and this file knows no pipeline
by name.

The rule (docs/design.md): a student trains with exactly its pipeline's sampler. Every target here samples
"predict x0, re-noise to the next trained time with fresh noise" (DMD2 sec. 4.4, backward simulation):

* VP families (SD1.5, SDXL, PixArt-alpha/sigma, DiT) -> `LCMScheduler` with `original_inference_steps = k` (its
  timesteps are then k trailing steps: 999, 749, 499, 249 for k = 4; 999 for k = 1) and `timestep_scaling = 1e10`,
  which turns its consistency boundary off (c_skip -> 0, c_out -> 1 exactly in float32), so `step` is x0 from the
  network's epsilon / v prediction, then alpha(t_next) x0 + sigma(t_next) noise.
* Flow families (SD3, Flux, Wan) -> `FlowMatchEulerDiscreteScheduler` with the teacher's shift (static, or
  dynamic with the pipeline's mu for the resolution) and `stochastic_sampling=True`, so `step` is
  x0 = x - s v, then (1 - s_next) x0 + s_next noise; the trained times are `scheduler.sigmas[:k]` after the
  pipeline's own `set_timesteps` call (SD3 and Wan: `set_timesteps(k)`; Flux: `sigmas=linspace(1, 1/k, k)`).
  `set_timesteps(k)` alone would end at sigma_min (~0.003 with shift 3: the last of k steps nearly a no-op), so a
  static-shift target with k >= 2 sets the scheduler's `shift_terminal` to shift(1/k), the trailing end Flux's
  sigmas have; its first step stays at 1.
  `step` draws the re-noising in the pipeline's latent layout (Flux: packed tokens), and so does the student
  (`NoisingSchedule.noise_like`), so equal seeds give equal samples.

Seeding (`seeding`, distill.json's `seeding`): SD1.5, SDXL and PixArt pass the call's `generator` to
`scheduler.step`; SD3, Flux, Wan and DiT do not, and their step re-noises from torch's global generator, so a
`torch.Generator()` of the call's own fixes only the initial noise of a k >= 2 student (no stock scheduler changes
that). The exported call of such a student passes `generator=torch.manual_seed(0)`, which seeds the global generator
and returns it: the initial noise and every re-noising are then one seeded stream, the one the student's own rollout
draws after `torch.manual_seed(0)`.

Each pipeline's call is reproduced argument for argument where its defaults differ from its `encode_prompt`'s (Wan
encodes 512 tokens in the call, 226 by default; PixArt cleans captions in the call: the families' `encode`), and
where a pipeline cannot sample the student at the trained size it is refused when the config is loaded (DiTPipeline
samples only at its transformer's `sample_size`).

Guidance is off in the exported call (`guidance_scale` at the pipeline's "no CFG" value; Flux dev: its embedded
guidance); the model card states it. docs/families.md lists the families, their targets and their exact calls.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.base.batch import Condition
from distill.base.errors import ExportRefused
from distill.families import family_for, supported_networks
from distill.parametrization import flow_shift_mu

#: LCMScheduler's timestep_scaling that switches its consistency boundary condition off (see the module doc).
NO_BOUNDARY_SCALING = 1e10


def absent_as_none(folder: Path) -> dict[str, None]:
    """Optional components the folder was saved without (model_index.json entry [null, null], e.g. SD3 without
    T5): from_pretrained needs them passed as None."""
    index = read_json(folder / "model_index.json")
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}


def read_json(path: Path) -> dict:
    """A config file as a dict, {} where the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class Target:
    """One stock pipeline for one network class: the sampler set-up every target shares. A family subclasses it
    where its pipeline differs (how it encodes prompts, conditions it adds, arguments of its call)."""

    network: str  # diffusers model class
    pipeline: str  # diffusers pipeline class
    subfolder: str  # "unet" or "transformer"
    kind: str  # "vp" or "flow"
    packed: bool = False  # the pipeline's latents are 2x2 latent patches as tokens (Flux)
    video: bool = False  # (C, F, H, W) latents (Wan)
    class_conditional: bool = False  # "prompts" are class indices (DiT)
    passes_generator: bool = False  # the pipeline hands its call's `generator` to `scheduler.step` (the re-noising)
    guidance_off: float = 1.0  # the call's guidance_scale that turns classifier-free guidance off
    size_multiple: int = 1  # the pipeline's own rule on height and width (WanPipeline: a multiple of 16)

    # -- latents ---------------------------------------------------------------------------------------------
    def vae_factors(self, folder: Path) -> tuple[int, int]:
        """(spatial, temporal) downsampling of the pipeline's VAE, as an image pipeline computes them: from the
        number of its blocks, no temporal downsampling."""
        vae = read_json(folder / "vae" / "config.json")
        return 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1), 1

    def latent_shape(self, folder: Path, network_config: dict, resolution: int, num_frames: int = 1) -> tuple[int, ...]:
        """The latents the pipeline samples at `resolution` (and `num_frames`); ExportRefused, naming the data key,
        where the pipeline would sample another size than the one trained."""
        spatial, temporal = self.vae_factors(folder)
        multiple = math.lcm(spatial * self.patch(network_config), self.size_multiple)
        if resolution % multiple:
            own = f", and of {self.size_multiple}" if self.size_multiple > 1 else ""
            raise ExportRefused(f"data.resolution: {self.pipeline} needs a multiple of {multiple} (VAE factor "
                                f"{spatial} times the patch size {self.patch(network_config)}{own}), got {resolution}")
        side = resolution // spatial
        channels = network_config.get("in_channels", 4) // (4 if self.packed else 1)
        if not self.video:
            if num_frames != 1:
                raise ExportRefused(f"data.num_frames: {self.pipeline} makes images; num_frames must be 1, got "
                                    f"{num_frames}")
            return (channels, side, side)
        if (num_frames - 1) % temporal:
            raise ExportRefused(f"data.num_frames: {self.pipeline} needs {temporal}k + 1 frames (temporal VAE factor "
                                f"{temporal}; it would round {num_frames} to "
                                f"{(num_frames // temporal) * temporal + 1}), got {num_frames}")
        return (channels, (num_frames - 1) // temporal + 1, side, side)

    def image_seq_len(self, folder: Path, network_config: dict, resolution: int) -> int:
        """The token count the pipeline feeds `calculate_shift` for the dynamic shift mu."""
        spatial, _ = self.vae_factors(folder)
        return (resolution // spatial // self.patch(network_config)) ** 2

    def patch(self, network_config: dict) -> int:
        """Latent pixels per token side (packed latents: the 2x2 packing)."""
        if self.packed:
            return 2
        p = network_config.get("patch_size") or 1
        return int(p[-1] if isinstance(p, (list, tuple)) else p)

    # -- the sampler -----------------------------------------------------------------------------------------
    def scheduler(self, teacher_scheduler_config: dict, num_steps: int):
        """The exported scheduler, from the teacher's scheduler config."""
        from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

        config = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
        if self.kind == "vp":
            keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "prediction_type", "rescale_betas_zero_snr")
            return LCMScheduler(**{k: config[k] for k in keep if k in config}, original_inference_steps=num_steps,
                                timestep_scaling=NO_BOUNDARY_SCALING, clip_sample=False, set_alpha_to_one=True,
                                steps_offset=1)
        return FlowMatchEulerDiscreteScheduler(**self.flow_config(config, num_steps), stochastic_sampling=True)

    def ode_scheduler(self, teacher_scheduler_config: dict, num_steps: int):
        """A flow family's deterministic Euler ODE sampler at the teacher's shift, on the k-step times of
        :meth:`scheduler` (the export of a reflowed flow): `FlowMatchEulerDiscreteScheduler` without stochastic
        sampling, x_next = x + (s_next - s) v, the last step to s = 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.kind != "flow":
            raise ExportRefused(f"{self.pipeline} has no flow-matching ODE scheduler (a VP family)")
        return FlowMatchEulerDiscreteScheduler(**self.flow_config(teacher_scheduler_config, num_steps))

    def flow_config(self, teacher_scheduler_config: dict, num_steps: int) -> dict:
        """The exported flow scheduler's arguments: the teacher's shift, and for a static shift with k >= 2 the
        last step at shift(1/k) (the module doc), to which set_timesteps stretches its sigmas."""
        config = flow_euler_config(teacher_scheduler_config)
        if not config.get("use_dynamic_shifting") and num_steps >= 2:
            shift = float(config.get("shift", 1.0))
            config["shift_terminal"] = shift / num_steps / (1 + (shift - 1) / num_steps)
        return config

    def set_timesteps(self, scheduler, num_steps: int, image_seq_len: int) -> None:
        """Exactly the pipeline's own `set_timesteps` call."""
        if self.kind == "vp":
            scheduler.set_timesteps(num_steps)
        else:
            scheduler.set_timesteps(num_steps, mu=pipeline_mu(scheduler.config, image_seq_len))

    def times(self, scheduler, num_steps: int) -> Tensor:
        if self.kind == "vp":
            return scheduler.timesteps[:num_steps].to(torch.int64)
        return scheduler.sigmas[:num_steps].to(torch.float32)

    # -- the exported call -----------------------------------------------------------------------------------
    def embedded_guidance(self, network_config: dict) -> float | None:
        """The guidance a guidance-distilled network embeds (it is called with it in training and in the exported
        call), None for a network without a guidance input."""
        return None

    def guidance_scale(self, network_config: dict) -> float:
        """The pipeline's `guidance_scale` in the exported call: classifier-free guidance off, or the embedded
        guidance of a guidance-distilled network."""
        embedded = self.embedded_guidance(network_config)
        return self.guidance_off if embedded is None else embedded

    @property
    def output(self) -> str:
        """The attribute of the pipeline's output that holds the samples."""
        return "frames" if self.video else "images"

    def seeding(self, num_steps: int, stochastic: bool = True) -> dict[str, Any]:
        """How the exported call of a `num_steps` student is seeded (:func:`seeding`); `stochastic`: the scheduler
        re-noises between steps (False for the ODE scheduler of a reflowed flow)."""
        return seeding(self.pipeline, self.passes_generator, stochastic and num_steps >= 2)

    def call(self, num_steps: int, resolution: int, guidance: float, num_frames: int = 1,
             global_seed: bool = False) -> str:
        """The exported pipeline's exact call (the model card's); `global_seed`: seeded with
        `generator=torch.manual_seed(0)` (a `seeding` that is not generator-alone)."""
        seed = f", generator={GLOBAL_SEED.format(seed=0)}" if global_seed else ""
        return f"pipe({self.call_arguments(num_steps, resolution, guidance, num_frames)}{seed})"

    def call_arguments(self, num_steps: int, resolution: int, guidance: float, num_frames: int) -> str:
        """The arguments of :meth:`call` but its generator, for one prompt at the trained size."""
        return (f'"a photo of a cat", num_inference_steps={num_steps}, guidance_scale={guidance}, '
                f"height={resolution}, width={resolution}")

    # -- prompts -------------------------------------------------------------------------------------------------
    def load_text_pipeline(self, folder: Path):
        """The teacher's pipeline without its network (text encoders, tokenizers, VAE)."""
        return self.diffusers_pipeline().from_pretrained(folder, **absent_as_none(folder), **{self.subfolder: None},
                                                     torch_dtype=torch.float32)

    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        """Prompt embeddings as the pipeline's call computes them (CFG off), in the network's condition keys; each
        family's target says how its pipeline encodes."""
        raise ExportRefused(f"no prompt encoder for {self.pipeline}")

    def check_prompts(self, prompts: list[str], network_config: dict) -> None:
        """Refuse `data.prompts` lines the teacher cannot be conditioned on (class indices it does not have);
        text prompts are all fine."""

    def micro_conditions(self, network_config: dict, resolution: int, n: int) -> Condition:
        """Conditions the pipeline adds beside the prompt, for `n` samples at `resolution` (none here)."""
        return {}

    def absent_components(self, folder: Path) -> list[str]:
        """Components the pipeline requires that `folder` was saved without (SD3 without T5: `text_encoder_3`,
        `tokenizer_3`): its `from_pretrained` call passes them as None (`text_encoder_3=None, ...`)."""
        optional = getattr(self.diffusers_pipeline(), "_optional_components", None) or []
        return [k for k in absent_as_none(folder) if k not in optional]

    # -- writing -------------------------------------------------------------------------------------------------
    def diffusers_pipeline(self) -> type:
        """The diffusers class of :attr:`pipeline`."""
        import diffusers

        return getattr(diffusers, self.pipeline)

    def write(self, model, teacher_folder: Path, tmp: Path, num_steps: int, teacher_scheduler_config: dict,
              scheduler=None) -> None:
        """Save the teacher's pipeline with the student's network and the target's scheduler (or `scheduler`)
        into `tmp`."""
        scheduler = scheduler or self.scheduler(teacher_scheduler_config, num_steps)
        pipe = self.diffusers_pipeline().from_pretrained(teacher_folder, **absent_as_none(teacher_folder),
                                                     **{self.subfolder: model, "scheduler": scheduler},
                                                     torch_dtype=torch.float32)
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Pipeline arguments that are not components and that the pipeline does not save itself (DiTPipeline's
        # id2label, the class names behind `pipe.get_label_ids`) are carried over from the teacher's index.
        teacher_index, index = read_json(teacher_folder / "model_index.json"), read_json(tmp / "model_index.json")
        kept = {k: v for k, v in teacher_index.items()
                if not k.startswith("_") and not isinstance(v, list) and k not in index}
        if kept:
            (tmp / "model_index.json").write_text(json.dumps({**index, **kept}, indent=2, sort_keys=True) + "\n")


def flow_euler_config(teacher_scheduler_config: dict) -> dict:
    """The FlowMatchEulerDiscreteScheduler arguments of a flow teacher's scheduler config (its shift, static or
    dynamic); Wan's UniPC flow scheduler gives its static flow_shift."""
    config = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    if config.get("use_flow_sigmas"):
        config = {"shift": config.get("flow_shift", 1.0), "num_train_timesteps": config.get("num_train_timesteps", 1000)}
    keep = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
            "base_image_seq_len", "max_image_seq_len", "time_shift_type")
    return {k: config[k] for k in keep if k in config}


def pipeline_mu(scheduler_config, image_seq_len: int) -> float | None:
    """The `mu` a flow pipeline passes to `set_timesteps`: its `calculate_shift` of the token count for a
    dynamic-shift scheduler, None for a static shift."""
    c = scheduler_config
    if not c.get("use_dynamic_shifting"):
        return None
    return flow_shift_mu(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))


#: `generator=` of a call whose scheduler re-noises from torch's global generator: `torch.manual_seed` seeds it (on
#: every device) and returns it, so the pipeline's initial noise and the scheduler's re-noising share one stream.
GLOBAL_SEED = "torch.manual_seed({seed})"
#: `generator=` of a call whose random draws all come from the call's generator.
OWN_GENERATOR = "torch.Generator().manual_seed({seed})"


def seeding(pipeline: str, passes_generator: bool, renoises: bool) -> dict[str, Any]:
    """distill.json's `seeding` of an export: whether `generator=torch.Generator().manual_seed(seed)` alone fixes
    the sample (`generator_alone`), the `generator=` argument that does (`call`) and why. `renoises`: a step adds
    fresh noise to the sample (k >= 2 stochastic steps; a single step's re-noising is skipped or scaled by the
    final sigma 0, and an ODE sampler draws nothing after the initial noise)."""
    if not renoises:
        return {"generator_alone": True, "call": f"generator={OWN_GENERATOR.format(seed='seed')}",
                "why": "the initial noise, drawn from the call's generator, is the only random input that reaches the "
                       "sample (no step adds fresh noise)"}
    if passes_generator:
        return {"generator_alone": True, "call": f"generator={OWN_GENERATOR.format(seed='seed')}",
                "why": f"{pipeline} passes its generator to scheduler.step, so the initial noise and every "
                       "re-noising are drawn from it"}
    return {"generator_alone": False, "call": f"generator={GLOBAL_SEED.format(seed='seed')}",
            "why": f"{pipeline} does not pass its generator to scheduler.step, whose re-noising draws from torch's "
                   "global generator; torch.manual_seed(seed) seeds that generator and returns it, so the initial "
                   "noise and every re-noising come from one seeded stream (a torch.Generator() of the call's own "
                   "fixes the initial noise only)"}


#: hub checkpoints saved before diffusers split `Transformer2DModel` (DiT-XL-2, PixArt-alpha) name it in their
#: config; diffusers loads it as the class of its `norm_type` (the same rule as its own remapping on load).
LEGACY_TRANSFORMER = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}


def network_class(network_config: dict) -> str | None:
    """The diffusers class a network config loads as."""
    name = network_config.get("_class_name")
    if name == "Transformer2DModel":
        return LEGACY_TRANSFORMER.get(network_config.get("norm_type"), name)
    return name


def is_flow_scheduler(scheduler_config: dict) -> bool:
    """A flow-matching scheduler config (FlowMatch*, or UniPC with flow sigmas as Wan's)."""
    return scheduler_config.get("_class_name", "").startswith("FlowMatch") or bool(scheduler_config.get("use_flow_sigmas"))


def consistency_sampled(scheduler_config: dict, prediction: str | None) -> bool:
    """A pixel teacher whose student leaves as `ConsistencyModelPipeline` (distill.export.pipeline): an EDM / CM
    network under CMStochasticIterativeScheduler."""
    return (scheduler_config.get("_class_name") == "CMStochasticIterativeScheduler"
            and prediction in (None, "edm", "cm"))


def target_for(network_config: dict, scheduler_config: dict, prediction: str | None = None,
               pipeline: str | None = None) -> Target | None:
    """The latent-family target of a teacher (from its configs and its folder's pipeline class `pipeline`, the
    `_class_name` of its model_index.json), as its family picks it; None for a pixel family's consistency-model
    student (its target is in distill.export.pipeline); or ExportRefused with the reason."""
    name = network_class(network_config)
    if name not in supported_networks():
        raise ExportRefused(f"no export target for a {name!r} teacher; supported networks: {supported_networks()}")
    target = family_for(name).export_target(network_config, scheduler_config, prediction, pipeline)
    if target is None:
        return None
    if (target.kind == "flow") != is_flow_scheduler(scheduler_config):
        raise ExportRefused(f"a {name} teacher with a {scheduler_config.get('_class_name', '')} scheduler: "
                            f"{target.pipeline} is exported with a "
                            f"{'flow-matching' if target.kind == 'flow' else 'VP (beta schedule)'} scheduler, and "
                            "the student must train with the sampler it is exported with")
    if target.kind == "vp" and prediction in ("flow", "trigflow", "edm", "cm"):
        raise ExportRefused(f"teacher.prediction {prediction!r} does not fit {target.pipeline}'s LCMScheduler "
                            "(epsilon, v or x0 predictions)")
    return target


def pipeline_class(folder: Path) -> str | None:
    """The pipeline class a diffusers folder was saved as (its model_index.json), None without one."""
    return read_json(folder / "model_index.json").get("_class_name")


def teacher_target(folder: Path, prediction: str | None = None) -> tuple[Target | None, dict, dict]:
    """(target, network config, scheduler config) of a teacher folder."""
    sub = next(s for s in ("unet", "transformer") if (folder / s / "config.json").is_file())
    net, sched = read_json(folder / sub / "config.json"), read_json(folder / "scheduler" / "scheduler_config.json")
    return target_for(net, sched, prediction, pipeline_class(folder)), net, sched


def dynamic_mu(folder: Path, network_config: dict, scheduler_config: dict, resolution: int | None) -> float:
    """mu of a dynamic-shift flow teacher at `resolution` (what its pipeline passes to set_timesteps)."""
    target = target_for(network_config, scheduler_config)
    if resolution is None:
        raise ValueError(f"{scheduler_config.get('_class_name')} with use_dynamic_shifting=True: the shift depends on "
                         "the resolution; load the teacher with data.resolution")
    return pipeline_mu(scheduler_config, target.image_seq_len(folder, network_config, resolution))
