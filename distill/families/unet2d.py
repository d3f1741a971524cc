"""diffusers `UNet2DModel`, optionally class-conditional through `num_class_embeds`.

Convention for classifier-free guidance: a class-conditional model carries one extra embedding row, the last
(index num_class_embeds - 1), as the null class; it is trained with label dropout to that row. The export drops it.

A pixel-space family: its student has no latent target. An EDM / consistency-model teacher's student leaves as
`ConsistencyModelPipeline` (written by distill.export.pipeline); any other teacher is refused, saying why.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.base.errors import ExportRefused
from distill.families.target import consistency_sampled, is_flow_scheduler

#: LoRA targets in a diffusers UNet (UNet2DModel, UNet2DConditionModel): the resnets' convolutions and time
#: projections, and attention.
UNET_LORA_TARGETS = ("conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0")


class UNet2DFamily:
    subfolder = "unet"
    latent = False
    lora_targets = UNET_LORA_TARGETS
    #: FSDP2 sharding blocks (distill.training.parallel); UNet2DModel declares no `_no_split_modules`
    shard_blocks = ("ResnetBlock2D", "Attention")

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> None:
        if consistency_sampled(scheduler_config, prediction):
            return None
        sched = scheduler_config.get("_class_name", "")
        conditional = network_config.get("num_class_embeds") is not None
        process = "flow matching" if is_flow_scheduler(scheduler_config) else f"{sched} ({prediction or 'its'} prediction)"
        raise ExportRefused(
            f"a {'class-conditional ' if conditional else ''}UNet2DModel teacher with a {process} scheduler cannot be "
            "exported to a stock diffusers pipeline: "
            + ("the only stock pipeline that feeds class labels to a UNet2DModel is ConsistencyModelPipeline, which "
               "needs an EDM-preconditioned network under CMStochasticIterativeScheduler (time input 250 log sigma, "
               "input scaled by c_in); DiTPipeline takes a DiTTransformer2DModel. Distill an EDM teacher "
               "(teacher.prediction: edm with a CMStochasticIterativeScheduler config, like builtin:digits_teacher), "
               "or a DiT/PixArt/SD3/Flux teacher"
               if conditional else
               "no export target for unconditional UNet2DModel students is implemented yet"))

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        labels = cond.get("class_labels")
        return model(x, timestep, class_labels=labels, return_dict=False)[0]

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        handle = model.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.call(model, x, timestep, cond)
        finally:
            handle.remove()
        return out, captured[0]

    def null_condition(self, model: nn.Module, cond: Condition) -> Condition:
        n_embeds = model.config.num_class_embeds
        if n_embeds is None or "class_labels" not in cond:
            raise ValueError("classifier-free guidance needs a class-conditional UNet2DModel (num_class_embeds set)")
        labels = cond["class_labels"]
        return {**cond, "class_labels": torch.full_like(labels, n_embeds - 1)}

    def feature_channels(self, model: nn.Module) -> int:
        return model.config.block_out_channels[-1]
