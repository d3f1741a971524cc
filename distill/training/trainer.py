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
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from distill.base.batch import Batch
from distill.base.errors import ConfigError, NonFiniteError
from distill.base.seeding import MicroBatchRNG, step_seed
from distill.config import Config, config_to_yaml
from distill.training import checkpoints, parallel
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

        from distill.training.registry import build_run

        # FSDP2 on several processes: the others build on the meta device and receive the main's weights
        meta_init = cfg.trainer.parallel == "fsdp2" and acc.num_processes > 1 and cfg.trainer.fsdp.meta_init
        self.recipe, self.dataset, teacher = build_run(cfg, acc.device, acc.main_process_first,
                                                       meta=meta_init and not acc.is_main_process)
        if cfg.trainer.sample_every and getattr(self.dataset, "latent", False):
            raise ConfigError("trainer.sample_every: sample grids are drawn for pixel-space teachers; this teacher "
                              f"samples VAE latents {tuple(self.dataset.image_shape)}. Set trainer.sample_every=0 "
                              "and sample the exported pipeline instead")
        if cfg.trainer.sample_every and cfg.trainer.parallel == "fsdp2" and acc.num_processes > 1:
            raise ConfigError("trainer.sample_every: sample grids are drawn by the main process alone, and under "
                              "trainer.parallel: fsdp2 every pass needs every process; set trainer.sample_every=0 "
                              "and sample the exported pipeline")
        parallel.apply_memory_modes(self.recipe, teacher, cfg, acc.device)
        #: trainer.parallel: fsdp2 keeps sharded checkpoints on any number of processes; it shards on several
        self.sharded_checkpoints = cfg.trainer.parallel == "fsdp2"
        self.fsdp = self.sharded_checkpoints and acc.num_processes > 1
        # The export's copy of the generator: meta parameters, filled with the gathered weights at export time.
        self._export_skeleton = parallel.skeleton(self.recipe.generator) if acc.is_main_process else None

        self.target_network = None
        decay = self.recipe.target_decay
        if decay is not None:
            if not 0.0 <= float(decay) < 1.0:
                raise ValueError(f"recipe target_decay must be in [0, 1), got {decay}")
            self.target_network = copy.deepcopy(self.recipe.generator).requires_grad_(False)
        if self.fsdp:
            roles = [("teacher", teacher), ("generator", self.recipe.generator), ("critic", self.recipe.critic),
                     ("target", self.target_network)]
            devices = parallel.meta_init_devices(self.recipe, teacher, cfg, acc.device, [self.target_network])
            weights = parallel.MainWeights.before_sharding(roles, acc.is_main_process, devices) \
                if meta_init else None
            parallel.shard_roles(self.recipe, teacher, cfg, extra=[self.target_network],
                                 after_each=weights.scatter if weights is not None else lambda unit: None)
            if weights is not None:
                weights.finish()
                logger.info("FSDP2: the networks were built with weights on the main process alone; the other "
                            "%d process(es) built them on the meta device and received their shards",
                            acc.num_processes - 1)
        elif self.sharded_checkpoints:
            logger.info("trainer.parallel=fsdp2 on one process: nothing to shard; checkpoints are written sharded")
        self._prepare()

        from diffusers.training_utils import EMAModel

        #: trainer.ema_decay 0: the "average" is the raw weights, so its tensors are the generator's own (no copy)
        self.raw_ema = cfg.trainer.ema_decay == 0.0
        if self.raw_ema:
            self.ema = EMAModel([], decay=0.0)
            self._alias_raw_ema()
        else:
            self.ema = EMAModel(self.recipe.generator.parameters(), decay=cfg.trainer.ema_decay)
            self.ema.to(self._ema_device())
        if not self.sharded_checkpoints:  # registered after the schedulers: the checkpoint's file order is fixed
            acc.register_for_checkpointing(self.ema)
            if self.target_network is not None:
                acc.register_for_checkpointing(self.target_network)

        self.step = 0
        self.nonfinite_skipped = 0
        self._consecutive_nonfinite: dict[str, int] = {}  # per network: a healthy critic must not hide a stuck generator

    def _prepare(self) -> None:
        """Optimizers for the trained networks, and both prepared by accelerate for the processes. The recipe keeps
        its own modules; the prepared ones (`self.prepared`, DDP wrappers on several processes) are the trainer's
        alone, handed to a loss as `nets.trained`."""
        acc, r, tc = self.accelerator, self.recipe, self.cfg.trainer
        self.generator_opt, self.generator_sched = make_optimizer(r.generator, tc.generator, tc.optimizer)
        self.critic_opt = self.critic_sched = None
        if self.sharded_checkpoints:
            # FSDP2 (or its single-process form): the networks are their own "prepared" modules, sharded in place.
            if r.critic is not None:
                self.critic_opt, self.critic_sched = make_optimizer(r.critic, tc.critic, tc.optimizer)
            self.prepared = {"generator": r.generator, "critic": r.critic}
            return
        if r.critic is None:
            generator, self.generator_opt = acc.prepare(r.generator, self.generator_opt)
            self.prepared = {"generator": generator}
        else:
            self.critic_opt, self.critic_sched = make_optimizer(r.critic, tc.critic, tc.optimizer)
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
        acc.wait_for_everyone()
        if cfg.export.at_end:
            self.export(out)  # the main process writes; the others leave without waiting for it
        acc.end_training()
        return out

    def train_step(self) -> dict[str, float]:
        """One iteration: `critic_steps` critic updates, then one generator update, then the EMAs."""
        acc, r, tc = self.accelerator, self.recipe, self.cfg.trainer
        self._rng = MicroBatchRNG(self.cfg.run.seed, self.step, self._micro_indices(), acc.device)
        logs: dict[str, float] = {}
        if r.critic is not None:
            for k in range(tc.critic_steps):
                logs.update(self._update("critic", self._batches(self.step, 1 + k)))
        logs.update(self._update("generator", self._batches(self.step, 0)))
        self._ema_step()
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
    def _micro_indices(self) -> list[int]:
        """This process's micro-batches as indices into the update's global batch: process r of N with k
        micro-batches each holds r * k .. r * k + k - 1. Data and noise are drawn by global index, so N processes
        with k micro-batches and one process with N * k draw the same samples and the same noise: a run keeps
        its global batch across world sizes (trainer.gradient_accumulation_steps x processes)."""
        k = self.cfg.trainer.gradient_accumulation_steps
        return [self.accelerator.process_index * k + micro for micro in range(k)]

    def _batches(self, step: int, stream: int) -> list[Batch]:
        out = []
        for g_index in self._micro_indices():
            g = torch.Generator().manual_seed(step_seed(self.cfg.run.seed, step, g_index, 1000 + stream * 64))
            out.append(self.dataset.sample(self.cfg.data.batch_size, g).to(self.accelerator.device))
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
            if self.fsdp:
                parallel.sync_requires_grad([self.recipe.generator, self.recipe.critic, self.target_network])
            for i, batch in enumerate(batches):
                sync = i == n - 1
                # a micro-batch before the last accumulates locally (no gradient reduction); one context per `with`
                accumulate = (lambda: contextlib.nullcontext()) if sync or acc.num_processes == 1 else \
                    (lambda: self._no_sync(module))
                with self._rng.micro(i), accumulate(), acc.autocast():
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
        unscaled = False  # an fp16 GradScaler has unscaled this optimizer's gradients
        if finite:
            logs = self._mean_over_processes(logs)
            # Always measured (max_norm=inf does not clip): the norm is the guard against non-finite gradients.
            max_norm = self.cfg.trainer.max_grad_norm
            max_norm = math.inf if max_norm is None else max_norm
            if acc.scaler is not None:  # fp16: measure and clip the true gradients (this optimizer's only)
                acc.scaler.unscale_(getattr(opt, "optimizer", opt))
                unscaled = True
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None],
                                                       max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: the total norm of the sharded gradients is a DTensor
                grad_norm = grad_norm.full_tensor()
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)).item())
            logs[f"{name}/grad_norm"] = float(grad_norm)
        if not finite:
            opt.zero_grad(set_to_none=True)
            if unscaled:  # fp16: the scaler backs its scale off (as its own skipped step would) and rearms
                acc.scaler.update()
            self._nonfinite(name, logs)
            return logs
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        self._consecutive_nonfinite[name] = 0
        return logs

    def _no_sync(self, module: nn.Module):
        """Gradients accumulate locally (reduced at the last micro-batch): DDP's no_sync, or FSDP2's switch."""
        if not self.fsdp:
            return self.accelerator.no_sync(module)
        return parallel.no_gradient_sync(module)

    def _mean_over_processes(self, logs: dict[str, float]) -> dict[str, float]:
        """The logged scalars as means over the processes (each process's are means over its micro-batches), so
        a log line describes the global batch whatever the world size."""
        acc = self.accelerator
        if acc.num_processes == 1 or not logs:
            return logs
        keys = sorted(logs)
        values = acc.reduce(torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=acc.device),
                            reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _ema_device(self) -> torch.device:
        return torch.device("cpu") if self.cfg.trainer.ema_device == "cpu" else self.accelerator.device

    def _alias_raw_ema(self) -> None:
        self.ema.shadow_params = list(self.recipe.generator.parameters())

    def _ema_step(self) -> None:
        """The generator's EMA update; with trainer.ema_device cpu the averages visit the device for it (diffusers'
        EMAModel updates in place, on the weights' device). At decay 0 the averages are the weights: only the
        counters move."""
        if self.raw_ema:
            self.ema.optimization_step += 1
            self.ema.cur_decay_value = self.ema.get_decay(self.ema.optimization_step)
            return
        params = self.recipe.generator.parameters()
        if self._ema_device() == self.accelerator.device:
            self.ema.step(params)
            return
        self.ema.to(self.accelerator.device)
        self.ema.step(params)
        self.ema.to(self._ema_device())

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
        if self.sharded_checkpoints:  # the EMA's counters (its averages are in the shards)
            state["ema"] = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        if self.sharded_checkpoints:
            return checkpoints.save_sharded_checkpoint(self.accelerator, self.run_dir, self.step, state,
                                                       self._sharded_parts(), keep=self.cfg.trainer.keep_checkpoints)
        return checkpoints.save_checkpoint(self.accelerator, self.run_dir, self.step, state,
                                           keep=self.cfg.trainer.keep_checkpoints)

    def _sharded_parts(self) -> checkpoints.ShardedParts:
        nets = {"generator": (self.recipe.generator, self.generator_opt)}
        if self.recipe.critic is not None:
            nets["critic"] = (self.recipe.critic, self.critic_opt)
        if self.target_network is not None:
            nets["target"] = (self.target_network, None)
        scheds = {"generator": self.generator_sched}
        if self.critic_sched is not None:
            scheds["critic"] = self.critic_sched
        # at decay 0 the averages are the generator's weights, saved with it
        ema = [] if self.raw_ema else self.ema.shadow_params
        return checkpoints.ShardedParts(nets=nets, ema=ema, schedulers=scheds)

    def load_checkpoint(self, path: str | Path) -> None:
        if self.sharded_checkpoints:
            state = checkpoints.load_sharded_checkpoint(path, self._sharded_parts())
            for k, v in state.get("ema", {}).items():
                setattr(self.ema, k, v)
        else:
            state = checkpoints.load_checkpoint(self.accelerator, path)
            if self.raw_ema:  # accelerate's load gave the EMA copies of the weights; it holds the weights again
                self._alias_raw_ema()
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        consecutive = state.get("consecutive_nonfinite")
        self._consecutive_nonfinite = dict(consecutive) if isinstance(consecutive, dict) else {}
        logger.info("resumed from %s at step %d", path, self.step)
        written_by = state.get("world_size")  # absent in checkpoints written before it was recorded
        if written_by is not None and written_by != self.accelerator.num_processes \
                and state.get("global_batch") == self.global_batch():
            logger.info("resumed %s on %d process(es); it was written by %d: the global batch stays %d samples per "
                        "update, and the run draws the same data and noise as it would have (each sample's draws "
                        "follow its index in the global batch)", path, self.accelerator.num_processes, written_by,
                        self.global_batch())
        elif written_by is not None and written_by != self.accelerator.num_processes:
            logger.warning(
                "resumed %s on %d process(es); it was written by %d: the global batch changes from %s to %d samples "
                "per update (data.batch_size %d x trainer.gradient_accumulation_steps %d x processes; set one of them "
                "to keep it)", path,
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
        if not self.raw_ema:  # at decay 0 the generator's weights are the averages
            self.ema.store(gen.parameters())
            self.ema.copy_to(gen.parameters())
        was_training = gen.training
        gen.eval()
        try:
            yield gen
        finally:
            if not self.raw_ema:
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
        acc = self.accelerator
        with self.ema_weights() as gen:  # every process: sharded weights are gathered
            states = parallel.full_states(gen, acc.device, keep=acc.is_main_process)
        if acc.is_main_process:
            # A CPU copy (adapters merged there, not on the device); the other processes are done and do not wait.
            student = parallel.materialize(self._export_skeleton, states).eval()
            del states
            self.recipe.export(student, out_dir, num_steps=self.cfg.student.num_steps, config=self.cfg)
            self._export_skeleton = parallel.skeleton(student)
        return out_dir


def _accelerator(cfg: Config, run_dir: Path):
    """accelerate with the run's precision ("auto": bf16 on a GPU), logging to tensorboard under the run."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("accelerate launch --use_fsdp (or a config file with distributed_type: FSDP): distill "
                          "shards the networks itself with torch's fully_shard; launch without it (see "
                          "recipes/accelerate/*.yaml) and set trainer.parallel=fsdp2")
    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mp, log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
