"""One denoiser interface for teacher, student and fake score over diffusers models.

A :class:`Denoiser` owns a diffusers network, the adapter of its family (how to call it), its noise process
(how native time maps to alpha, sigma and the network's inputs) and its native prediction kind. It hands back
whichever prediction a recipe asks for: ``"x0"``, ``"epsilon"``, ``"v"``, ``"flow"``, ``"trigflow"``, ...

Classifier-free guidance convention (stated once, used everywhere): ``pred = uncond + w (cond - uncond)``;
w = 1 is the plain conditional model. (Codebases that write ``cond + w' (cond - uncond)`` use w' = w - 1.)
Guidance combines native raw outputs, which equals combining x0 estimates because every conversion is affine
in the raw output at fixed x_t.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from distill.base.batch import Condition, concat_conditions
from distill.base.errors import ConfigError
from distill.families import Family, family_for, model_class
from distill.parametrization import (
    DIFFUSERS_PREDICTION_TYPES,
    EDMProcess,
    FlowProcess,
    Process,
    TrigFlowProcess,
    VPProcess,
    _bcast,
    convert,
)


class Denoiser(nn.Module):
    """A diffusers network behind the common prediction interface.

    Args:
        model: the diffusers network (UNet2DModel, ...).
        process: its noise process; `t` arguments are in this process's native time.
        prediction: the network's native output kind (see :mod:`distill.parametrization`).
        family: the model-family adapter; looked up from the model's class when omitted.
    """

    def __init__(self, model: nn.Module, process: Process, prediction: str, family: Family | None = None):
        super().__init__()
        self.model = model
        self.process = process
        self.prediction = prediction
        self.family = family or family_for(model)
        #: where a loaded teacher came from ({"folder", "network_config", "scheduler_config", "resolution"}): the
        #: export writes the student into that pipeline (distill.families.target)
        self.source: dict | None = None

    # -- conversions ----------------------------------------------------------------------------------------
    def _consts(self) -> dict[str, float]:
        p = self.process
        return {"sigma_data": getattr(p, "sigma_data", 1.0), "sigma_min": getattr(p, "sigma_min", 0.0)}

    def convert(self, raw: Tensor, x_t: Tensor, t: Tensor, want: str) -> Tensor:
        """Convert this network's native output at (x_t, t) into prediction kind `want`."""
        alpha, sigma = self.process.alpha_sigma(t)
        alpha, sigma = _bcast(alpha, x_t).to(x_t.dtype), _bcast(sigma, x_t).to(x_t.dtype)
        return convert(raw, self.prediction, want, x_t, alpha, sigma, **self._consts())

    def to_native(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The native output that corresponds to the x0 estimate `x0` at (x_t, t) (inverse of `convert(.., "x0")`)."""
        alpha, sigma = self.process.alpha_sigma(t)
        alpha, sigma = _bcast(alpha, x_t).to(x_t.dtype), _bcast(sigma, x_t).to(x_t.dtype)
        return convert(x0, "x0", self.prediction, x_t, alpha, sigma, **self._consts())

    # -- calls ----------------------------------------------------------------------------------------------
    def _inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape ({x_t.shape[0]},) to match x_t {tuple(x_t.shape)}, got {tuple(t.shape)}")
        scale = _bcast(self.process.input_scale(t), x_t).to(x_t.dtype)
        return x_t * scale, self.process.model_time(t)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the network computes in: FSDP2's mixed-precision dtype where one is set
        (distill.training.parallel), else its weights' (a bfloat16 teacher: `teacher.dtype`)."""
        dtype = self.model.__dict__.get("distill_compute_dtype")
        if dtype is None:
            p = next(self.model.parameters(), None)
            dtype = torch.float32 if p is None else p.dtype
        return dtype

    def _cast(self, x_in: Tensor, cond: Condition) -> tuple[Tensor, Condition]:
        """The image input and the floating conditions in the compute dtype (the timesteps are left alone: 999 is
        1000 in bfloat16)."""
        dtype = self.compute_dtype()
        if x_in.dtype == dtype:
            return x_in, cond
        return x_in.to(dtype), {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}

    def raw(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """The network's native output at (x_t, t), in x_t's dtype."""
        x_in, time = self._inputs(x_t, t)
        x_in, cond = self._cast(x_in, cond)
        return self.family.call(self.model, x_in, time, cond).to(x_t.dtype)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Condition, want: str = "x0", guidance_scale: float = 1.0
    ) -> Tensor:
        """Prediction `want` at (x_t, t), with classifier-free guidance `guidance_scale` (1 = none)."""
        if guidance_scale == 1.0:
            raw = self.raw(x_t, t, cond)
        else:
            null = self.family.null_condition(self.model, cond)
            both = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_conditions(cond, null))
            c, u = both.chunk(2)
            raw = u + guidance_scale * (c - u)
        return self.convert(raw, x_t, t, want)

    def with_features(self, x_t: Tensor, t: Tensor, cond: Condition, want: str = "x0") -> tuple[Tensor, Tensor]:
        """Prediction `want` and the network's bottleneck features, from one forward pass."""
        x_in, time = self._inputs(x_t, t)
        x_in, cond = self._cast(x_in, cond)
        raw, feats = self.family.call_with_features(self.model, x_in, time, cond)
        return self.convert(raw.to(x_t.dtype), x_t, t, want), feats.to(x_t.dtype)

    def copy(self, trainable: bool = True) -> "Denoiser":
        """A deep copy (student or fake score initialised from a teacher); a trainable copy is float32 whatever
        the teacher's dtype (`teacher.dtype`): its optimizer steps float32 weights."""
        twin = Denoiser(copy.deepcopy(self.model), self.process, self.prediction, self.family)
        if trainable:
            twin.model.float()
        twin.model.requires_grad_(trainable)
        twin.model.train(trainable)
        twin.source = self.source
        return twin


def smaller_network(teacher: Denoiser, block_out_channels: tuple[int, ...], layers_per_block: int | None) -> Denoiser:
    """A freshly initialised network of the teacher's class and design with other widths (same process and
    prediction kind, same class embeddings count): SlimFlow's and MSD's smaller students. Errors name the
    `recipe.block_out_channels` key, the one both recipes read it from."""
    model = teacher.model
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    if len(block_out_channels) != len(config.get("block_out_channels", ())):
        raise ConfigError(f"recipe.block_out_channels: the teacher has {len(config['block_out_channels'])} blocks "
                          f"({list(config['block_out_channels'])}), got {list(block_out_channels)}")
    groups = config.get("norm_num_groups") or 1
    if any(c % groups for c in block_out_channels):
        raise ConfigError(f"recipe.block_out_channels: every width must be a multiple of the network's "
                          f"norm_num_groups ({groups}), got {list(block_out_channels)}")
    config["block_out_channels"] = list(block_out_channels)
    if layers_per_block is not None:
        config["layers_per_block"] = layers_per_block
    net = type(model).from_config(config)
    net.to(next(model.parameters()).device).train()
    return Denoiser(net, teacher.process, teacher.prediction, teacher.family)


# ---------------------------------------------------------------------------------------------------------------
# Loading a teacher from a diffusers folder
# ---------------------------------------------------------------------------------------------------------------


def process_from_scheduler_config(config: dict, mu: float | None = None) -> tuple[Process, str]:
    """(process, default prediction kind) described by a diffusers scheduler config; `mu` is the dynamic shift of a
    `use_dynamic_shifting` flow scheduler at the run's resolution (distill.families.target.dynamic_mu)."""
    name = config.get("_class_name", "")
    if config.get("use_flow_sigmas"):  # Wan's UniPCMultistepScheduler: rectified flow with a static flow_shift
        return FlowProcess(shift=float(config.get("flow_shift", 1.0))), "flow"
    if name == "CMStochasticIterativeScheduler":
        proc = EDMProcess(
            sigma_min=float(config.get("sigma_min", 0.002)),
            sigma_max=float(config.get("sigma_max", 80.0)),
            sigma_data=float(config.get("sigma_data", 0.5)),
            rho=float(config.get("rho", 7.0)),
        )
        return proc, "cm"
    if name.startswith("FlowMatch"):
        if config.get("use_dynamic_shifting"):
            # The shift depends on the image size (mu from the token count, parametrization.flow_shift_mu).
            if mu is None:
                raise ValueError(f"{name} with use_dynamic_shifting=True: the shift depends on the resolution; "
                                 "load the teacher with its resolution (data.resolution)")
            return FlowProcess(mu=float(mu)), "flow"
        return FlowProcess(shift=float(config.get("shift", 1.0))), "flow"
    if name == "SCMScheduler":
        return TrigFlowProcess(sigma_data=float(config.get("sigma_data", 0.5))), "trigflow"
    if "beta_schedule" in config or name in {"DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"}:
        ptype = config.get("prediction_type", "epsilon")
        if ptype not in DIFFUSERS_PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {ptype!r} is not supported")
        return VPProcess.from_scheduler_config(config), DIFFUSERS_PREDICTION_TYPES[ptype]
    raise ValueError(f"cannot infer a noise process from scheduler class {name!r}")


def load_denoiser(
    path: str | Path,
    prediction: str | None = None,
    subfolder: str | None = None,
    dtype: torch.dtype = torch.float32,
    trainable: bool = False,
    resolution: int | None = None,
    meta: bool = False,
) -> Denoiser:
    """Load a denoiser from a diffusers pipeline-style folder (`<subfolder>/` network + `scheduler/` config).

    `prediction` overrides the kind inferred from the scheduler (e.g. "edm" for an EDM-preconditioned teacher
    stored with a CMStochasticIterativeScheduler config, which carries the same c_in and c_noise). `resolution`
    (pixels) sets the shift of a dynamic-shift flow teacher (Flux), as its pipeline does at that size. `meta`: the
    network built from its config alone on the meta device (no weights read, no memory), in `dtype` but for the
    modules diffusers keeps in float32 (`_keep_in_fp32_modules`), as `from_pretrained(torch_dtype=)` loads it: what
    `distill plan` traces, and what the processes other than the main build under FSDP2 before they receive the
    main's weights (distill.training.parallel.MainWeights).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"teacher folder {str(root)!r} does not exist")
    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise FileNotFoundError(f"{str(sched_file)!r} is missing: a teacher folder needs a scheduler config")
    sched_config = json.loads(sched_file.read_text())
    if subfolder is None:
        subfolder = next((s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), None)
        if subfolder is None:
            raise FileNotFoundError(f"no 'unet/config.json' or 'transformer/config.json' under {str(root)!r}")
    model_config = json.loads((root / subfolder / "config.json").read_text())
    mu = None
    if sched_config.get("use_dynamic_shifting"):
        from distill.families.target import dynamic_mu

        mu = dynamic_mu(root, model_config, sched_config, resolution)
    process, default_kind = process_from_scheduler_config(sched_config, mu)

    class_name = model_config.get("_class_name")
    model_cls = model_class(class_name) if isinstance(class_name, str) else None
    if model_cls is None:  # a ConfigError (a ValueError): the CLI reports it without a traceback
        raise ConfigError(f"{str(root / subfolder / 'config.json')!r}: unknown diffusers class {class_name!r}")
    if meta:
        with torch.device("meta"):
            model = model_cls.from_config(model_config)
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.is_floating_point() and not any(k in name.split(".") for k in keep):
                    p.data = p.data.to(dtype)
    else:
        model = model_cls.from_pretrained(root / subfolder, torch_dtype=dtype, use_safetensors=True)
    model.requires_grad_(trainable)
    model.train(trainable)
    denoiser = Denoiser(model, process, prediction or default_kind, family_for(model))
    denoiser.source = {"folder": str(root), "network_config": model_config, "scheduler_config": sched_config,
                       "resolution": resolution}
    return denoiser
