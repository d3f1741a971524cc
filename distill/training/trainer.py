"""The trainer: all plumbing, once. Recipes never touch devices, wrappers, precision, checkpoints, logging or EMA.

A recipe (see :class:`distill.training.recipe.Recipe`) owns a trainable `generator` (the student), optionally a
trainable `critic` (fake score, discriminator head, ...), and their losses. Per iteration the trainer runs
`trainer.critic_steps` critic updates and then one generator update, each with its own optimizer
(`distill.training.optim`), learning rate, gradient accumulation, clipping and non-finite guard, handing each loss
the networks of its update (`distill.training.nets`); it keeps an EMA of the generator, writes sample grids and
logs (`distill.training.reporting`), and checkpoints on every rank, atomically (`distill.training.checkpoints`).

Determinism: every iteration reseeds torch from (seed, step, rank) and draws its data batch from a generator
seeded the same way, so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from distill.base.batch import Batch
from distill.base.errors import ConfigError, NonFiniteError
from distill.base.seeding import step_seed
from distill.config import Config, config_to_yaml
from distill.training import checkpoints
from distill.training.files import check_run_dir, saved_config_changes
from distill.training.nets import update_nets
from distill.training.optim import make_optimizer
from distill.training.reporting import Progress, write_sample_grid

logger = logging.getLogger("distill")


class Trainer:
    """Runs a recipe under accelerate. Build with a validated :class:`Config`; call :meth:`train`."""

    def __init__(self, cfg: Config, accelerator=None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        self.accelerator = acc = accelerator or _accelerator(cfg, self.run_dir)
        torch.manual_seed(cfg.run.seed)  # model construction (heads) is identical on every rank

        from distill.training.registry import build_recipe

        self.recipe, self.dataset = build_recipe(cfg, acc.device, acc.main_process_first)
        if cfg.trainer.sample_every and getattr(self.dataset, "latent", False):
            raise ConfigError("trainer.sample_every: sample grids are drawn for pixel-space teachers; this teacher "
                              f"samples VAE latents {tuple(self.dataset.image_shape)}. Set trainer.sample_every=0 "
                              "and sample the exported pipeline instead")
        self._prepare()

        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(self.recipe.generator.parameters(), decay=cfg.trainer.ema_decay)
        self.ema.to(acc.device)
        acc.register_for_checkpointing(self.ema)

        self.target_network = None
        decay = self.recipe.target_decay
        if decay is not None:
            if not 0.0 <= float(decay) < 1.0:
                raise ValueError(f"recipe target_decay must be in [0, 1), got {decay}")
            self.target_network = copy.deepcopy(self.recipe.generator).requires_grad_(False)
            acc.register_for_checkpointing(self.target_network)

        self.step = 0
        self.nonfinite_skipped = 0
        self._consecutive_nonfinite: dict[str, int] = {}  # per network: a healthy critic must not hide a stuck generator

    def _prepare(self) -> None:
        """Optimizers for the trained networks, and both prepared by accelerate for the processes. The recipe keeps
        its own modules; the prepared ones (`self.prepared`, DDP wrappers on several processes) are the trainer's
        alone, handed to a loss as `nets.trained`."""
        acc, r, tc = self.accelerator, self.recipe, self.cfg.trainer
        self.generator_opt, self.generator_sched = make_optimizer(r.generator, tc.generator)
        self.critic_opt = self.critic_sched = None
        if r.critic is None:
            generator, self.generator_opt = acc.prepare(r.generator, self.generator_opt)
            self.prepared = {"generator": generator}
        else:
            self.critic_opt, self.critic_sched = make_optimizer(r.critic, tc.critic)
            generator, critic, self.generator_opt, self.critic_opt = acc.prepare(
                r.generator, r.critic, self.generator_opt, self.critic_opt)
            self.prepared = {"generator": generator, "critic": critic}
        # Schedulers are not prepared (accelerate would step them once per process); they count updates and are
        # checkpointed as custom state (registered first, so the checkpoint's file order stays fixed).
        for sched in (self.generator_sched, self.critic_sched):
            if sched is not None:
                acc.register_for_checkpointing(sched)

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to `run.max_steps` (resuming as `trainer.resume` says), then export if `export.at_end`."""
        acc, cfg, tc = self.accelerator, self.cfg, self.cfg.trainer
        self._open_run_dir()
        self.maybe_resume()
        progress = Progress(acc, cfg, self.step)
        while self.step < cfg.run.max_steps:
            logs = self.train_step()
            progress.update(self.step, logs, lr=self.generator_sched.get_last_lr()[0])
            if tc.sample_every and self.step % tc.sample_every == 0 and acc.is_main_process:
                self.sample_grid(self.run_dir / "samples" / f"step_{self.step:08d}.png")
            if tc.checkpoint_every and (self.step % tc.checkpoint_every == 0 or self.step == cfg.run.max_steps):
                self.save_checkpoint()
        progress.close(self.step, self.nonfinite_skipped)
        out = self.run_dir / "pipeline"
        if cfg.export.at_end:
            self.export(out)
        acc.wait_for_everyone()
        acc.end_training()
        return out

    def train_step(self) -> dict[str, float]:
        """One iteration: `critic_steps` critic updates, then one generator update, then the EMAs."""
        acc, r, tc = self.accelerator, self.recipe, self.cfg.trainer
        torch.manual_seed(step_seed(self.cfg.run.seed, self.step, acc.process_index))
        logs: dict[str, float] = {}
        if r.critic is not None:
            for k in range(tc.critic_steps):
                logs.update(self._update("critic", self._batches(self.step, 1 + k)))
        logs.update(self._update("generator", self._batches(self.step, 0)))
        self.ema.step(r.generator.parameters())
        if self.target_network is not None:
            with torch.no_grad():
                for t, p in zip(self.target_network.parameters(), r.generator.parameters()):
                    t.lerp_(p.detach(), 1.0 - float(r.target_decay))
        self.step += 1
        logs["nonfinite_skipped"] = float(self.nonfinite_skipped)
        return logs

    def _open_run_dir(self) -> None:
        """Refuse another run's folder, then write this run's resolved config into it (main process)."""
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

    # -- one update -----------------------------------------------------------------------------------------
    def _batches(self, step: int, stream: int) -> list[Batch]:
        acc = self.accelerator
        out = []
        for micro in range(self.cfg.trainer.gradient_accumulation_steps):
            g = torch.Generator().manual_seed(step_seed(self.cfg.run.seed, step, acc.process_index, 1000 + stream * 64 + micro))
            out.append(self.dataset.sample(self.cfg.data.batch_size, g).to(acc.device))
        return out

    def _update(self, name: str, batches: list[Batch]) -> dict[str, float]:
        """One update of network `name` ("generator" / "critic") over the micro-batches `batches`: accumulated
        gradients, clipped; skipped when a loss or the gradient is not finite on any process."""
        acc, module = self.accelerator, self.prepared[name]
        if name == "generator":
            opt, sched, loss_fn = self.generator_opt, self.generator_sched, self.recipe.generator_loss
        else:
            opt, sched, loss_fn = self.critic_opt, self.critic_sched, self.recipe.critic_loss
        n = len(batches)
        logs: dict[str, float] = {}
        finite = True
        with update_nets(self.recipe, name, module, self.target_network) as nets:
            for i, batch in enumerate(batches):
                sync = i == n - 1
                # a micro-batch before the last accumulates locally (no gradient all-reduce); one context per `with`
                accumulate = (lambda: contextlib.nullcontext()) if sync or acc.num_processes == 1 else \
                    (lambda: acc.no_sync(module))
                with accumulate(), acc.autocast():
                    loss, parts = loss_fn(nets, batch, self.step)
                ok = torch.isfinite(loss.detach()).float()
                finite = finite and bool(acc.reduce(ok, reduction="sum").item() == acc.num_processes)
                if not finite:
                    logs.update({f"{name}/{k}": v for k, v in parts.items()})
                    break
                with accumulate():
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

    # -- checkpoints (distill.training.checkpoints) ---------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "nonfinite_skipped": self.nonfinite_skipped,
                 "consecutive_nonfinite": dict(self._consecutive_nonfinite),
                 "world_size": self.accelerator.num_processes, "global_batch": self.global_batch()}
        return checkpoints.save_checkpoint(self.accelerator, self.run_dir, self.step, state,
                                           keep=self.cfg.trainer.keep_checkpoints)

    def load_checkpoint(self, path: str | Path) -> None:
        state = checkpoints.load_checkpoint(self.accelerator, path)
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        consecutive = state.get("consecutive_nonfinite")
        self._consecutive_nonfinite = dict(consecutive) if isinstance(consecutive, dict) else {}
        logger.info("resumed from %s at step %d", path, self.step)
        written_by = state.get("world_size")  # absent in checkpoints written before it was recorded
        if written_by is not None and written_by != self.accelerator.num_processes:
            logger.warning(
                "resumed %s on %d process(es); it was written by %d: the global batch changes from %s to %d samples "
                "per update (data.batch_size %d x trainer.gradient_accumulation_steps %d x processes; set one of them "
                "to keep it), and each process draws its own data and noise from here on", path,
                self.accelerator.num_processes, written_by, state.get("global_batch", "?"), self.global_batch(),
                self.cfg.data.batch_size, self.cfg.trainer.gradient_accumulation_steps)

    def global_batch(self) -> int:
        """Samples per update over all processes."""
        return self.cfg.data.batch_size * self.cfg.trainer.gradient_accumulation_steps * self.accelerator.num_processes

    def maybe_resume(self) -> None:
        ckpt = checkpoints.resume_checkpoint(self.run_dir, self.cfg.trainer.resume)
        if ckpt is not None:
            self.load_checkpoint(ckpt)

    # -- the EMA student: samples and export ----------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """The generator with EMA weights swapped in (restored afterwards)."""
        gen = self.recipe.generator
        self.ema.store(gen.parameters())
        self.ema.copy_to(gen.parameters())
        was_training = gen.training
        gen.eval()
        try:
            yield gen
        finally:
            self.ema.restore(gen.parameters())
            gen.train(was_training)

    def sample_grid(self, path: Path, n: int = 64) -> Path:
        with self.ema_weights() as gen:
            return write_sample_grid(self.recipe, gen, self.dataset, path, self.cfg.run.seed, self.accelerator.device,
                                     n)

    def export(self, out_dir: str | Path, allow_untrained: bool = False) -> Path:
        """Write the EMA student with the recipe's writer (main process only). A student that has had no update
        (step 0) is the teacher's copy, not a distilled model: refused unless `allow_untrained`."""
        if self.step == 0 and not allow_untrained:
            raise ConfigError(f"refusing to export an untrained student to {str(out_dir)!r}: the trainer is at step "
                              "0 (no update ran; load a checkpoint or train first)")
        out_dir = Path(out_dir)
        if self.accelerator.is_main_process:
            with self.ema_weights() as gen:
                self.recipe.export(gen, out_dir, num_steps=self.cfg.student.num_steps, config=self.cfg)
        self.accelerator.wait_for_everyone()
        return out_dir


def _accelerator(cfg: Config, run_dir: Path):
    """accelerate with the run's precision ("auto": bf16 on a GPU), logging to tensorboard under the run."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mp, log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
