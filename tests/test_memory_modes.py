"""The memory modes (docs/scale.md), each on the tiny teacher: what it changes and that it changes nothing else."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from tiny import REPO, tiny_config, weights

from distill.base.errors import ConfigError
from distill.training.preflight import load_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and safe beside other jobs

SCM = REPO / "recipes" / "digits" / "scm.yaml"
ADAPTERS = REPO / "recipes" / "digits" / "dmd2_adapters.yaml"


def two_steps(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    trainer.train_step()
    trainer.train_step()
    out = weights(trainer)
    trainer.accelerator.end_training()
    return out


def assert_equal_weights(a, b, what: str) -> None:
    for net in a:
        assert a[net].keys() == b[net].keys()
        bad = [k for k in a[net] if not torch.equal(a[net][k], b[net][k])]
        assert not bad, f"{what}: {net} differs in {bad[:3]}"


def test_gradient_checkpointing_recomputes_the_same_gradients(tiny_teacher, tmp_path):
    plain = Trainer(tiny_config(tiny_teacher, tmp_path / "plain"))
    checkpointed = Trainer(tiny_config(tiny_teacher, tmp_path / "ckpt", "trainer.gradient_checkpointing=true"))
    nets = [checkpointed.recipe.generator.model, checkpointed.recipe.critic.denoiser.model]
    assert all(n.is_gradient_checkpointing for n in nets)
    assert not checkpointed.recipe.teacher.model.is_gradient_checkpointing  # frozen: no backward to save for
    assert_equal_weights(two_steps(plain), two_steps(checkpointed), "gradient checkpointing")


def test_gradient_checkpointing_combines_with_the_jvp(tiny_teacher, tmp_path):
    """sCM's target is a JVP of the student taken without gradient (distill.models.jvp), where diffusers does not
    checkpoint; its loss pass with gradient is checkpointed: the run equals the plain one."""
    def scm(run, *extra):
        from tiny import tiny_overrides

        return Trainer(load_config(SCM, tiny_overrides(tiny_teacher, run, "student.num_steps=1", *extra)))

    plain, checkpointed = scm(tmp_path / "a"), scm(tmp_path / "b", "trainer.gradient_checkpointing=true")
    assert checkpointed.recipe.export_model(checkpointed.recipe.generator).model.is_gradient_checkpointing
    assert_equal_weights(two_steps(plain), two_steps(checkpointed), "sCM with gradient checkpointing")


def test_gradient_checkpointing_combines_with_adapters(tiny_teacher, tmp_path):
    """Student and fake score as adapters on one base: a block is recomputed in backward under the adapter it ran
    forward with (distill.models.adapters.adapter_checkpointing), not the last one called; the run equals the plain
    one."""
    def run(path, *extra):
        from tiny import tiny_overrides

        return Trainer(load_config(ADAPTERS, tiny_overrides(tiny_teacher, path, "recipe.lora_rank=4",
                                                            "trainer.generator.lr=1e-3", "trainer.critic.lr=1e-3",
                                                            *extra)))

    plain, checkpointed = run(tmp_path / "a"), run(tmp_path / "b", "trainer.gradient_checkpointing=true")
    assert checkpointed.recipe.teacher.model.is_gradient_checkpointing  # the shared base trains through its LoRA
    before = weights(checkpointed)
    a, b = two_steps(plain), two_steps(checkpointed)
    assert any(not torch.equal(before["generator"][k], b["generator"][k]) for k in b["generator"]), "nothing trained"
    assert_equal_weights(a, b, "adapters with gradient checkpointing")


def test_gradient_checkpointing_is_refused_by_name_for_a_network_without_it(tmp_path):
    cfg = load_config(REPO / "recipes" / "toy" / "dmd2.yaml",
                      [f"run.output_dir={tmp_path}", "trainer.gradient_checkpointing=true", "run.max_steps=1"])
    with pytest.raises(ConfigError, match=r"trainer.gradient_checkpointing: ToyMLP .* has no gradient checkpointing"):
        Trainer(cfg)


def test_a_bfloat16_teacher_trains_float32_students(tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "teacher.dtype=bfloat16"))
    teacher = trainer.recipe.teacher
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    for net in (trainer.recipe.generator, trainer.recipe.critic):
        assert {p.dtype for p in net.parameters()} == {torch.float32}
    logs = trainer.train_step()
    assert all(math.isfinite(v) for v in logs.values())
    # The teacher's prediction in bfloat16 is the float32 teacher's up to bfloat16 rounding.
    full = Trainer(tiny_config(tiny_teacher, tmp_path / "fp32")).recipe.teacher
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 1.0)
    cond = {"class_labels": torch.arange(4)}
    with torch.no_grad():
        low, high = teacher(x, t, cond), full(x, t, cond)
    assert low.dtype == torch.float32
    err = (low - high).abs().max().item()
    assert 0 < err < 0.05 * high.abs().max().item()


def test_the_ema_on_the_cpu_is_the_same_average(tiny_teacher, tmp_path):
    on_device = Trainer(tiny_config(tiny_teacher, tmp_path / "a"))
    on_cpu = Trainer(tiny_config(tiny_teacher, tmp_path / "b", "trainer.ema_device=cpu"))
    assert {p.device.type for p in on_cpu.ema.shadow_params} == {"cpu"}
    assert_equal_weights(two_steps(on_device), two_steps(on_cpu), "EMA on the CPU")


def test_the_8bit_optimizer_names_its_missing_package(monkeypatch, tiny_teacher, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    from distill.base.optional import MissingPackage

    with pytest.raises(MissingPackage, match=r"trainer.optimizer: adamw_8bit needs the package 'bitsandbytes'"):
        Trainer(tiny_config(tiny_teacher, tmp_path, "trainer.optimizer=adamw_8bit"))


def test_teacher_offload_refuses_the_shared_adapter_base(tiny_teacher, tmp_path):
    from tiny import tiny_overrides

    cfg = load_config(ADAPTERS, tiny_overrides(tiny_teacher, tmp_path, "teacher.offload=true"))
    with pytest.raises(ConfigError, match=r"teacher.offload: the teacher is the shared base"):
        Trainer(cfg)


@pytest.mark.parametrize("key,value,message", [
    ("trainer.fsdp.offload", "true", "trainer.fsdp.offload: needs trainer.parallel: fsdp2"),
    ("trainer.mixed_precision", "fp16", "trainer.mixed_precision: fp16 cannot combine with trainer.parallel: fsdp2"),
])
def test_memory_mode_relations_are_checked_by_name(tiny_teacher, tmp_path, key, value, message):
    extra = [f"{key}={value}"] + (["trainer.parallel=fsdp2"] if key == "trainer.mixed_precision" else [])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny_config(tiny_teacher, tmp_path, *extra)


def test_fp16_scaler_survives_a_skipped_update(tiny_teacher, tmp_path):
    """fp16 training with a GradScaler (accelerate makes one on GPUs; here a CPU one): an overflowing gradient is
    skipped, the scaler backs off its scale, and the next updates run (a skip that left the scaler's optimizer
    state 'unscaled' made the next update fail)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path), accelerator=acc)
    trainer.train_step()
    scale = acc.scaler.get_scale()
    param = next(p for p in trainer.recipe.generator.parameters() if p.requires_grad)
    before = param.detach().clone()
    hook = param.register_hook(lambda g: torch.full_like(g, math.inf))
    trainer.train_step()
    hook.remove()
    assert trainer.nonfinite_skipped == 1 and torch.equal(param.detach(), before)
    assert acc.scaler.get_scale() == scale * 0.5
    trainer.train_step()
    trainer.train_step()
    assert trainer.nonfinite_skipped == 1 and not torch.equal(param.detach(), before)
    acc.end_training()


def test_cached_prompt_embeddings_are_read_as_a_memory_map(tmp_path):
    """The prompt-embedding cache is read as views of a memory map of its file (shared by the processes of a
    machine through the OS page cache), equal to safetensors' own reading, dtypes and empty tensors included."""
    from safetensors.torch import load_file, save_file

    from distill.data.prompts import mapped_safetensors

    tensors = {"cond.encoder_hidden_states": torch.randn(3, 5, 7), "cond.ids": torch.arange(6).view(2, 3),
               "null.pooled": torch.randn(1, 4).to(torch.bfloat16), "cond.empty": torch.zeros(0, 3)}
    file = tmp_path / "prompts-x.safetensors"
    save_file(tensors, file)
    mapped, read = mapped_safetensors(file), load_file(file)
    assert mapped.keys() == read.keys()
    for k in read:
        assert mapped[k].dtype == read[k].dtype and torch.equal(mapped[k], read[k]), k
    idx = torch.tensor([2, 0, 2])
    assert torch.equal(mapped["cond.encoder_hidden_states"][idx], read["cond.encoder_hidden_states"][idx])
    maps = Path("/proc/self/maps").read_text()
    assert str(file) in maps  # the file is mapped, not copied
    mapped["cond.ids"][0, 0] = 99  # copy-on-write: writable, and the file is unchanged
    assert load_file(file)["cond.ids"][0, 0] == 0


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_an_ema_of_decay_0_is_the_weights_themselves(tiny_teacher, tmp_path, parallel):
    """trainer.ema_decay 0 (the raw weights): no copy is kept; the averages are the generator's own parameters, the
    counters still move, and a checkpoint (accelerate's format, or the sharded one) resumes into the same state."""
    extra = ("trainer.ema_decay=0", f"trainer.parallel={parallel}")
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path / "a", *extra))
    gen = list(trainer.recipe.generator.parameters())
    assert len(trainer.ema.shadow_params) == len(gen) and all(s is p for s, p in zip(trainer.ema.shadow_params, gen))
    trainer.train_step()
    trainer.train_step()
    assert trainer.ema.optimization_step == 2
    ckpt = trainer.save_checkpoint()
    with trainer.ema_weights() as g:
        exported = {k: v.clone() for k, v in g.state_dict().items()}
    assert all(torch.equal(exported[k], v) for k, v in trainer.recipe.generator.state_dict().items())
    trainer.accelerator.end_training()

    resumed = Trainer(tiny_config(tiny_teacher, tmp_path / "b", *extra))
    resumed.load_checkpoint(ckpt)
    gen = list(resumed.recipe.generator.parameters())
    assert all(s is p for s, p in zip(resumed.ema.shadow_params, gen)), "the EMA no longer holds the weights"
    assert resumed.ema.optimization_step == 2
    assert all(torch.equal(exported[k], v) for k, v in resumed.recipe.generator.state_dict().items())
    resumed.accelerator.end_training()
