"""The trainer: all plumbing, once. Recipes never touch devices, precision, checkpoints, logging or EMA.

A recipe (see :class:`Recipe`) owns a trainable `generator` (the student), optionally a trainable `critic` (fake
score, discriminator head, ...), and two losses. Per iteration the trainer runs `trainer.critic_steps` critic
updates and then one generator update, each with its own optimizer, learning rate, gradient accumulation,
clipping and non-finite guard; it keeps an EMA of the generator, writes sample grids, logs to tensorboard through
accelerate's trackers, and checkpoints through `accelerator.save_state` on every rank, atomically.

Determinism: every iteration reseeds torch from (seed, step, rank) and draws its data batch from a generator
seeded the same way, so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from distill.base.batch import Batch
from distill.base.errors import ConfigError, NonFiniteError
from distill.base.seeding import step_seed
from distill.config import Config, OptimizerConfig, config_to_yaml, to_dict
from distill.training.checkpoints import (
    CHECKPOINT_DIR,
    CHECKPOINT_PREFIX,
    STATE_FILE,
    TMP_PREFIX,
    latest_checkpoint,
    list_checkpoints,
)
from distill.training.files import check_checkpoint, check_run_dir, saved_config_changes
from distill.training.recipe import unwrap

logger = logging.getLogger("distill")


# ---------------------------------------------------------------------------------------------------------------
# Helpers recipes may use
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class Trainer:
    """Runs a recipe under accelerate. Build with a validated :class:`Config`; call :meth:`train`."""

    def __init__(self, cfg: Config, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        mp = cfg.trainer.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = accelerator or Accelerator(
            mixed_precision=mp,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        acc = self.accelerator
        torch.manual_seed(cfg.run.seed)  # model construction (heads) is identical on every rank

        from distill.training.registry import build_recipe

        self.recipe, self.dataset = build_recipe(cfg, acc.device)
        if cfg.trainer.sample_every and getattr(self.dataset, "latent", False):
            raise ConfigError("trainer.sample_every: sample grids are drawn for pixel-space teachers; this teacher "
                              f"samples VAE latents {tuple(self.dataset.image_shape)}. Set trainer.sample_every=0 "
                              "and sample the exported pipeline instead")
        self.generator_opt, self.generator_sched = self._optimizer(self.recipe.generator, cfg.trainer.generator)
        has_critic = self.recipe.critic is not None
        if has_critic:
            self.critic_opt, self.critic_sched = self._optimizer(self.recipe.critic, cfg.trainer.critic)
            self.recipe.generator, self.recipe.critic, self.generator_opt, self.critic_opt = acc.prepare(
                self.recipe.generator, self.recipe.critic, self.generator_opt, self.critic_opt)
        else:
            self.critic_opt = self.critic_sched = None
            self.recipe.generator, self.generator_opt = acc.prepare(self.recipe.generator, self.generator_opt)
        # Schedulers are not prepared (accelerate would step them once per process); they count updates and are
        # checkpointed as custom state.
        for sched in (self.generator_sched, self.critic_sched):
            if sched is not None:
                acc.register_for_checkpointing(sched)

        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(unwrap(self.recipe.generator).parameters(), decay=cfg.trainer.ema_decay)
        self.ema.to(acc.device)
        acc.register_for_checkpointing(self.ema)

        self.target_decay = getattr(self.recipe, "target_decay", None)
        self.target_network = None
        if self.target_decay is not None:
            if not 0.0 <= float(self.target_decay) < 1.0:
                raise ValueError(f"recipe target_decay must be in [0, 1), got {self.target_decay}")
            self.target_network = copy.deepcopy(unwrap(self.recipe.generator)).requires_grad_(False)
            acc.register_for_checkpointing(self.target_network)
            self.recipe.target_network = self.target_network

        self.step = 0
        self.nonfinite_skipped = 0
        self._consecutive_nonfinite: dict[str, int] = {}  # per network: a healthy critic must not hide a stuck generator

    # -- setup ------------------------------------------------------------------------------------------
    def _optimizer(self, module: nn.Module, oc: OptimizerConfig):
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
        warm = max(oc.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return opt, sched

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """accelerate's state (models as safetensors, optimizers, schedulers, RNG, EMA) plus the trainer's own,
        written into a hidden folder and renamed into place: a kill mid-save leaves the previous one intact."""
        acc = self.accelerator
        root = self.run_dir / CHECKPOINT_DIR
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = root / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{self.step:08d}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # every rank: RNG states are per rank
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "nonfinite_skipped": self.nonfinite_skipped,
                     "consecutive_nonfinite": dict(self._consecutive_nonfinite)}
            with open(tmp / STATE_FILE, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[: -max(self.cfg.trainer.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{str(state_file)!r} is missing: {str(path)!r} is not a complete checkpoint")
        check_checkpoint(path)  # truncated or corrupt files: a named error, before accelerate reads them
        try:
            self.accelerator.load_state(str(path))
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. weights of other shapes: another recipe or model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"checkpoint {str(path)!r} does not fit this run's networks: {first}") from e
        state = json.loads(state_file.read_text())
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        consecutive = state.get("consecutive_nonfinite")
        self._consecutive_nonfinite = dict(consecutive) if isinstance(consecutive, dict) else {}
        logger.info("resumed from %s at step %d", path, self.step)

    def maybe_resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume is None:
            return
        if resume == "latest":
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                logger.info("resume: latest -- no checkpoint in %s yet, starting fresh", self.run_dir)
                return
        else:
            ckpt = Path(resume)
            if not ckpt.is_dir():
                raise FileNotFoundError(f"trainer.resume: checkpoint folder {resume!r} does not exist")
        check_checkpoint(ckpt, "trainer.resume")
        self.load_checkpoint(ckpt)

    # -- EMA ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """The generator with EMA weights swapped in (restored afterwards)."""
        gen = unwrap(self.recipe.generator)
        self.ema.store(gen.parameters())
        self.ema.copy_to(gen.parameters())
        was_training = gen.training
        gen.eval()
        try:
            yield gen
        finally:
            self.ema.restore(gen.parameters())
            gen.train(was_training)

    # -- one update -----------------------------------------------------------------------------------------
    def _batches(self, step: int, stream: int) -> list[Batch]:
        acc = self.accelerator
        out = []
        for micro in range(self.cfg.trainer.gradient_accumulation_steps):
            g = torch.Generator().manual_seed(step_seed(self.cfg.run.seed, step, acc.process_index, 1000 + stream * 64 + micro))
            out.append(self.dataset.sample(self.cfg.data.batch_size, g).to(acc.device))
        return out

    def _update(self, name: str, module: nn.Module, opt, sched, loss_fn, batches: list[Batch]) -> dict[str, float]:
        acc = self.accelerator
        n = len(batches)
        logs: dict[str, float] = {}
        finite = True
        for i, batch in enumerate(batches):
            sync = i == n - 1
            ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(module)
            with ctx, acc.autocast():
                loss, parts = loss_fn(batch, self.step)
            ok = torch.isfinite(loss.detach()).float()
            finite = finite and bool(acc.reduce(ok, reduction="sum").item() == acc.num_processes)
            if not finite:
                logs.update({f"{name}/{k}": v for k, v in parts.items()})
                break
            with ctx:
                acc.backward(loss / n)
            for k, v in parts.items():
                logs[f"{name}/{k}"] = logs.get(f"{name}/{k}", 0.0) + v / n
        if finite:
            # Always measured (max_norm=inf does not clip): the norm is the guard against non-finite gradients.
            max_norm = self.cfg.trainer.max_grad_norm
            grad_norm = acc.clip_grad_norm_(module.parameters(), math.inf if max_norm is None else max_norm)
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)).item())
            logs[f"{name}/grad_norm"] = float(grad_norm)
        if not finite:
            opt.zero_grad(set_to_none=True)
            self._nonfinite(name, logs)
            return logs
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        self._consecutive_nonfinite[name] = 0
        return logs

    def _nonfinite(self, name: str, logs: dict[str, float]) -> None:
        self.nonfinite_skipped += 1
        self._consecutive_nonfinite[name] = self._consecutive_nonfinite.get(name, 0) + 1
        msg = f"non-finite {name} loss or gradient at step {self.step} (logs: {logs})"
        if self.cfg.trainer.on_nonfinite == "stop":
            raise NonFiniteError(msg + "; trainer.on_nonfinite=stop")
        if self._consecutive_nonfinite[name] > self.cfg.trainer.max_consecutive_nonfinite:
            raise NonFiniteError(
                msg + f"; more than trainer.max_consecutive_nonfinite={self.cfg.trainer.max_consecutive_nonfinite} "
                "updates in a row were skipped")
        logger.warning("%s; update skipped (%d skipped so far)", msg, self.nonfinite_skipped)

    def train_step(self) -> dict[str, float]:
        """One iteration: `critic_steps` critic updates, then one generator update, then EMA."""
        acc, r, tc = self.accelerator, self.recipe, self.cfg.trainer
        torch.manual_seed(step_seed(self.cfg.run.seed, self.step, acc.process_index))
        logs: dict[str, float] = {}
        if r.critic is not None:
            for k in range(tc.critic_steps):
                logs.update(self._update("critic", r.critic, self.critic_opt, self.critic_sched, r.critic_loss,
                                         self._batches(self.step, 1 + k)))
        logs.update(self._update("generator", r.generator, self.generator_opt, self.generator_sched, r.generator_loss,
                                 self._batches(self.step, 0)))
        self.ema.step(unwrap(r.generator).parameters())
        if self.target_network is not None:
            with torch.no_grad():
                for t, p in zip(self.target_network.parameters(), unwrap(r.generator).parameters()):
                    t.lerp_(p.detach(), 1.0 - float(self.target_decay))
        self.step += 1
        logs["nonfinite_skipped"] = float(self.nonfinite_skipped)
        return logs

    # -- samples --------------------------------------------------------------------------------------------
    def sample_grid(self, path: Path, n: int = 64) -> Path:
        from distill.base.imaging import save_grid

        g = torch.Generator().manual_seed(self.cfg.run.seed + 12345)
        cond = self.dataset.grid_condition(n)
        noise = torch.randn((n, *self.dataset.image_shape), generator=g)
        with torch.no_grad(), self.ema_weights() as gen:
            images = self.recipe.generate(gen, {k: v.to(self.accelerator.device) for k, v in cond.items()},
                                          noise.to(self.accelerator.device))
        return save_grid(images.float().cpu(), path, nrow=int(math.sqrt(n)))

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> Path:
        acc, cfg = self.accelerator, self.cfg
        check_run_dir(cfg)  # another run in run.output_dir: refused before anything is written there
        changed = saved_config_changes(cfg)
        if changed and acc.is_main_process:
            logger.info("trainer.resume=%s: %s held a config.yaml that differs in %s; replaced by this run's",
                        cfg.trainer.resume, self.run_dir, ", ".join(changed))
        acc.wait_for_everyone()  # every rank has read the folder before the main process writes to it
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        self.maybe_resume()
        acc.init_trackers("distill", config=_flat_scalars(to_dict(cfg)))
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.run.max_steps, initial=self.step, disable=not (acc.is_main_process and cfg.trainer.progress_bar),
                   desc=f"{cfg.recipe_name}", dynamic_ncols=True)
        start = time.time()
        while self.step < cfg.run.max_steps:
            logs = self.train_step()
            bar.update(1)
            if self.step % cfg.trainer.log_every == 0 or self.step == cfg.run.max_steps:
                logs["lr/generator"] = self.generator_sched.get_last_lr()[0]
                acc.log(logs, step=self.step)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.endswith("loss")})
                if not cfg.trainer.progress_bar and acc.is_main_process:
                    logger.info("step %d/%d  %s  (%.1fs)", self.step, cfg.run.max_steps,
                                "  ".join(f"{k}={v:.4g}" for k, v in sorted(logs.items()) if k.endswith("loss")),
                                time.time() - start)
            if cfg.trainer.sample_every and self.step % cfg.trainer.sample_every == 0 and acc.is_main_process:
                self.sample_grid(self.run_dir / "samples" / f"step_{self.step:08d}.png")
            if cfg.trainer.checkpoint_every and (self.step % cfg.trainer.checkpoint_every == 0 or self.step == cfg.run.max_steps):
                self.save_checkpoint()
        bar.close()
        logger.info("trained %d steps in %.1fs (%d non-finite updates skipped)", self.step, time.time() - start,
                    self.nonfinite_skipped)
        out = self.run_dir / "pipeline"
        if cfg.export.at_end:
            self.export(out)
        acc.wait_for_everyone()
        acc.end_training()
        return out

    def export(self, out_dir: str | Path, allow_untrained: bool = False) -> Path:
        """Write the EMA student as a stock diffusers pipeline (main process only). A student that has had no
        update (step 0) is the teacher's copy, not a distilled model: refused unless `allow_untrained`."""
        from distill.export.pipeline import export_pipeline

        if self.step == 0 and not allow_untrained:
            raise ConfigError(f"refusing to export an untrained student to {str(out_dir)!r}: the trainer is at step "
                              "0 (no update ran; load a checkpoint or train first)")
        out_dir = Path(out_dir)
        if self.accelerator.is_main_process:
            write = getattr(self.recipe, "export", None) or export_pipeline
            with self.ema_weights() as gen:
                if write is not export_pipeline:
                    write(gen, out_dir, num_steps=self.cfg.student.num_steps, config=self.cfg)
                else:
                    student = self.recipe.export_model(gen) if hasattr(self.recipe, "export_model") else gen
                    export_pipeline(student, out_dir, num_steps=self.cfg.student.num_steps, config=self.cfg,
                                    timesteps=getattr(self.recipe, "export_timesteps", None))
        self.accelerator.wait_for_everyone()
        return out_dir


def _flat_scalars(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = d if isinstance(d, (int, float, str, bool)) else str(d)
    return out
