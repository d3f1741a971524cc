"""The trainer's promises, on a tiny teacher: exact resume, atomic checkpoints, the non-finite guard, run artifacts."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_config, weights

from distill.base.errors import ConfigError, NonFiniteError
from distill.training.checkpoints import latest_checkpoint, list_checkpoints
from distill.training.preflight import load_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# Two critic updates per step, a 2-step student (backward simulation draws random numbers), an LR warmup that is
# still running at the checkpoint, a sample grid at the checkpoint (swaps EMA weights in and out): all of it must
# come back exactly on resume.
RUN = ("run.max_steps=6", "trainer.checkpoint_every=3", "trainer.sample_every=3", "student.num_steps=2",
       "trainer.critic_steps=2", "trainer.generator.warmup_steps=4", "trainer.ema_decay=0.9",
       "trainer.keep_checkpoints=2", "trainer.generator.lr=2e-5")
GENERATOR_LR = 2e-5  # set in RUN, so the shipped YAML can change


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between two steps and nothing after that point runs."""


def count_steps(trainer: Trainer, kill_at: int | None = None) -> list[int]:
    """Record the step index of every train_step call; raise Killed instead of running step `kill_at`."""
    seen: list[int] = []
    step = trainer.train_step

    def counted():
        if trainer.step == kill_at:
            raise Killed
        seen.append(trainer.step)
        return step()

    trainer.train_step = counted
    return seen


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tiny_teacher, tmp_path_factory, one_thread):
    """Six steps without interruption."""
    run = tmp_path_factory.mktemp("straight")
    trainer = Trainer(tiny_config(tiny_teacher, run, *RUN))
    initial = weights(trainer)
    seen = count_steps(trainer)
    trainer.train()
    assert seen == list(range(6))
    return {"run": run, "initial": initial, "final": weights(trainer), "cfg": trainer.cfg}


@pytest.fixture(scope="module")
def resumed(tiny_teacher, tmp_path_factory, one_thread):
    """The same six steps, killed after step 4 (last checkpoint: step 3), then resumed with resume=latest."""
    run = tmp_path_factory.mktemp("resumed")
    first = Trainer(tiny_config(tiny_teacher, run, *RUN))
    count_steps(first, kill_at=4)
    with pytest.raises(Killed):
        first.train()
    first.accelerator.end_training()
    at_kill = weights(first)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003"]

    second = Trainer(tiny_config(tiny_teacher, run, *RUN, "trainer.resume=latest"))
    seen = count_steps(second)
    second.train()
    return {"run": run, "at_kill": at_kill, "final": weights(second), "steps_run": seen}


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------


def test_resume_is_bitwise_exact(straight, resumed):
    assert resumed["steps_run"] == [3, 4, 5]  # it resumed from step 3, it did not start over
    for net in ("generator", "critic", "ema"):
        assert differs(straight["final"][net], straight["initial"][net]), f"{net} did not train"
        assert differs(resumed["at_kill"][net], resumed["final"][net]), f"{net}: the killed step-4 state survived"
        assert_same(resumed["final"][net], straight["final"][net], net)


def test_resumed_checkpoints_and_samples_match_the_straight_run(straight, resumed):
    from safetensors.torch import load_file

    a, b = straight["run"], resumed["run"]
    for name in ("model.safetensors", "model_1.safetensors"):
        ckpt = "checkpoints/step-00000006"
        assert_same(load_file(b / ckpt / name), load_file(a / ckpt / name), name)
    opt_a = torch.load(a / "checkpoints/step-00000006/optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(b / "checkpoints/step-00000006/optimizer.bin", weights_only=False)["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert_same(opt_b[k], opt_a[k], f"generator optimizer state {k}")
    state = json.loads((b / "checkpoints/step-00000006/trainer_state.json").read_text())
    assert state["step"] == 6 and state["nonfinite_skipped"] == 0
    assert (a / "samples/step_00000006.png").read_bytes() == (b / "samples/step_00000006.png").read_bytes()


def test_checkpoint_holds_the_trained_weights(straight):
    from safetensors.torch import load_file

    ckpts = list_checkpoints(straight["run"])
    assert [p.name for p in ckpts] == ["step-00000003", "step-00000006"]
    last = ckpts[-1]
    assert latest_checkpoint(straight["run"]) == last
    assert_same(load_file(last / "model.safetensors"), straight["final"]["generator"], "generator")
    assert_same(load_file(last / "model_1.safetensors"), straight["final"]["critic"], "critic")
    assert (last / "random_states_0.pkl").is_file()
    assert not list(last.rglob("*.bin.tmp")) and not list((straight["run"] / "checkpoints").glob(".tmp-*"))


def test_interrupted_save_is_ignored_and_resume_works(straight, tiny_teacher, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight["run"], run)
    ckpts = run / "checkpoints"
    # A kill while step 9 was being written: a hidden folder with a half-written model.
    (ckpts / ".tmp-step-00000009").mkdir()
    (ckpts / ".tmp-step-00000009" / "model.safetensors").write_bytes(b"\0" * 100)
    # A step folder without trainer_state.json (e.g. copied by hand, or written by an older, non-atomic save).
    shutil.copytree(ckpts / "step-00000006", ckpts / "step-00000012")
    (ckpts / "step-00000012" / "trainer_state.json").unlink()
    (ckpts / "step-00000012" / "model.safetensors").write_bytes(b"garbage")

    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000006"]
    assert latest_checkpoint(run) == ckpts / "step-00000006"

    trainer = Trainer(tiny_config(tiny_teacher, run, *RUN, "run.max_steps=7", "trainer.checkpoint_every=1",
                                  "trainer.resume=latest"))
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        trainer.load_checkpoint(ckpts / "step-00000012")
    loaded: list[dict] = []
    step = trainer.train_step

    def first_step_sees_checkpoint():
        if not loaded:
            loaded.append(weights(trainer))
        return step()

    trainer.train_step = first_step_sees_checkpoint
    trainer.train()
    assert trainer.step == 7
    for net in ("generator", "critic", "ema"):
        assert_same(loaded[0][net], straight["final"][net], f"{net} loaded from step 6")
    # keep_checkpoints=2: step 3 is pruned once step 7 is written; the stale temporary folder is cleaned up.
    assert [p.name for p in list_checkpoints(run)] == ["step-00000006", "step-00000007"]
    assert not list(ckpts.glob(".tmp-*"))


def test_resume_from_an_explicit_checkpoint(straight, tiny_teacher, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight["run"], run)
    trainer = Trainer(tiny_config(tiny_teacher, run, *RUN, f"trainer.resume={run / 'checkpoints/step-00000003'}",
                                  "trainer.checkpoint_every=0", "trainer.sample_every=0"))
    seen = count_steps(trainer)
    trainer.train()
    assert seen == [3, 4, 5]
    for net in ("generator", "critic", "ema"):
        assert_same(weights(trainer)[net], straight["final"][net], net)


def test_resume_latest_without_checkpoints_starts_fresh_and_missing_path_fails(tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path / "fresh", "trainer.resume=latest"))
    trainer.maybe_resume()
    assert trainer.step == 0
    # A resume path that does not exist is refused when the config is loaded, before any model is built.
    with pytest.raises(ConfigError, match="trainer.resume: checkpoint folder .*nope.* does not exist"):
        tiny_config(tiny_teacher, tmp_path / "other", f"trainer.resume={tmp_path / 'nope'}")


def test_keep_checkpoints_prunes_old_ones(tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "run.max_steps=3", "trainer.checkpoint_every=1",
                                  "trainer.keep_checkpoints=1"))
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]


# ---------------------------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------------------------


def poison(monkeypatch, trainer: Trainer, loss: str, at) -> None:
    """Make the recipe's `loss` ("generator_loss" / "critic_loss") NaN whenever `at(step)` is true."""
    original = getattr(trainer.recipe, loss)

    def poisoned(nets, batch, step):
        value, parts = original(nets, batch, step)
        return (value * math.nan, parts) if at(step) else (value, parts)

    monkeypatch.setattr(trainer.recipe, loss, poisoned)


def adam_steps(opt) -> list[float]:
    return [float(s["step"]) for s in opt.state.values()]


@pytest.mark.parametrize("net, other", [("generator", "critic"), ("critic", "generator")])
def test_nonfinite_loss_is_skipped(monkeypatch, tiny_teacher, tmp_path, net, other):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "trainer.on_nonfinite=skip", "trainer.critic_steps=2"))
    poison(monkeypatch, trainer, f"{net}_loss", lambda step: step == 1)
    opt, sched = getattr(trainer, f"{net}_opt"), getattr(trainer, f"{net}_sched")
    module = getattr(trainer.recipe, net)
    trainer.train_step()
    before, opt_steps, sched_steps = weights(trainer), adam_steps(opt), sched.last_epoch

    logs = trainer.train_step()
    after = weights(trainer)
    assert_same(after[net], before[net], f"{net} after the skipped update")
    assert differs(after[other], before[other]), f"{other} must still train"
    assert adam_steps(opt) == opt_steps and sched.last_epoch == sched_steps
    assert all(p.grad is None for p in module.parameters())  # no half-accumulated gradient is left behind
    skipped = 2 if net == "critic" else 1  # every critic update of the step was poisoned
    assert trainer.nonfinite_skipped == skipped and logs["nonfinite_skipped"] == skipped

    trainer.train_step()  # training goes on
    assert differs(weights(trainer)[net], after[net])
    assert trainer.nonfinite_skipped == skipped
    assert all(math.isfinite(float(v.abs().sum())) for v in weights(trainer)[net].values())


@pytest.mark.parametrize("max_grad_norm", ["1.0", "null"])
def test_nonfinite_gradient_is_skipped(tiny_teacher, tmp_path, max_grad_norm):
    # A finite loss whose gradient is NaN (e.g. an overflow in backward) must not reach the weights either,
    # with or without gradient clipping.
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, f"trainer.max_grad_norm={max_grad_norm}"))
    trainer.train_step()
    before = weights(trainer)
    param = next(p for p in trainer.recipe.generator.parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: torch.full_like(g, math.nan))
    trainer.train_step()
    hook.remove()
    assert_same(weights(trainer)["generator"], before["generator"], "generator after a NaN gradient")
    assert trainer.nonfinite_skipped == 1
    trainer.train_step()
    assert all(math.isfinite(float(v.abs().sum())) for v in weights(trainer)["generator"].values())


def test_nonfinite_stop_raises_naming_step_and_network(monkeypatch, tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "trainer.on_nonfinite=stop", "run.max_steps=4"))
    poison(monkeypatch, trainer, "generator_loss", lambda step: step == 2)
    with pytest.raises(NonFiniteError) as e:
        trainer.train()
    trainer.accelerator.end_training()
    msg = str(e.value)
    assert "generator" in msg and "step 2" in msg and "on_nonfinite=stop" in msg
    assert trainer.step == 2


@pytest.mark.parametrize("nets", [("generator",), ("critic",), ("generator", "critic")])
def test_too_many_consecutive_nonfinite_updates_stop(monkeypatch, tiny_teacher, tmp_path, nets):
    # A network whose every update is skipped must stop the run even while the other one trains fine.
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "trainer.on_nonfinite=skip", "trainer.critic_steps=2",
                                  "trainer.max_consecutive_nonfinite=2", "run.max_steps=6"))
    for net in nets:
        poison(monkeypatch, trainer, f"{net}_loss", lambda step: True)
    with pytest.raises(NonFiniteError, match="max_consecutive_nonfinite=2") as e:
        trainer.train()
    trainer.accelerator.end_training()
    assert any(net in str(e.value) for net in nets)
    assert trainer.step <= 2


def test_consecutive_nonfinite_count_survives_resume(monkeypatch, tiny_teacher, tmp_path):
    extra = ("trainer.on_nonfinite=skip", "trainer.max_consecutive_nonfinite=3", "trainer.checkpoint_every=2")
    first = Trainer(tiny_config(tiny_teacher, tmp_path, *extra, "run.max_steps=2"))
    poison(monkeypatch, first, "generator_loss", lambda step: True)
    first.train()  # two skipped generator updates, checkpointed at step 2
    second = Trainer(tiny_config(tiny_teacher, tmp_path, *extra, "run.max_steps=6", "trainer.resume=latest"))
    poison(monkeypatch, second, "generator_loss", lambda step: True)
    with pytest.raises(NonFiniteError, match="max_consecutive_nonfinite=3"):
        second.train()  # skips 3 and 4 in a row come at steps 2 and 3
    second.accelerator.end_training()
    assert second.step == 3 and second.nonfinite_skipped == 4


def test_isolated_nonfinite_updates_do_not_stop(monkeypatch, tiny_teacher, tmp_path):
    # Only *consecutive* skips count: a NaN every other step with max_consecutive_nonfinite=1 trains to the end.
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "trainer.on_nonfinite=skip", "run.max_steps=4",
                                  "trainer.max_consecutive_nonfinite=1"))
    poison(monkeypatch, trainer, "generator_loss", lambda step: step % 2 == 0)
    trainer.train()
    assert trainer.step == 4 and trainer.nonfinite_skipped == 2


# ---------------------------------------------------------------------------------------------------------------
# Run artifacts
# ---------------------------------------------------------------------------------------------------------------


def test_run_dir_holds_the_resolved_config(straight):
    saved = straight["run"] / "config.yaml"
    assert load_config(saved) == straight["cfg"]
    assert straight["cfg"].student.num_steps == 2 and straight["cfg"].trainer.ema_decay == 0.9


def test_tensorboard_logs_losses_and_lr_schedule(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((straight["run"] / "logs").rglob("events.out.tfevents.*"))
    assert files
    scalars: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    for tag in ("generator/loss", "generator/dmd_loss", "critic/denoise_loss", "generator/grad_norm"):
        assert sorted(scalars[tag]) == [1, 2, 3, 4, 5, 6], tag  # log_every=1
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    # warmup_steps=4 counts generator updates: update k (from 0) runs at min(1, k / 4) of the rate, so the rate
    # logged after k updates, the next update's, is that of update k.
    lr = scalars["lr/generator"]
    for k in range(1, 7):
        assert lr[k] == pytest.approx(GENERATOR_LR * min(1.0, k / 4), rel=1e-6), k


def test_sample_grids_are_written(straight):
    grids = sorted((straight["run"] / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_00000003.png", "step_00000006.png"]
    with Image.open(grids[-1]) as img:
        # 64 samples of 8x8, 8 per row, 1px padding, upscaled 4x.
        assert img.size == ((8 * 9 + 1) * 4, (8 * 9 + 1) * 4) and img.mode == "L"
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32))
    assert pixels.std() > 1.0  # not a blank canvas
    assert grids[0].read_bytes() != grids[1].read_bytes()


def test_ema_differs_from_raw_weights(straight):
    raw = [v for k, v in straight["final"]["generator"].items()]
    ema = list(straight["final"]["ema"].values())
    assert len(raw) == len(ema)
    assert any(not torch.equal(r, e) for r, e in zip(raw, ema))
    # ... and it moved away from the teacher initialisation toward the raw weights.
    init = list(straight["initial"]["generator"].values())
    assert any(not torch.equal(i, e) for i, e in zip(init, ema))
