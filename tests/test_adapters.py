"""One base in memory (distill/models/adapters.py): roles own only their adapter, the teacher is the base untouched while
the adapters train, and the merged export computes what the adapter computes."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from distill.models.adapters import AdapterDenoiser, activate_adapter, add_lora_adapters
from distill.models.denoiser import load_denoiser
from distill.training.nets import frozen
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(n, 1, 8, 8, generator=g) * 2
    t = torch.rand(n, generator=g) * 5 + 0.1
    return x_t, t, {"class_labels": torch.arange(n) % 10}


def _perturb(view: AdapterDenoiser, seed: int) -> None:
    """Non-zero LoRA factors (peft starts B at zero, which would make every role the teacher)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in view.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def roles(tiny_teacher):
    base = load_denoiser(tiny_teacher, prediction="edm")
    reference = load_denoiser(tiny_teacher, prediction="edm")  # an untouched second copy
    add_lora_adapters(base, ["student", "fake_score"], rank=4)
    views = {name: AdapterDenoiser(base, name) for name in ("student", "fake_score")}
    views["teacher"] = AdapterDenoiser(base, None)
    return base, reference, views


def test_roles_own_only_their_adapter(roles):
    base, _, views = roles
    student, fake = set(map(id, views["student"].parameters())), set(map(id, views["fake_score"].parameters()))
    assert student and fake and not student & fake
    assert not list(views["teacher"].parameters())
    lora = {id(p) for n, p in base.model.named_parameters() if ".lora_" in n}
    assert student | fake == lora  # every LoRA factor belongs to exactly one role, no base weight to any
    assert all(not p.requires_grad for n, p in base.model.named_parameters() if ".lora_" not in n)
    assert all(k.count("student") == 1 for k in views["student"].state_dict())


def test_teacher_is_the_base_and_adapters_differ(roles):
    _, reference, views = roles
    _perturb(views["student"], 0)
    _perturb(views["fake_score"], 1)
    x_t, t, cond = _inputs()
    with torch.no_grad():
        want = reference(x_t, t, cond, guidance_scale=2.0)
        outs = {k: v(x_t, t, cond, guidance_scale=2.0) for k, v in views.items()}
        again = views["teacher"](x_t, t, cond, guidance_scale=2.0)  # after the adapters were switched on
    torch.testing.assert_close(outs["teacher"], want, atol=0, rtol=0)
    torch.testing.assert_close(again, want, atol=0, rtol=0)
    assert (outs["student"] - want).abs().max() > 1e-3 and (outs["fake_score"] - outs["student"]).abs().max() > 1e-3


def test_switching_keeps_requires_grad_and_frozen(roles):
    _, _, views = roles
    x_t, t, cond = _inputs(2)
    with frozen(views["fake_score"]) as fake:
        fake(x_t, t, cond)  # peft's set_adapter would mark the active adapter trainable again
        assert not any(p.requires_grad for p in fake.parameters())
    assert all(p.requires_grad for p in views["fake_score"].parameters())
    activate_adapter(views["student"].model, None)
    assert all(p.requires_grad for v in ("student", "fake_score") for p in views[v].parameters())


def test_merged_network_computes_the_adapter(roles):
    _, _, views = roles
    _perturb(views["student"], 0)
    _perturb(views["fake_score"], 1)
    x_t, t, cond = _inputs()
    for name in ("student", "fake_score", "teacher"):
        merged = views[name].merged()
        assert not any("lora" in k or "base_layer" in k for k in merged.model.state_dict())
        assert type(merged.model).__name__ == "UNet2DModel"
        with torch.no_grad():
            torch.testing.assert_close(merged(x_t, t, cond), views[name](x_t, t, cond), atol=1e-5, rtol=1e-5)


def test_teacher_unchanged_while_adapters_train(tiny_teacher, tmp_path):
    """Three trainer steps with the GAN head on: the adapters move, the base (the teacher) does not, and the EMA
    tracks exactly the student's LoRA factors."""
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "recipe.adapters=true", "recipe.lora_rank=4",
                                  "recipe.gan=true", "teacher.guidance_scale=2.0", "run.max_steps=3",
                                  "trainer.generator.lr=1e-2", "trainer.critic.lr=1e-2"))
    recipe = trainer.recipe
    base = recipe.teacher.model
    x_t, t, cond = _inputs()
    with torch.no_grad():
        teacher_before = recipe.teacher(x_t, t, cond, guidance_scale=2.0)
    base_before = {n: p.detach().clone() for n, p in base.named_parameters() if ".lora_" not in n}
    gen_before = [p.detach().clone() for p in recipe.generator.parameters()]
    critic_before = [p.detach().clone() for p in recipe.critic.parameters()]
    trainer.train()
    with torch.no_grad():
        torch.testing.assert_close(recipe.teacher(x_t, t, cond, guidance_scale=2.0), teacher_before, atol=0, rtol=0)
    for n, p in base.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(recipe.generator.parameters(), gen_before))
    assert any(not torch.equal(a, b) for a, b in zip(recipe.critic.parameters(), critic_before))
    assert len(trainer.ema.shadow_params) == len(gen_before)
    assert [p.shape for p in trainer.ema.shadow_params] == [p.shape for p in gen_before]
