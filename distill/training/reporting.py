"""What a run reports while it trains: a progress bar, scalars in tensorboard (accelerate's trackers), a log line
per logged step when the bar is off, and sample grids of the student."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.config import Config, to_dict
from distill.training.recipe import Recipe

logger = logging.getLogger("distill")


class Progress:
    """The progress bar and the logged scalars of one `Trainer.train` call, from step `step` on."""

    def __init__(self, accelerator, cfg: Config, step: int):
        from tqdm.auto import tqdm

        self.accelerator, self.cfg = accelerator, cfg
        accelerator.init_trackers("distill", config=flat_scalars(to_dict(cfg)))
        self.bar = tqdm(total=cfg.run.max_steps, initial=step, desc=f"{cfg.recipe_name}", dynamic_ncols=True,
                        disable=not (accelerator.is_main_process and cfg.trainer.progress_bar))
        self.start = time.time()

    def update(self, step: int, logs: dict[str, float], lr: float) -> None:
        """After the iteration that reached `step`: every `trainer.log_every` steps and at the last one, log its
        scalars and the generator's learning rate `lr`."""
        cfg = self.cfg
        self.bar.update(1)
        if step % cfg.trainer.log_every != 0 and step != cfg.run.max_steps:
            return
        logs["lr/generator"] = lr
        self.accelerator.log(logs, step=step)
        losses = {k: v for k, v in logs.items() if k.endswith("loss")}
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in losses.items()})
        if not cfg.trainer.progress_bar and self.accelerator.is_main_process:
            logger.info("step %d/%d  %s  (%.1fs)", step, cfg.run.max_steps,
                        "  ".join(f"{k}={v:.4g}" for k, v in sorted(losses.items())), time.time() - self.start)

    def close(self, step: int, nonfinite_skipped: int) -> None:
        self.bar.close()
        logger.info("trained %d steps in %.1fs (%d non-finite updates skipped)", step, time.time() - self.start,
                    nonfinite_skipped)


def flat_scalars(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": scalar} (what tensorboard's hparams take; others as strings)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flat_scalars(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = d if isinstance(d, (int, float, str, bool)) else str(d)
    return out


@torch.no_grad()
def write_sample_grid(recipe: Recipe, generator: nn.Module, dataset, path: Path, seed: int, device: torch.device,
                      n: int = 64) -> Path:
    """`n` samples of `generator` (the EMA student) from fixed noise and the dataset's grid conditions, as one
    image: the same noise at every step, so grids of one run show how the student changes."""
    from distill.base.imaging import save_grid

    g = torch.Generator().manual_seed(seed + 12345)
    cond = dataset.grid_condition(n)
    noise = torch.randn((n, *dataset.image_shape), generator=g)
    images = recipe.generate(generator, {k: v.to(device) for k, v in cond.items()}, noise.to(device))
    return save_grid(images.float().cpu(), path, nrow=int(math.sqrt(n)))
