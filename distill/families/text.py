"""What text-conditioned families share: the null condition for classifier-free guidance, and bottleneck features
taken from the middle of a transformer's token stream.

The null condition is the pipeline's own empty-prompt encoding (what its `negative_prompt=""` would give), set once
from the cached prompt embeddings (`distill.data.prompts.PromptDataset`); before that is set, the text keys are zeroed
(the convention of SD3 and Flux for dropped captions). Keys that are not text (SDXL's `time_ids`, Flux's
`guidance`) are kept as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.base.batch import Condition


class TextConditioned:
    """Mixin for adapters whose condition holds prompt embeddings under `text_keys`."""

    subfolder = "transformer"
    latent = True
    text_keys: tuple[str, ...] = ("encoder_hidden_states",)

    def __init__(self) -> None:
        self.null_embeddings: Condition | None = None  # each (1, ...): the empty prompt, set by the data

    def set_null_embeddings(self, null: Condition) -> None:
        """The empty prompt's embeddings (each (1, ...)); the text keys it holds are the ones guidance nulls."""
        if not any(k in null for k in self.text_keys):
            raise ValueError(f"the empty-prompt condition holds none of {list(self.text_keys)} (has {sorted(null)})")
        self.null_embeddings = {k: null[k] for k in self.text_keys if k in null}

    def null_condition(self, model: nn.Module, cond: Condition) -> Condition:
        keys = [k for k in self.text_keys if k in cond]
        if not keys:
            raise ValueError(f"classifier-free guidance needs one of the condition keys {list(self.text_keys)}; "
                             f"got {sorted(cond)}")
        out = dict(cond)
        for k in keys:
            v = cond[k]
            if self.null_embeddings is None:
                out[k] = torch.zeros_like(v)
                continue
            null = self.null_embeddings[k].to(device=v.device, dtype=v.dtype)
            if null.shape[1:] != v.shape[1:]:
                raise ValueError(f"the empty-prompt {k!r} of shape {tuple(null.shape)} does not fit the condition's "
                                 f"{tuple(v.shape)} (another text encoder or sequence length)")
            out[k] = null.expand(v.shape[0], *null.shape[1:])
        return out


def token_features(model: nn.Module, blocks: nn.ModuleList, run, grid: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Run `run()` and return (its output, the image tokens after the middle block of `blocks` as (N, D, *grid)).

    Blocks return the image tokens alone or in a tuple with the text tokens; the image tokens are the tensor whose
    sequence length is the product of `grid`."""
    captured: list[Tensor] = []
    tokens = 1
    for g in grid:
        tokens *= g

    def hook(_m, _i, out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        captured.append(next(o for o in outs if isinstance(o, Tensor) and o.ndim == 3 and o.shape[1] == tokens))

    handle = blocks[len(blocks) // 2].register_forward_hook(hook)
    try:
        out = run()
    finally:
        handle.remove()
    feats = captured[0]
    n, _, d = feats.shape
    return out, feats.transpose(1, 2).reshape(n, d, *grid)


def patch_token_features(family, model: nn.Module, x: Tensor, timestep: Tensor, cond) -> tuple[Tensor, Tensor]:
    """`call_with_features` of a 2-D patch transformer (DiT, PixArt, SD3): the raw output and the image tokens
    after the middle block, on the (H / patch, W / patch) grid."""
    p = model.config.patch_size
    return token_features(model, model.transformer_blocks, lambda: family.call(model, x, timestep, cond),
                          (x.shape[-2] // p, x.shape[-1] // p))
